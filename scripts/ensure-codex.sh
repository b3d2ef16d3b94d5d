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

VERSION="0.169.0"
CACHE="${KOUBOU_CACHE:-$HOME/.cache/koubou}"
DIR="$CACHE/codex"
STAMP="$DIR/.koubou-installed-$VERSION"

case "$(uname -m)" in
    x86_64 | amd64) PKG="codex-linux-x64" TRIPLE="x86_64-unknown-linux-musl" ;;
    aarch64 | arm64) PKG="codex-linux-arm64" TRIPLE="aarch64-unknown-linux-musl" ;;
    *)
        echo "ensure-codex: unsupported machine $(uname -m)" >&2
        exit 1
        ;;
esac
BIN="$DIR/node_modules/@openai/$PKG/vendor/$TRIPLE/bin/codex"

installed() {
    [[ -f "$STAMP" && -x "$BIN" ]]
}

if installed; then
    echo "$BIN"
    exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
    echo "ensure-codex: npm is needed to install @openai/codex@$VERSION (apt-get install npm)" >&2
    exit 1
fi

mkdir -p "$DIR"
# One installer at a time: concurrent test runs may call this together.
exec 9>"$CACHE/.codex.lock"
flock 9
if installed; then
    echo "$BIN"
    exit 0
fi

echo "ensure-codex: installing @openai/codex@$VERSION into $DIR" >&2
rm -f "$DIR"/.koubou-installed-*
npm install --prefix "$DIR" --no-audit --no-fund --loglevel=error "@openai/codex@$VERSION" >&2
if [[ ! -x "$BIN" ]]; then
    echo "ensure-codex: npm finished but $BIN is missing (optional dependency @openai/$PKG not installed?)" >&2
    exit 1
fi

# Check it runs, with a throwaway CODEX_HOME (even --version writes under it).
home="$(mktemp -d)"
trap 'rm -rf "$home"' EXIT
got="$(CODEX_HOME="$home" "$BIN" --version </dev/null)"
case "$got" in
    *"$VERSION"*) ;;
    *)
        echo "ensure-codex: $BIN --version printed '$got', expected $VERSION" >&2
        exit 1
        ;;
esac
touch "$STAMP"
echo "$BIN"
