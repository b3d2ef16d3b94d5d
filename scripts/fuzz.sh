#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets) for a bounded time, starting from the corpus
# kept in the repository (fuzz/corpus/<target>, read only here; new finds go to a scratch dir).
#
# Usage: scripts/fuzz.sh [SECONDS per target, default 20] [TARGET...]
# A crash fails the script and leaves the input under fuzz/artifacts/<target>/ (reproduce it with
# `RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <file>`). To keep a find in the corpus, copy it from
# the scratch dir printed at the end. Builds go to $KOUBOU_CACHE/fuzz-target (outside the clone).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-20}"
shift || true
export KOUBOU_CACHE="${KOUBOU_CACHE:-$HOME/.cache/koubou}"
cargo_fuzz="${KOUBOU_CARGO_FUZZ:-$(scripts/ensure-cargo-fuzz.sh)}"
# cargo-fuzz passes -Z flags (sanitizer, coverage); this lets the stable toolchain take them,
# for these builds only.
export RUSTC_BOOTSTRAP=1
# cargo-fuzz sets RUSTFLAGS itself, which overrides .cargo/config.toml, and appends the caller's:
# dropping those (test.sh exports `-C target-cpu=native`) keeps these builds plain x86-64, so a
# cached one runs on any CPU. Their own target dir keeps them apart from the others.
unset RUSTFLAGS
target_dir="$KOUBOU_CACHE/fuzz-target"
targets=("$@")
((${#targets[@]})) || mapfile -t targets < <("$cargo_fuzz" fuzz list)
"$cargo_fuzz" fuzz build --target-dir "$target_dir" 2>&1 | { grep -vE '^\s+(Compiling|Downloaded|Downloading)' || true; } >&2
scratch="$(mktemp -d)"
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t" "fuzz/corpus/$t"
    echo "fuzz: $t for ${secs}s"
    if ! "$cargo_fuzz" fuzz run --target-dir "$target_dir" "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$scratch/$t.log" 2>&1; then
        tail -n 60 "$scratch/$t.log" >&2
        echo "fuzz: $t FAILED; the input is under fuzz/artifacts/$t/" >&2
        exit 1
    fi
    grep -E '^stat::(number_of_executed_units|peak_rss_mb)|DONE' "$scratch/$t.log" || true
done
echo "fuzz: all targets ran without a failure (new corpus entries, if any: $scratch)"
