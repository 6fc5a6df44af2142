from ortho_mecha.cli import main

raise SystemExit(main())
