#!/usr/bin/env bash
# Installs (idempotently) the pinned Claude Code CLI and prints the path of its `claude` binary.
# Used only by tests that check Claude Code lists Koubou's MCP tools (no login, no model call).
#
# Usage: scripts/ensure-claude-code.sh     -> prints /path/to/claude on stdout
#        export KOUBOU_CLAUDE_BIN="$(scripts/ensure-claude-code.sh)"
# Env:   KOUBOU_CACHE (default ~/.cache/koubou); the install goes to $KOUBOU_CACHE/claude-code.
set -euo pipefail

VERSION="2.1.328"
CACHE="${KOUBOU_CACHE:-$HOME/.cache/koubou}"
DIR="$CACHE/claude-code"
STAMP="$DIR/.koubou-installed-$VERSION"
BIN="$DIR/node_modules/.bin/claude"

installed() {
    [[ -f "$STAMP" && -x "$BIN" ]]
}

if installed; then
    echo "$BIN"
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "ensure-claude-code: npm is needed to install @anthropic-ai/claude-code@$VERSION (apt-get install npm)" >&2
    exit 1
fi

mkdir -p "$DIR"
exec 9>"$CACHE/.claude-code.lock"
flock 9
if installed; then
    echo "$BIN"
    exit 0
fi

echo "ensure-claude-code: installing @anthropic-ai/claude-code@$VERSION into $DIR" >&2
rm -f "$DIR"/.koubou-installed-*
npm install --prefix "$DIR" --no-audit --no-fund --loglevel=error "@anthropic-ai/claude-code@$VERSION" >&2
if [[ ! -x "$BIN" ]]; then
    echo "ensure-claude-code: npm finished but $BIN is missing (optional dependency @anthropic-ai/claude-code-linux-x64 not installed?)" >&2
    exit 1
fi
home="$(mktemp -d)"
trap 'rm -rf "$home"' EXIT
got="$(HOME="$home" CLAUDE_CONFIG_DIR="$home/.claude" DISABLE_AUTOUPDATER=1 DISABLE_TELEMETRY=1 \
    CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 "$BIN" --version </dev/null 2>&1 || true)"
case "$got" in
    *"$VERSION"*) ;;
    *)
        echo "ensure-claude-code: $BIN --version printed '$got', expected $VERSION" >&2
        exit 1
        ;;
esac
touch "$STAMP"
echo "$BIN"
