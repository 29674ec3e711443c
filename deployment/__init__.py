"""Deployment of the whole stack on a Kaggle GPU notebook (or anywhere): ``kaggle_ollama_webui.py``."""
