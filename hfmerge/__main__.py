from hfmerge.cli import main

raise SystemExit(main())
