#!/usr/bin/env bash
# Run the test suite on tiny seeded weights (written once per run into a temporary folder by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"  # the Cog server starts its worker through `python` on PATH
exec python -m pytest "$@"
