#!/usr/bin/env bash
# Run the test suite on tiny seeded weights (the tests write them once per run into a temporary folder).
# On a fresh machine it first creates .venv with the pinned stack.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"  # the Cog server starts its worker through `python` on PATH
exec python -m pytest "$@"
