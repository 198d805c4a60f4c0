#!/usr/bin/env bash
# The GPU benchmark on a CUDA machine without internet that has its own PyTorch, in parts that each fit a
# 10-minute command. Carry .whl/ (scripts/device_wheels.sh) along; the full-size random weights are written once
# to $SDXL_BENCH_WEIGHTS (default /tmp/sdxl-full, ~14 GB) and reused by the next part while the machine is held.
#   bash scripts/device_benchmark.sh runs                                # cold start, every run, LoRA switch
#   bash scripts/device_benchmark.sh variants direct_load bf16 vae_upcast channels_last fused_qkv xformers
#   bash scripts/device_benchmark.sh variants compile compile_without_lora_slots
# Results: gpu-<part>.json and .md in $OUT (or the current folder).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /tmp/site/diffusers ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
part=$1
shift
out=${OUT:-.}
name=gpu-$part${1:+-$1}
python3 scripts/benchmark.py --mode gpu --repeats "${REPEATS:-3}" --weights-dir "${SDXL_BENCH_WEIGHTS:-/tmp/sdxl-full}" \
  --parts "$part" ${1:+--variants "$@"} --json "$out/$name.json" | tee "$out/$name.md"
