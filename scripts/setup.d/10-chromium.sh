#!/usr/bin/env bash
# Debian's chromium (the browser the webui tests drive with Playwright; never a downloaded browser build)
# and fonts for the screenshots. Skipped when chromium and the fonts are already there.
set -euo pipefail
PACKAGES=(chromium fonts-noto-color-emoji fonts-dejavu-core)
if [ -x /usr/bin/chromium ] && dpkg-query -W -f='${Status}\n' "${PACKAGES[@]}" 2>/dev/null \
    | grep -c '^install ok installed$' | grep -qx "${#PACKAGES[@]}"; then
    echo "chromium: already installed ($(/usr/bin/chromium --version 2>/dev/null || echo unknown version))"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
/usr/bin/chromium --version
