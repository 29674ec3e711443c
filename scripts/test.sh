#!/usr/bin/env bash
# Set up everything the tests need (from the package registries only) and run lint, types and tests.
# What CI runs (.ci/run) and what README.md's "Set up and run every test" names. Extra arguments go
# to pytest, e.g. `bash scripts/test.sh -m "not webui" -x`.
#
# Each component's own set-up lives in scripts/setup.d/NN-name.sh (run in name order): each is
# idempotent and quick when its result is already there (a cache may speed a run up; none is required).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'
for step in scripts/setup.d/*.sh; do
    [ -e "$step" ] || continue
    echo "== setup: $step"
    bash "$step"
done
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/mypy --python-version 3.12   # Kaggle's Python (the bridge and the deployment run there)
bash deployment/cloudflare/test/run.sh   # the Cloudflare relay's wire core on the shared vectors
# -rfEs: the reason of every failure, error and skip (a skip fails unless the test is marked
# may_skip: tests/conftest.py); --durations=25: the slowest tests, to see a test growing slow.
.venv/bin/pytest -rfEs --durations=25 "$@"
# The same tests on Python 3.12, Kaggle's (about 11 min): all but the engine's and the Cloudflare relay's.
bash scripts/test-python.sh 3.12 "$@"
