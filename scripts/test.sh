#!/usr/bin/env bash
# Run the tests on tiny seeded weights (the tests write them once per run into a temporary folder).
#   bash scripts/test.sh            everything: what CI runs (~17 min on 2 cores)
#   bash scripts/test.sh --quick    the in-process tier only: tests/ mirroring sdxl/ (+ tests/edge), no servers,
#                                   browsers, accelerate or benchmarks, nor tests marked heavy (about 2 min 50 s on 2 idle cores)
#   bash scripts/test.sh tests/model -x   any pytest arguments
# On a fresh machine it first creates .venv with the pinned stack.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"  # the Cog server starts its worker through `python` on PATH
if [ "${1:-}" = "--quick" ]; then
    shift
    # The in-process tier: one folder per stage of sdxl/, the edges, and the root's tests of the shared vocabulary,
    # less the tests marked heavy (several seconds each; the full run keeps them).
    set -- tests/test_*.py tests/inputs tests/guard tests/model tests/inference tests/output tests/trained \
        tests/preprocess tests/training tests/edge -m "not heavy" "$@"
fi
exec python -m pytest "$@"
