#!/usr/bin/env bash
# The embedded engine (deployment/engine.py, tests marked `engine`): llama-cpp-python[server], pinned,
# into .venv. PyPI has only its source (no wheel, and Debian 12 has no llama.cpp), so it is built here:
# CPU only, no -march=native (the wheel runs on any x86-64 with AVX2), without the tests, tools,
# examples, server binary, llava/mtmd or llama.cpp's `common` library (the Python package loads only
# libllama and libggml*). About 100-190 s on 2 cores; the built wheel is kept under .cache/wheels/
# (keyed by version and flags) and reused when there, never required.
# Skipped when the pinned version and the server's dependencies already import.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
LLAMA_CPP_VERSION="0.3.36"
PY=${VENV:-$ROOT/.venv}/bin/python  # VENV=...: another virtual environment (to try this script)
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF"
# Also patched below: the package's CMakeLists.txt forces LLAMA_BUILD_COMMON on; we turn it off.
PATCH_ID="common-off-1"

installed() {
    "$PY" - "$LLAMA_CPP_VERSION" <<'EOF' 2>/dev/null
import importlib.metadata as m, sys
assert m.version("llama_cpp_python") == sys.argv[1]
import llama_cpp, llama_cpp.server.app, fastapi, sse_starlette, starlette_context, pydantic_settings  # noqa
EOF
}

if installed; then
    echo "llama-cpp-python: $LLAMA_CPP_VERSION already in ${VENV:-.venv}"
    exit 0
fi

KEY=$(printf '%s %s %s %s' "$LLAMA_CPP_VERSION" "$CMAKE_ARGS" "$PATCH_ID" "$(uname -m)" | sha256sum | cut -c1-12)
WHEEL_DIR=$ROOT/.cache/wheels/llama-cpp-$KEY
wheel=$(ls "$WHEEL_DIR"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
    echo "llama-cpp-python: building $LLAMA_CPP_VERSION from source (CPU only, 1-4 min on 2 cores)"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_VERSION" -d "$work"
    tar -xzf "$work"/llama_cpp_python-"$LLAMA_CPP_VERSION".tar.gz -C "$work"
    src=$work/llama_cpp_python-$LLAMA_CPP_VERSION
    sed -i 's/set(LLAMA_BUILD_COMMON ON CACHE BOOL/set(LLAMA_BUILD_COMMON OFF CACHE BOOL/' "$src/CMakeLists.txt"
    grep -q 'set(LLAMA_BUILD_COMMON OFF CACHE BOOL "Build llama.cpp common library" FORCE)' "$src/CMakeLists.txt"
    mkdir -p "$work/out"
    start=$(date +%s)
    # --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS.
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$PY" -m pip wheel -q --no-deps --no-cache-dir "$src" -w "$work/out"
    echo "llama-cpp-python: built in $(($(date +%s) - start)) s"
    mkdir -p "$WHEEL_DIR"
    cp "$work"/out/llama_cpp_python-*.whl "$WHEEL_DIR"/
    wheel=$(ls "$WHEEL_DIR"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl | head -1)
fi
"$PY" -m pip install -q "llama_cpp_python[server] @ file://$wheel"
installed
echo "llama-cpp-python: $LLAMA_CPP_VERSION installed from $(basename "$wheel")"
