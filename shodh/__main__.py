from shodh.cli import main

raise SystemExit(main())
