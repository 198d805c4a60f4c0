#!/usr/bin/env bash
# Create .venv with the pinned CPU stack (torch's CPU wheel, diffusers, transformers, cog, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
# open-clip-torch only lends its CLIP BPE vocabulary to the tiny weights; its own dependencies (torchvision) are
# not needed, and PyPI's torchvision does not import beside the CPU torch wheel.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps open-clip-torch==3.3.0
# The browser playground's own environment (.venv-playground), which its tests use; under CI also Debian's chromium
# and chromium-driver for those browser tests.
bash scripts/setup_playground.sh ${CI:+--browser}
