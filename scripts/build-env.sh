# Sourced by scripts/test.sh and scripts/quickstart.sh: `source scripts/build-env.sh BASE` builds
# for this CPU in a target dir of its own under BASE, and exports CARGO_TARGET_DIR (and RUSTFLAGS).
#
# KOUBOU_BUILD=native (default): `-C target-cpu=native`, so llama.cpp uses every instruction set
#   the CPU has (AVX-512 where present; see docs/benchmarks.md for what it buys). Such a build
#   dies with SIGILL on a CPU without those instructions, and cargo's cache key records the word
#   "native", not the CPU: the target dir is therefore named after the CPU
#   (scripts/cpu-signature.sh), BASE/native-<signature>. A cache moved to another machine is a
#   cold build there, never a crash.
# KOUBOU_BUILD=portable: `.cargo/config.toml`'s x86-64-v3 (AVX2/FMA/F16C), runs on every x86-64
#   CPU this project meets, in BASE/portable.
case "${KOUBOU_BUILD:-native}" in
    native)
        export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-cpu=native"
        export CARGO_TARGET_DIR="$1/native-$("$(dirname "${BASH_SOURCE[0]}")/cpu-signature.sh")"
        ;;
    portable)
        export CARGO_TARGET_DIR="$1/portable"
        ;;
    *)
        echo "KOUBOU_BUILD must be native or portable, not ${KOUBOU_BUILD}" >&2
        exit 2
        ;;
esac
