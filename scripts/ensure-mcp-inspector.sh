#!/usr/bin/env bash
# Installs (idempotently) the pinned MCP Inspector and prints the path of its CLI launcher
# (`mcp-inspector`, a node script; use it as `mcp-inspector --cli ...`).
#
# Usage: scripts/ensure-mcp-inspector.sh   -> prints /path/to/mcp-inspector on stdout
#        export KOUBOU_MCP_INSPECTOR="$(scripts/ensure-mcp-inspector.sh)"
# Env:   KOUBOU_CACHE (default ~/.cache/koubou); the install goes to $KOUBOU_CACHE/mcp-inspector.
set -euo pipefail
source "$(dirname "$0")/lib/npm-pinned.sh"

npm_pinned mcp-inspector "@modelcontextprotocol/inspector" 2.12.0 node_modules/.bin/mcp-inspector
