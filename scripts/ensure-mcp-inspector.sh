#!/usr/bin/env bash
# Installs (idempotently) the pinned MCP Inspector and prints the path of its CLI launcher
# (`mcp-inspector`, a node script; use it as `mcp-inspector --cli ...`).
#
# Usage: scripts/ensure-mcp-inspector.sh   -> prints /path/to/mcp-inspector on stdout
#        export KOUBOU_MCP_INSPECTOR="$(scripts/ensure-mcp-inspector.sh)"
# Env:   KOUBOU_CACHE (default ~/.cache/koubou); the install goes to $KOUBOU_CACHE/mcp-inspector.
set -euo pipefail

VERSION="2.12.0"
CACHE="${KOUBOU_CACHE:-$HOME/.cache/koubou}"
DIR="$CACHE/mcp-inspector"
STAMP="$DIR/.koubou-installed-$VERSION"
BIN="$DIR/node_modules/.bin/mcp-inspector"

installed() {
    [[ -f "$STAMP" && -x "$BIN" ]]
}

if installed; then
    echo "$BIN"
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "ensure-mcp-inspector: npm is needed to install @modelcontextprotocol/inspector@$VERSION (apt-get install npm)" >&2
    exit 1
fi

mkdir -p "$DIR"
exec 9>"$CACHE/.mcp-inspector.lock"
flock 9
if installed; then
    echo "$BIN"
    exit 0
fi

echo "ensure-mcp-inspector: installing @modelcontextprotocol/inspector@$VERSION into $DIR" >&2
rm -f "$DIR"/.koubou-installed-*
npm install --prefix "$DIR" --no-audit --no-fund --loglevel=error "@modelcontextprotocol/inspector@$VERSION" >&2
if [[ ! -x "$BIN" ]]; then
    echo "ensure-mcp-inspector: npm finished but $BIN is missing" >&2
    exit 1
fi
touch "$STAMP"
echo "$BIN"
