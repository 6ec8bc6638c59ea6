from building_embed.train import main

raise SystemExit(main())
