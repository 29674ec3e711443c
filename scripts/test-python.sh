#!/usr/bin/env bash
# The suite again on a second Python: `bash scripts/test-python.sh 3.12 [pytest arguments]`.
#
# Kaggle's image runs Python 3.12, and the bridge and the deployment run there (the notebook's
# kernel), while this machine's python3 is 3.11: scripts/test.sh calls this for 3.12 after its own
# run (which also type-checks for 3.12). Its own venv (.venv-py3.12, from the package registries like
# .venv), then pytest without the tests of the embedded engine (`engine`: llama-cpp-python is built
# into .venv by scripts/setup.d; on Kaggle the engine is Ollama's binary) and those of the
# Cloudflare relay (`workerd`: that relay is TypeScript on workerd, whatever runs the tests). Those
# of Open WebUI run (its own venv, .venv-webui), the notebook's Kaggle batch run among them.
#
# The interpreter: TEST_PYTHON if set, else pythonX.Y on PATH, else pyenv's newest X.Y, else
# /usr/bin or /usr/local/bin. TEST_SECOND_PYTHON: `auto` (the default: without an interpreter, say
# so and stop), `require` (without one, fail) or `off`.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:?usage: scripts/test-python.sh X.Y [pytest arguments]}
shift
MODE=${TEST_SECOND_PYTHON:-auto}
[ "$MODE" = off ] && exit 0

is_version() {  # $1 runs and is Python $VERSION (a pyenv shim of another version fails here)
    "$1" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$VERSION'.split('.'))))" \
        >/dev/null 2>&1
}

find_python() {
    local candidates=()
    [ -n "${TEST_PYTHON:-}" ] && candidates+=("$TEST_PYTHON")
    candidates+=("python$VERSION")
    local root=${PYENV_ROOT:-$HOME/.pyenv}
    if [ -d "$root/versions" ]; then
        while IFS= read -r dir; do
            candidates+=("$dir/bin/python$VERSION")
        done < <(find "$root/versions" -maxdepth 1 -name "$VERSION.*" | sort -rV)
    fi
    candidates+=("/usr/bin/python$VERSION" "/usr/local/bin/python$VERSION")
    for candidate in "${candidates[@]}"; do
        if is_version "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

if ! PY=$(find_python); then
    echo "== Python $VERSION: not found (TEST_PYTHON=/path/to/python$VERSION names one)" >&2
    [ "$MODE" = require ] && exit 1
    echo "== Python $VERSION: its run is left out" >&2
    exit 0
fi
VENV=.venv-py$VERSION
echo "== Python $VERSION: $PY ($("$PY" --version 2>&1)), venv $VENV"
[ -x "$VENV/bin/python" ] && is_version "$VENV/bin/python" || "$PY" -m venv --clear "$VENV"
"$VENV/bin/pip" install -q -e '.[test]'
# A marker expression given (`-m EXPR`) is kept, with those two groups left out of it too.
LEFT_OUT="not engine and not workerd"
args=()
marked=""
while [ $# -gt 0 ]; do
    case "$1" in
        -m) args+=(-m "($2) and $LEFT_OUT"); marked=1; shift 2 ;;
        -m*) args+=(-m "(${1#-m}) and $LEFT_OUT"); marked=1; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
[ -n "$marked" ] || args=(-m "$LEFT_OUT" "${args[@]}")
"$VENV/bin/pytest" -rfEs --durations=10 "${args[@]}"
