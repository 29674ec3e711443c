#!/usr/bin/env bash
# nftables for tests/test_netns.py (random packet loss and a blackholed link inside network namespaces
# the test makes itself). Idempotent; without root the netns tests skip and say why.
set -euo pipefail
if command -v nft >/dev/null 2>&1; then
    echo "nftables: already installed"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "nftables: not root, tests/test_netns.py will skip"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends nftables >/dev/null 2>&1 \
    || { apt-get update -q && apt-get install -y -q --no-install-recommends nftables; }
nft --version
