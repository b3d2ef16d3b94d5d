#!/usr/bin/env bash
# Creates (idempotently) a venv with llama-cpp-python[server]==0.3.36 and prints its python.
#
# llama-cpp-python compiles llama.cpp at install time for the build machine's CPU, and machines
# here differ (AVX-512 vs AVX2-only), so the venv is keyed by a hash of the CPU "flags" line of
# /proc/cpuinfo. We also ask ggml for an explicit x86-64-v3 build (AVX/AVX2/FMA/F16C/BMI2, no
# -march=native) so a venv built on one machine runs on the other.
#
# Usage: scripts/ensure-llama-cpp-python.sh      -> prints /path/to/venv/bin/python on stdout
# Env:   KOUBOU_CACHE (default ~/.cache/koubou), PYTHON (default python3)
set -euo pipefail

VERSION="0.3.36"
CACHE="${KOUBOU_CACHE:-$HOME/.cache/koubou}"
PYTHON_BIN="${PYTHON:-python3}"

flags_line="$(grep -m1 '^flags' /proc/cpuinfo || true)"
hash="$(printf '%s' "$flags_line" | sha256sum | cut -c1-12)"
venv="$CACHE/venv-llama-cpp-python-$hash"
py="$venv/bin/python"
stamp="$venv/.koubou-installed-$VERSION"

if [[ -x "$py" && -f "$stamp" ]]; then
    echo "$py"
    exit 0
fi

mkdir -p "$CACHE"
# One installer at a time (another engineer may run this concurrently).
exec 9>"$CACHE/.venv-llama-cpp-python-$hash.lock"
flock 9
if [[ -x "$py" && -f "$stamp" ]]; then
    echo "$py"
    exit 0
fi

echo "ensure-llama-cpp-python: building llama-cpp-python $VERSION in $venv (8-11 min on 2 cores)" >&2
if [[ ! -x "$py" ]]; then
    "$PYTHON_BIN" -m venv "$venv" >&2
fi
"$py" -m pip install --quiet --upgrade pip >&2 || true

# x86-64-v3 for ggml: explicit ISA flags, no native tuning.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DCMAKE_C_FLAGS=-march=x86-64-v3 -DCMAKE_CXX_FLAGS=-march=x86-64-v3}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
unset SOURCE_DATE_EPOCH || true
"$py" -m pip install --no-cache-dir "llama-cpp-python[server]==$VERSION" >&2
"$py" -c 'import llama_cpp, llama_cpp.server' >&2
touch "$stamp"
echo "$py"
