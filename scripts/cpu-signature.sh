#!/usr/bin/env bash
# Prints a name for this CPU's instruction sets, e.g. `x86_64-v4-3f2a9c01d4be`: the architecture,
# the x86-64 level its flags reach (v1..v4; v4 = AVX-512 F/BW/CD/DQ/VL), and a hash of every CPU
# flag the kernel reports. Builds that target the CPU they are made on (llama-cpp-python's pip
# build, `target-cpu=native`) are cached under this name: two CPUs share a cache only when they
# report the same flags, so a build never meets a CPU without the instructions it was made for
# (it would die with SIGILL). A flag that changes without a new instruction (a kernel update)
# costs a rebuild, never a crash.
#
# Env: KOUBOU_CPUINFO (default /proc/cpuinfo) — another file, for tests.
set -euo pipefail

cpuinfo="${KOUBOU_CPUINFO:-/proc/cpuinfo}"
arch="$(uname -m)"
# x86 says "flags", arm64 "Features"; both list one token per extension.
line="$(grep -m1 -E '^(flags|Features)[[:space:]]*:' "$cpuinfo" || true)"
if [[ -z "$line" ]]; then
    echo "cpu-signature: no flags line in $cpuinfo" >&2
    exit 1
fi
flags="$(printf '%s\n' "${line#*:}" | tr -s ' \t' '\n\n' | sed '/^$/d' | sort -u)"
has_all() {
    local f
    for f in "$@"; do
        grep -qx -- "$f" <<<"$flags" || return 1
    done
}
level=""
if [[ "$arch" == x86_64 ]]; then
    level="-v1"
    if has_all cx16 lahf_lm popcnt sse4_1 sse4_2 ssse3; then
        level="-v2"
        if has_all avx avx2 bmi1 bmi2 f16c fma abm movbe xsave; then
            level="-v3"
            if has_all avx512f avx512bw avx512cd avx512dq avx512vl; then
                level="-v4"
            fi
        fi
    fi
fi
hash="$(printf '%s\n' "$flags" | sha256sum | cut -c1-12)"
echo "$arch$level-$hash"
