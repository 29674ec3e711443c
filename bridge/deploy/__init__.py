"""One-step deployment of the relay where the user has no server: ``bridge deploy cloudflare`` puts the
Cloudflare relay (``deployment/cloudflare``: a Worker and one Durable Object) on the user's Cloudflare
account with nothing but an API token; :func:`bridge.deploy.cloudflare.deploy` does the same from Python
(the Kaggle notebook). The Worker's bundle is built in this repository and shipped in ``worker/``."""

#: Cloudflare's REST API (v4).
API_BASE = "https://api.cloudflare.com/client/v4"
#: The relay Worker's default name (``--name``).
DEFAULT_NAME = "kaggle-bridge-relay"
