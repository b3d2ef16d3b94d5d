#!/usr/bin/env bash
# Creates (idempotently) a venv with schemathesis (PyPI, pinned) and prints the path of its
# `schemathesis` executable. The REST API's test runs it against a live `koubou serve` and the
# OpenAPI document the server serves at /openapi.json.
#
# Usage: scripts/ensure-schemathesis.sh      -> prints /path/to/venv/bin/schemathesis on stdout
#        export KOUBOU_SCHEMATHESIS="$(scripts/ensure-schemathesis.sh)"
# Env:   KOUBOU_CACHE (default ~/.cache/koubou), PYTHON (default python3)
set -euo pipefail
source "$(dirname "$0")/lib/pip-pinned.sh"

check() { "$1" --version; }
pip_pinned schemathesis schemathesis 4.32.5 bin/schemathesis check
