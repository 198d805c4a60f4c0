#!/usr/bin/env bash
# Fetch, into .whl/ (git-ignored), the wheels a CUDA machine without internet needs on top of its own PyTorch image
# to run `scripts/benchmark.py --mode gpu`: our pinned diffusers/transformers/peft, the watermark and its wavelets,
# and open-clip-torch (only its CLIP vocabulary file is read, for the random weights' tokenizers).
# Pure-Python wheels except PyWavelets; built for CPython 3.12 on x86-64 Linux. Install there with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PY_VERSION=${PY_VERSION:-3.12}
rm -rf .whl && mkdir .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl \
  diffusers==0.42.1 transformers==5.23.0 peft==0.21.2 invisible-watermark==0.2.0 PyWavelets==1.9.0 \
  open-clip-torch==3.3.0
du -sh .whl
