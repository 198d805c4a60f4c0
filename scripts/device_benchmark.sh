#!/usr/bin/env bash
# The whole GPU benchmark in one command that fits one device lease: wheels, stack check, then every row that
# fits the budget, in order of importance (docs/PERFORMANCE.md says which row sets which default).
#   bash scripts/device_benchmark.sh                      # --budget-s 420 by default, from this script's start
#   bash scripts/device_benchmark.sh --smoke --arch mid   # the same on CPU with small shapes (the tests run this)
# Any other option goes to `python -m tools.bench --mode gpu`. Results: benchmark-gpu.{json,jsonl,md,log} in $OUT
# (or --out DIR, else the current folder), written after every row; the last lines printed are the table.
# Wheels: .whl/ (scripts/device_wheels.sh) is installed into /tmp/sdxl-site when present (not with --smoke);
# PYTHON picks the python (default python3).
set -uo pipefail
started=$(date +%s)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
budget=420
smoke=""
out=${OUT:-.}
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --budget-s) budget=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --smoke) smoke=1; args+=("$1"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done
export PYTHONUNBUFFERED=1
# The whole log comes back too (a device reply holds only the end of the output), even if the run is cut off.
mkdir -p "$out"
exec > >(tee "$out/benchmark-gpu.log") 2>&1

# 1. The wheels the GPU machine lacks (diffusers, peft, the watermark, the CLIP vocabulary), if carried; they are
# built for its python, so a --smoke run uses the python it is given as it is.
if [ -z "$smoke" ] && compgen -G ".whl/*.whl" >/dev/null; then
  site=/tmp/sdxl-site
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || { echo "device_benchmark: installing .whl/*.whl failed" >&2; exit 2; }
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
  echo "device_benchmark: wheels installed in $(( $(date +%s) - started )) s"
fi

# 2. The stack imports together (and CUDA runs), in seconds, before any minute is spent.
timeout 120 "$PYTHON" -m tools.bench.stack_check ${smoke:+--cpu} || {
  echo "device_benchmark: the stack check failed (above); nothing was measured" >&2
  exit 3
}

# 3. Every row that fits what is left of the budget.
left=$(( budget - ($(date +%s) - started) ))
exec "$PYTHON" -m tools.bench --mode gpu --budget-s "$left" --out "$out" ${args[@]+"${args[@]}"}
