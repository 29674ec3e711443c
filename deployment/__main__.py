"""``python -m deployment [up|status|stop|doctor|report DIR] [flags]``: see kaggle_ollama_webui.py."""

from deployment.kaggle_ollama_webui import main

raise SystemExit(main())
