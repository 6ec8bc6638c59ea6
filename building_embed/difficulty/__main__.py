from building_embed.difficulty import main

raise SystemExit(main())
