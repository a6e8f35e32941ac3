from xca_gateway.cli import main

raise SystemExit(main())
