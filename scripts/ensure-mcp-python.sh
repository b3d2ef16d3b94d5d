#!/usr/bin/env bash
# Creates (idempotently) a venv with the official MCP Python SDK (`mcp` on PyPI, pinned) and
# prints the venv's python. Koubou's MCP tests drive the server with this real client.
#
# Usage: scripts/ensure-mcp-python.sh      -> prints /path/to/venv/bin/python on stdout
#        export KOUBOU_MCP_PYTHON="$(scripts/ensure-mcp-python.sh)"
# Env:   KOUBOU_CACHE (default ~/.cache/koubou), PYTHON (default python3)
set -euo pipefail

VERSION="2.3.0"
CACHE="${KOUBOU_CACHE:-$HOME/.cache/koubou}"
PYTHON_BIN="${PYTHON:-python3}"
venv="$CACHE/venv-mcp-python"
py="$venv/bin/python"
stamp="$venv/.koubou-installed-$VERSION"

if [[ -x "$py" && -f "$stamp" ]]; then
    echo "$py"
    exit 0
fi

mkdir -p "$CACHE"
# One installer at a time: concurrent test runs may call this together.
exec 9>"$CACHE/.venv-mcp-python.lock"
flock 9
if [[ -x "$py" && -f "$stamp" ]]; then
    echo "$py"
    exit 0
fi

echo "ensure-mcp-python: installing mcp==$VERSION into $venv" >&2
rm -f "$venv"/.koubou-installed-*
if [[ ! -x "$py" ]]; then
    "$PYTHON_BIN" -m venv "$venv" >&2
fi
"$py" -m pip install --quiet --disable-pip-version-check "mcp==$VERSION" >&2
got="$("$py" -c 'import importlib.metadata as m; print(m.version("mcp"))')"
if [[ "$got" != "$VERSION" ]]; then
    echo "ensure-mcp-python: installed mcp $got, expected $VERSION" >&2
    exit 1
fi
"$py" -c 'from mcp import ClientSession; from mcp.client.stdio import stdio_client' >&2
touch "$stamp"
echo "$py"
