from localgp.cli import main

raise SystemExit(main())
