"""Kaggle deployment: Ollama (or the embedded llama.cpp engine) + Open WebUI + the bridge, supervised.

One command takes a fresh Kaggle GPU notebook (2x T4, 12 h session, internet on) to a private
service reachable through the relay; where Ollama cannot run (no GPU, no internet: CI, a laptop) the
same code runs the whole stack on an embedded engine (llama.cpp via ``deployment/engine.py``, on a
tiny generated model or ``--model-file``), with a local relay when none is configured::

    python -m deployment                      # auto: Ollama with a GPU, else embedded; Ctrl-C drains
    python -m deployment --mode embedded      # what scripts/run.sh runs
    python -m deployment doctor               # what is wrong here, each problem with its fix
    python -m deployment status | stop        # the deployment in --state-dir
    python deployment/kaggle_ollama_webui.py  # the same, as a script

In a notebook, ``deployment.notebook.serve()`` runs it in the cell and keeps serving with one live
status line until the session's end (notebooks/kaggle_ollama_webui.ipynb).

Every flag is also an environment variable (``--help`` shows which): ``BRIDGE_*`` for what the
bridge shares with its other commands (relay URL, node token, client key), ``DEPLOY_*`` for the
rest. Secrets (``BRIDGE_NODE_TOKEN``, ``BRIDGE_KEY``, ``DEPLOY_WEBUI_ADMIN_PASSWORD``,
``BRIDGE_RELAY``, the Kaggle CLI's and Cloudflare's) come from the environment or Kaggle Secrets,
never from the notebook's text, and are never printed. See deployment/README.md for the choices (GPU
modes, flash attention, KV cache) and docs/kaggle.md for a first real run.

The children (local relay, engine or Ollama servers, bridge, Open WebUI) run under an asyncio
supervisor: each is started when the previous one is healthy, health-checked every few seconds, and
restarted with exponential backoff when it exits or stops answering. Every process is recorded in
``<state>/children.json`` the moment it starts (deployment/children.py): a run that dies midway
leaves nothing the next run does not stop. On the way out, 5 minutes before the session's end, or
once the next session's bridge has connected, the bridge drains (the relay then holds new requests
for, or sends them to, the next bridge).

This module is the deployment's front door (the name README, docs and tests use); the work is done
in rooms with one job each, lowest first:

- ``settings``: :class:`Settings`, the flags and their variables, :func:`parse_settings`;
- ``stack``: one run's shared state (:class:`~deployment.stack.Stack`, the facts it shows);
- ``relay``: which relay the bridge dials (``BRIDGE_RELAY``, Cloudflare, or a local one);
- ``engines`` (with ``ollama_setup`` and ``placement``): Ollama's servers or the embedded engine;
- ``webui``: Open WebUI's install and child (``webui_setup``: its venv and environment);
- ``status``: the status line, the live line, READY, ``status.json``;
- ``serving``: from READY to the drain (deadline, next session, validation, ``stop``);
- ``orchestration``: :class:`Deployment`, the order of the bring-up and the stop;
- ``cli``: ``python -m deployment up|status|stop|doctor|report``.
"""

from __future__ import annotations

from deployment.cli import COMMANDS, main, show_report
from deployment.orchestration import Deployment, ensure_bridge
from deployment.relay import CLOUDFLARE_DEPLOY, CloudflareRequest, RelayTarget, deploy_cloudflare, host_of
from deployment.settings import (
    DEFAULT_OLLAMA_MODEL,
    FLAGS,
    SECRET_SETTINGS,
    Settings,
    build_parser,
    code_root,
    in_notebook,
    parse_settings,
)
from deployment.stack import EMBEDDED_ROUTE, OLLAMA_ROUTE, Facts

#: The flags' table under its earlier name (tests/test_deployment.py reads it).
_FLAGS = FLAGS

__all__ = [
    "CLOUDFLARE_DEPLOY",
    "COMMANDS",
    "DEFAULT_OLLAMA_MODEL",
    "EMBEDDED_ROUTE",
    "FLAGS",
    "OLLAMA_ROUTE",
    "SECRET_SETTINGS",
    "CloudflareRequest",
    "Deployment",
    "Facts",
    "RelayTarget",
    "Settings",
    "build_parser",
    "code_root",
    "deploy_cloudflare",
    "ensure_bridge",
    "host_of",
    "in_notebook",
    "main",
    "parse_settings",
    "show_report",
]

if __name__ == "__main__":
    raise SystemExit(main())
