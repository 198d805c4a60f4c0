#!/usr/bin/env bash
# Generate images with the predictor from the shell: bash scripts/run.sh -i prompt="..." [-i key=value ...] [-o DIR]
# Uses the production weights in $SDXL_WEIGHTS_DIR or ./weights when they are complete; otherwise writes the tiny
# random test weights to ./weights/tiny and uses those (they draw noise; see the README for the real ones).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # sdxl/ and tools/ of this checkout, installed or not
# OpenMP threads that sleep at a barrier instead of spinning: on a CPU shared with other work, spinning threads wait
# for each other at every operation (50 steps of a small UNet at 1024 px, load ~7 on 2 cores: 145 s spinning, 8 s not).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

if [ -z "${SDXL_WEIGHTS_DIR:-}" ]; then
  if python -c 'import sys; from sdxl.model import weights; weights.require(weights.weights_dir())' 2>/dev/null; then
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
# Images go to ./outputs unless -o says otherwise; named by absolute path, so the path printed works from anywhere.
output_given=""
for arg in "$@"; do
  case $arg in -o | -o?* | --output | --output=*) output_given=1 ;; esac
done
[ -n "$output_given" ] || set -- "$@" -o "$PWD/outputs"
exec python scripts/cog_predict.py "$@"
