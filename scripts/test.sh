#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a warm one: installs what the tests need (build
# tools, the default model, and the real peers Koubou is tested against: Codex CLI, a
# llama-cpp-python server, the MCP Python SDK and Inspector, Claude Code, Chromium with
# playwright-core, schemathesis), then runs every test of the workspace with cargo-nextest.
#
# Everything heavy is cached outside the clone, under $KOUBOU_CACHE (default ~/.cache/koubou):
# the cargo target dir, the model, the npm and pip installs. The build is for this CPU, in a
# target dir named after it (scripts/build-env.sh: $CARGO_TARGET_DIR or $KOUBOU_CACHE/target,
# then native-<cpu signature>); KOUBOU_BUILD=portable tests the x86-64-v3 build instead.
set -euo pipefail
cd "$(dirname "$0")/.."
export KOUBOU_CACHE="${KOUBOU_CACHE:-$HOME/.cache/koubou}"
source scripts/build-env.sh "${CARGO_TARGET_DIR:-$KOUBOU_CACHE/target}"
echo "target dir: $CARGO_TARGET_DIR"
mkdir -p "$KOUBOU_CACHE/logs"
logs="$KOUBOU_CACHE/logs"
# Builds of several checkouts pile up in the shared target dir; a full disk fails the build
# half-way. Below 15 GiB free, start the target dir afresh (a cold build, ~20 min on 2 cores).
free_kib=$(df -Pk "$KOUBOU_CACHE" | awk 'NR == 2 { print $4 }')
if ((free_kib < 15 * 1024 * 1024)) && [[ -d "$CARGO_TARGET_DIR" ]]; then
    echo "test.sh: $((free_kib / 1024 / 1024)) GiB free under $KOUBOU_CACHE; removing $CARGO_TARGET_DIR" >&2
    rm -rf "$CARGO_TARGET_DIR"
fi
started=$(date +%s)
step() { echo "== [$(( $(date +%s) - started ))s] $*"; }

step "system packages"
scripts/setup-system.sh

# The slow installs run in the background while cargo builds; each writes its path to a file.
ensure_bg() { # name script
    ( "scripts/$2" > "$logs/$1.path" 2> "$logs/$1.log" && echo ok > "$logs/$1.status" || echo failed > "$logs/$1.status" ) &
}
rm -f "$logs"/*.status
step "real peers (background): codex, llama-cpp-python, mcp python sdk, mcp inspector, claude code, chromium + playwright, schemathesis"
ensure_bg codex ensure-codex.sh
ensure_bg llama-cpp-python ensure-llama-cpp-python.sh
ensure_bg mcp-python ensure-mcp-python.sh
ensure_bg mcp-inspector ensure-mcp-inspector.sh
ensure_bg claude ensure-claude-code.sh
ensure_bg chromium ensure-chromium.sh
ensure_bg node-tools ensure-node-tools.sh
ensure_bg cargo-fuzz ensure-cargo-fuzz.sh
ensure_bg schemathesis ensure-schemathesis.sh

step "build (workspace, tests included)"
cargo build --workspace --all-targets --locked

step "default model"
export KOUBOU_TEST_MODEL="${KOUBOU_TEST_MODEL:-$("$CARGO_TARGET_DIR/debug/koubou" models pull 2>"$logs/model.log" | tail -n 1)}"
echo "model: $KOUBOU_TEST_MODEL"

step "waiting for the real peers"
wait
peer() { # name var
    if [[ "$(cat "$logs/$1.status" 2>/dev/null)" != ok ]]; then
        echo "could not install $1; its log:" >&2
        cat "$logs/$1.log" >&2
        exit 1
    fi
    export "$2=$(tail -n 1 "$logs/$1.path")"
    echo "$2=${!2}"
}
peer codex KOUBOU_CODEX_BIN
peer llama-cpp-python KOUBOU_LLAMA_CPP_PYTHON
peer mcp-python KOUBOU_MCP_PYTHON
peer mcp-inspector KOUBOU_MCP_INSPECTOR
peer claude KOUBOU_CLAUDE_BIN
peer chromium KOUBOU_CHROMIUM
peer node-tools KOUBOU_NODE_MODULES
peer cargo-fuzz KOUBOU_CARGO_FUZZ
peer schemathesis KOUBOU_SCHEMATHESIS
export KOUBOU_ARTIFACTS="${KOUBOU_ARTIFACTS:-$PWD/artifacts}"

# Formatting and lints (clippy denies every warning), before the suite.
# (Without the real peers: `KOUBOU_SKIP_REAL_PEERS=1 cargo nextest run --workspace`.)
step "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast "$@"
else
    cargo test --workspace --locked --no-fail-fast "$@"
fi
# A short, bounded run of every fuzz target from the corpus in fuzz/corpus (scripts/fuzz.sh).
step "fuzz (${KOUBOU_FUZZ_SECS:-20}s per target)"
scripts/fuzz.sh "${KOUBOU_FUZZ_SECS:-20}"
step "done"
