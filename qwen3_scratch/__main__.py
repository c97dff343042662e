from qwen3_scratch.cli import main

raise SystemExit(main())
