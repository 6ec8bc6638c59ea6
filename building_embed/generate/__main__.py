from building_embed.generate import main

raise SystemExit(main())
