#!/usr/bin/env bash
# Fetch into .whl/ (git-ignored) the wheels the GPU machine lacks for `bash scripts/device_benchmark.sh`, built for
# its Python (CPython 3.12, x86-64 Linux). The machine's image has torch 2.11, transformers 5.17 (our code runs on it:
# the same images as 5.23 on the tiny model), accelerate, safetensors, huggingface_hub 1.33, tokenizers, OpenCV
# (headless), numpy and pillow; it lacks diffusers, PyWavelets and invisible-watermark (the watermark), and
# open-clip-torch (only its CLIP vocabulary file is read, for the random weights' tokenizers, never imported).
# peft is carried too: the image's version is not recorded and the LoRA code is tested against 0.21.2.
# About 15 MB; the device tool carries at most 64 MiB with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PY_VERSION=${PY_VERSION:-3.12}
rm -rf .whl && mkdir .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl \
  diffusers==0.42.1 peft==0.21.2 invisible-watermark==0.2.0 PyWavelets==1.9.0 open-clip-torch==3.3.0
ls .whl
du -sh .whl
