#!/usr/bin/env bash
# The whole stack on this machine, from the package registries only: the embedded engine (llama.cpp
# on Gemma 3 270M from PyPI, or --model-file F.gguf, or --model-file tiny: the generated test model),
# Open WebUI, the bridge and a local relay.
# Prints the URL to open and a key; Ctrl-C drains and stops everything. Extra arguments go to
# `python -m deployment` (e.g. --relay wss://..., --model-file, --webui off).
#
# Set-up (each step idempotent, seconds when already done): .venv with the project and its `engine`
# extra; llama-cpp-python built once (scripts/setup.d/30-llama-cpp.sh, 2-4 min on 2 cores);
# Gemma 3 270M's wheels (scripts/setup.d/35-gemma.sh, 253 MB; when they cannot be installed the
# engine serves the generated tiny model and says so; DEPLOY_GEMMA=off skips the step);
# Open WebUI in .venv-webui (scripts/setup.d/20-open-webui.sh, about 150 s and 2.9 GB; skipped with
# DEPLOY_WEBUI=off).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/bridge ] || ! .venv/bin/python -c 'import bridge, gguf, numpy' 2>/dev/null; then
    python3 -m venv .venv
    .venv/bin/pip install -q -e '.[engine]'
fi
bash scripts/setup.d/30-llama-cpp.sh
if [ "${DEPLOY_GEMMA:-on}" != "off" ]; then
    bash scripts/setup.d/35-gemma.sh || echo "gemma: could not be installed; the engine serves the tiny model" >&2
fi
if [ "${DEPLOY_WEBUI:-auto}" != "off" ]; then
    bash scripts/setup.d/20-open-webui.sh
fi
exec .venv/bin/python -m deployment --mode embedded "$@"
