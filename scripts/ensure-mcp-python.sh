#!/usr/bin/env bash
# Creates (idempotently) a venv with the official MCP Python SDK (`mcp` on PyPI, pinned) and
# prints the venv's python. Koubou's MCP tests drive the server with this real client.
#
# Usage: scripts/ensure-mcp-python.sh      -> prints /path/to/venv/bin/python on stdout
#        export KOUBOU_MCP_PYTHON="$(scripts/ensure-mcp-python.sh)"
# Env:   KOUBOU_CACHE (default ~/.cache/koubou), PYTHON (default python3)
set -euo pipefail
source "$(dirname "$0")/lib/pip-pinned.sh"

check() { "$1" -c 'from mcp import ClientSession; from mcp.client.stdio import stdio_client'; }
pip_pinned mcp-python mcp 2.3.0 bin/python check
