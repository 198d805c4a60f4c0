#!/usr/bin/env bash
# Start the container's own Cog HTTP server (coglet) without Docker, on 127.0.0.1.
#   SDXL_WEIGHTS_DIR=/path/to/weights PORT=5000 bash scripts/serve.sh
# Extra arguments go to the server (e.g. --await-explicit-shutdown true). It needs .cog/openapi_schema.json
# (committed; python scripts/make_openapi_schema.py rewrites it) for input validation and /openapi.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"  # the server starts its worker through `python` on PATH
export PORT="${PORT:-5000}"
export COG_PREDICT_TYPE_STUB="${COG_PREDICT_TYPE_STUB:-predict.py:Runner}"
echo "serving ${COG_PREDICT_TYPE_STUB} on http://127.0.0.1:${PORT} (weights: ${SDXL_WEIGHTS_DIR:-./weights})" >&2
exec python -m cog.server.http --host "${HOST:-127.0.0.1}" "$@"
