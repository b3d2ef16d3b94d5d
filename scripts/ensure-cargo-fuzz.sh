#!/usr/bin/env bash
# Installs (idempotently) the pinned cargo-fuzz and prints the path of its binary.
#
# Usage: scripts/ensure-cargo-fuzz.sh     -> prints /path/to/cargo-fuzz on stdout (progress on stderr)
# Env:   KOUBOU_CACHE (default ~/.cache/koubou); the install goes to $KOUBOU_CACHE/cargo-fuzz.
#
# cargo-fuzz drives libFuzzer through `-Z` compiler flags; on the stable toolchain the fuzz script
# (scripts/fuzz.sh) sets RUSTC_BOOTSTRAP=1 for those builds only.
set -euo pipefail
VERSION="0.13.2"
root="${KOUBOU_CACHE:-$HOME/.cache/koubou}/cargo-fuzz"
bin="$root/bin/cargo-fuzz"
if [[ ! -x "$bin" ]] || [[ "$("$bin" --version 2>/dev/null)" != *"$VERSION"* ]]; then
    echo "ensure-cargo-fuzz: installing cargo-fuzz $VERSION into $root" >&2
    cargo install --quiet --locked --root "$root" --version "=$VERSION" cargo-fuzz >&2
fi
echo "$bin"
