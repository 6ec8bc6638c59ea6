from building_embed.preprocess import main

raise SystemExit(main())
