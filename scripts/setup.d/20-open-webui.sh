#!/usr/bin/env bash
# Open WebUI, pinned, in its own venv (.venv-webui, gitignored) for the webui tests and screenshots.
# torch is pinned to the CPU wheel: without the constraint pip resolves the CUDA build (several GB).
# Skipped when .venv-webui already has this version. About 150 s and 2.9 GB on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
OPEN_WEBUI_VERSION="0.12.4"
TORCH_PIN="torch==2.13.0+cpu"
VENV=.venv-webui
if [ -x "$VENV/bin/open-webui" ] \
    && [ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("open-webui"))' 2>/dev/null)" = "$OPEN_WEBUI_VERSION" ]; then
    echo "open-webui: $OPEN_WEBUI_VERSION already in $VENV"
    exit 0
fi
if ! python3 -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] < (3, 13)))'; then
    echo "open-webui $OPEN_WEBUI_VERSION needs Python 3.11 or 3.12; python3 is $(python3 --version)" >&2
    exit 1
fi
python3 -m venv "$VENV"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "$TORCH_PIN" >"$constraints"
"$VENV/bin/pip" install -q -c "$constraints" "open-webui==$OPEN_WEBUI_VERSION"
"$VENV/bin/python" -c 'import importlib.metadata as m; print("open-webui", m.version("open-webui"), "torch", m.version("torch"))'
