#!/usr/bin/env bash
# Generate images with the predictor from the shell: bash scripts/run.sh -i prompt="..." [-i key=value ...] [-o DIR]
# Uses the production weights in $SDXL_WEIGHTS_DIR or ./weights when they are complete; otherwise writes the tiny
# random test weights to ./weights/tiny and uses those (they draw noise; see the README for the real ones).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"

if [ -z "${SDXL_WEIGHTS_DIR:-}" ]; then
  if python -c 'import sys; from sdxl import weights; weights.require(weights.weights_dir())' 2>/dev/null; then
    export SDXL_WEIGHTS_DIR="$PWD/weights"
  else
    export SDXL_WEIGHTS_DIR="$PWD/weights/tiny"
    [ -f "$SDXL_WEIGHTS_DIR/RANDOM_WEIGHTS.json" ] || python scripts/make_tiny_weights.py "$SDXL_WEIGHTS_DIR" >/dev/null
    cat >&2 <<MSG
No production weights in ./weights: using the TINY RANDOM test weights in $SDXL_WEIGHTS_DIR.
They exercise every code path but draw coloured noise, not pictures. For real images run
  .venv/bin/python scripts/download_weights.py   (needs internet, about 13 GB; a GPU is strongly advised)
MSG
  fi
fi
exec python scripts/cog_predict.py "$@"
