#!/usr/bin/env bash
# Installs (idempotently) the pinned Claude Code CLI and prints the path of its `claude` binary.
# Used only by tests that check Claude Code lists Koubou's MCP tools (no login, no model call).
#
# Usage: scripts/ensure-claude-code.sh     -> prints /path/to/claude on stdout
#        export KOUBOU_CLAUDE_BIN="$(scripts/ensure-claude-code.sh)"
# Env:   KOUBOU_CACHE (default ~/.cache/koubou); the install goes to $KOUBOU_CACHE/claude-code.
set -euo pipefail
source "$(dirname "$0")/lib/npm-pinned.sh"

VERSION="2.1.328"

# After an install: it runs offline, and is the pinned version.
check() {
    local home got
    home="$(mktemp -d)"
    got="$(HOME="$home" CLAUDE_CONFIG_DIR="$home/.claude" DISABLE_AUTOUPDATER=1 DISABLE_TELEMETRY=1 \
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 "$1" --version </dev/null 2>&1 || true)"
    rm -rf "$home"
    case "$got" in
        *"$VERSION"*) ;;
        *)
            echo "ensure-claude-code: $1 --version printed '$got', expected $VERSION (optional dependency @anthropic-ai/claude-code-linux-x64 not installed?)" >&2
            return 1
            ;;
    esac
}

npm_pinned claude-code "@anthropic-ai/claude-code" "$VERSION" node_modules/.bin/claude check
