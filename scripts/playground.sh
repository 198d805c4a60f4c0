#!/usr/bin/env bash
# Try the model in a browser: start the container's Cog server (predictions on 127.0.0.1:5000, trainings on :5001)
# and the playground on http://127.0.0.1:7860, all on this machine only. Ctrl-C stops all three.
# Uses the production weights in $SDXL_WEIGHTS_DIR or ./weights when complete, else the tiny random test weights.
#   bash scripts/playground.sh                      # PORT, TRAIN_PORT, PLAYGROUND_PORT, FILES_PORT change the ports
#   PLAYGROUND_AUTH=user:password bash scripts/playground.sh   # Gradio's login form in front of the page
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup_env.sh
[ -x .venv-playground/bin/python ] || bash scripts/setup_playground.sh
export PATH="$PWD/.venv/bin:$PATH"  # the Cog server starts its worker through `python` on PATH
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # sdxl/ and tools/ of this checkout, installed or not

if [ -z "${SDXL_WEIGHTS_DIR:-}" ]; then
  if python -c 'from sdxl.model import weights; weights.require(weights.weights_dir())' 2>/dev/null; then
    export SDXL_WEIGHTS_DIR="$PWD/weights"
  else
    export SDXL_WEIGHTS_DIR="$PWD/weights/tiny"
    [ -f "$SDXL_WEIGHTS_DIR/RANDOM_WEIGHTS.json" ] || python scripts/make_tiny_weights.py "$SDXL_WEIGHTS_DIR" >/dev/null
    echo "No production weights: using the TINY RANDOM test weights in $SDXL_WEIGHTS_DIR (they draw noise)." >&2
  fi
fi

PORT="${PORT:-5000}" TRAIN_PORT="${TRAIN_PORT:-5001}" PLAYGROUND_PORT="${PLAYGROUND_PORT:-7860}"
FILES_PORT="${FILES_PORT:-7861}"
LOGS="$(mktemp -d -t sdxl-playground-logs.XXXXXX)"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT INT TERM

# The playground serves trained tars on its own loopback port: this server may fetch plain http from that port
# only (never from its own or the trainer's port).
SDXL_ALLOW_LOOPBACK_HTTP_PORTS="$FILES_PORT" PORT="$PORT" COG_PREDICT_TYPE_STUB=predict.py:Runner \
  python -m cog.server.http --host 127.0.0.1 >"$LOGS/predict.log" 2>&1 &
pids+=($!)
PORT="$TRAIN_PORT" COG_TRAIN_TYPE_STUB=train.py:train \
  python -m cog.server.http --host 127.0.0.1 --x-mode train >"$LOGS/train.log" 2>&1 &
pids+=($!)
echo "Cog servers starting (logs in $LOGS); the playground waits for them." >&2

.venv-playground/bin/python -m tools.playground --server "http://127.0.0.1:$PORT" \
  --train-server "http://127.0.0.1:$TRAIN_PORT" --port "$PLAYGROUND_PORT" \
  --files-port "$FILES_PORT" "$@" &
pids+=($!)
wait "${pids[2]}"
