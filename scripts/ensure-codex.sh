#!/usr/bin/env bash
# Installs (idempotently) the pinned Codex CLI and prints the path of its real binary.
#
# `@openai/codex` on npm is a small node launcher; the program itself is a static musl binary
# shipped in the optional dependency `@openai/codex-linux-x64`. We print that binary's path so
# tests (and users) can call it directly: it skips node and saves ~0.2 s per run.
#
# Usage: scripts/ensure-codex.sh        -> prints /path/to/codex on stdout (progress on stderr)
#        export KOUBOU_CODEX_BIN="$(scripts/ensure-codex.sh)"
# Env:   KOUBOU_CACHE (default ~/.cache/koubou); the install goes to $KOUBOU_CACHE/codex.
set -euo pipefail
source "$(dirname "$0")/lib/npm-pinned.sh"

VERSION="0.169.0"
case "$(uname -m)" in
    x86_64 | amd64) PKG="codex-linux-x64" TRIPLE="x86_64-unknown-linux-musl" ;;
    aarch64 | arm64) PKG="codex-linux-arm64" TRIPLE="aarch64-unknown-linux-musl" ;;
    *)
        echo "ensure-codex: unsupported machine $(uname -m)" >&2
        exit 1
        ;;
esac

# After an install: it runs, and is the pinned version (with a throwaway CODEX_HOME: even
# --version writes under it).
check() {
    local home got
    home="$(mktemp -d)"
    got="$(CODEX_HOME="$home" "$1" --version </dev/null || true)"
    rm -rf "$home"
    case "$got" in
        *"$VERSION"*) ;;
        *)
            echo "ensure-codex: $1 --version printed '$got', expected $VERSION (optional dependency @openai/$PKG not installed?)" >&2
            return 1
            ;;
    esac
}

npm_pinned codex "@openai/codex" "$VERSION" "node_modules/@openai/$PKG/vendor/$TRIPLE/bin/codex" check
