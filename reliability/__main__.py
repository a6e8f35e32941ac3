from reliability.runner import main

raise SystemExit(main())
