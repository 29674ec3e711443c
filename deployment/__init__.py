"""The whole stack on a Kaggle GPU notebook (or anywhere): Ollama or the embedded engine, Open WebUI
and the bridge, supervised. ``python -m deployment --help``; in a notebook
``deployment.notebook.serve()``; ``python -m deployment doctor`` checks a machine."""
