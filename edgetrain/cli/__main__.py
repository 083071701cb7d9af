"""`python -m edgetrain.cli`: the same as the `edgetrain` command."""
from edgetrain.cli.main import main

raise SystemExit(main())
