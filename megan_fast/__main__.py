from megan_fast.cli.main import main

raise SystemExit(main())
