from gptoss.cli import main

raise SystemExit(main())
