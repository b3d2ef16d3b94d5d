#!/usr/bin/env bash
# Installs (idempotently) Debian's Chromium for the dashboard's browser test and prints its path.
#
# Usage: scripts/ensure-chromium.sh      -> prints /usr/bin/chromium on stdout (progress on stderr)
# Needs root (or sudo) the first time; does nothing when chromium is already installed.
set -euo pipefail

BIN=/usr/bin/chromium
if [[ -x "$BIN" ]]; then
    echo "$BIN"
    exit 0
fi

SUDO=""
if [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "ensure-chromium: run as root (or install sudo): apt-get install -y chromium" >&2
        exit 1
    fi
fi
echo "ensure-chromium: installing Debian's chromium package" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >&2
$SUDO apt-get install -y -qq chromium >&2
[[ -x "$BIN" ]] || { echo "ensure-chromium: $BIN still missing after install" >&2; exit 1; }
echo "$BIN"
