#!/usr/bin/env bash
# Installs (idempotently) the pinned node packages the browser tests use (playwright-core, which
# drives Debian's chromium; it downloads no browser of its own) and prints the node_modules path.
#
# Usage: scripts/ensure-node-tools.sh    -> prints $KOUBOU_CACHE/node/node_modules on stdout
#        export KOUBOU_NODE_MODULES="$(scripts/ensure-node-tools.sh)"
# Env:   KOUBOU_CACHE (default ~/.cache/koubou).
set -euo pipefail

PLAYWRIGHT_VERSION="1.65.1"
CACHE="${KOUBOU_CACHE:-$HOME/.cache/koubou}"
DIR="$CACHE/node"
STAMP="$DIR/.koubou-installed-playwright-core-$PLAYWRIGHT_VERSION"

if [[ -f "$STAMP" && -d "$DIR/node_modules/playwright-core" ]]; then
    echo "$DIR/node_modules"
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "ensure-node-tools: npm is needed (apt-get install -y nodejs npm)" >&2
    exit 1
fi
mkdir -p "$DIR"
[[ -f "$DIR/package.json" ]] || echo '{"name":"koubou-node-tools","private":true}' >"$DIR/package.json"
echo "ensure-node-tools: installing playwright-core@$PLAYWRIGHT_VERSION into $DIR" >&2
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix "$DIR" --no-audit --no-fund --silent \
    "playwright-core@$PLAYWRIGHT_VERSION" >&2
touch "$STAMP"
echo "$DIR/node_modules"
