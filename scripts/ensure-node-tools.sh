#!/usr/bin/env bash
# Installs (idempotently) the pinned node packages the browser tests use (playwright-core, which
# drives Debian's chromium; it downloads no browser of its own) and prints the node_modules path.
#
# Usage: scripts/ensure-node-tools.sh    -> prints $KOUBOU_CACHE/node/node_modules on stdout
#        export KOUBOU_NODE_MODULES="$(scripts/ensure-node-tools.sh)"
# Env:   KOUBOU_CACHE (default ~/.cache/koubou).
set -euo pipefail
source "$(dirname "$0")/lib/npm-pinned.sh"

export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
npm_pinned node playwright-core 1.65.1 node_modules
