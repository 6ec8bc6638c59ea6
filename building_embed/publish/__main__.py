from building_embed.publish import main

raise SystemExit(main())
