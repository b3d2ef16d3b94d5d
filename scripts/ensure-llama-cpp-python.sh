#!/usr/bin/env bash
# Creates (idempotently) a venv with llama-cpp-python[server]==0.3.36 and prints its python.
#
# Built the way `pip install 'llama-cpp-python[server]'` builds it for a user on this machine:
# no CMAKE_ARGS, so llama.cpp compiles with its defaults — GGML_NATIVE, i.e. -march=native, with
# AVX-512 where the CPU has it. That is the reference Koubou's embedded model is compared with.
# Such a build dies with SIGILL on a CPU without those instructions, so the venv is cached per
# CPU signature (scripts/cpu-signature.sh): another CPU gets its own venv, built there.
#
# What "stock" leaves out from the caller's environment: CMAKE_ARGS (would change the build
# without changing the cache key) and SOURCE_DATE_EPOCH (reproducible-build setups set it; ggml
# then turns GGML_NATIVE off and builds plain SSE). pip's wheel cache is bypassed: it is keyed by
# the source, not the CPU, and would hand this machine a wheel compiled for another.
#
# Usage: scripts/ensure-llama-cpp-python.sh      -> prints /path/to/venv/bin/python on stdout
# Env:   KOUBOU_CACHE (default ~/.cache/koubou), PYTHON (default python3)
set -euo pipefail

VERSION="0.3.36"
CACHE="${KOUBOU_CACHE:-$HOME/.cache/koubou}"
PYTHON_BIN="${PYTHON:-python3}"

sig="$("$(dirname "$0")/cpu-signature.sh")"
venv="$CACHE/venv-llama-cpp-python-$VERSION-$sig"
py="$venv/bin/python"
stamp="$venv/.koubou-installed"

if [[ -x "$py" && -f "$stamp" ]]; then
    echo "$py"
    exit 0
fi

mkdir -p "$CACHE"
# One installer at a time (another engineer may run this concurrently).
exec 9>"$CACHE/.venv-llama-cpp-python-$VERSION-$sig.lock"
flock 9
if [[ -x "$py" && -f "$stamp" ]]; then
    echo "$py"
    exit 0
fi

echo "ensure-llama-cpp-python: building llama-cpp-python $VERSION for this CPU ($sig) in $venv (8-11 min on 2 cores)" >&2
if [[ ! -x "$py" ]]; then
    "$PYTHON_BIN" -m venv "$venv" >&2
fi
"$py" -m pip install --quiet --upgrade pip >&2 || true

unset CMAKE_ARGS SOURCE_DATE_EPOCH || true
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
"$py" -m pip install --no-cache-dir "llama-cpp-python[server]==$VERSION" >&2
"$py" -c 'import llama_cpp.server' >&2
# What ggml really uses on this CPU (AVX512 = 1 …), for the benchmark's report.
"$py" -c 'import llama_cpp; print(llama_cpp.llama_print_system_info().decode())' >"$venv/.koubou-system-info"
cat "$venv/.koubou-system-info" >&2
touch "$stamp"
echo "$py"
