"""``python -m deployment [up|status|stop|doctor|report DIR] [flags]``: see deployment/cli.py."""

from deployment.cli import main

raise SystemExit(main())
