#!/usr/bin/env bash
# Create .venv with the pinned CPU stack (torch's CPU wheel, diffusers, transformers, cog, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
# This checkout itself, editable: scripts and tools import sdxl from here (no sys.path edits anywhere).
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
# open-clip-torch only lends its CLIP BPE vocabulary to the tiny weights; its own dependencies (torchvision) are
# not needed, and PyPI's torchvision does not import beside the CPU torch wheel.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps open-clip-torch==3.3.0
# The browser playground's own environment (.venv-playground), which its tests use; under CI also Debian's chromium
# and chromium-driver for those browser tests.
bash scripts/setup_playground.sh ${CI:+--browser}
# HAProxy (Debian's package) for the load-balancer tests and scripts/cluster.sh; only where apt can install it.
if ! command -v haproxy >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq haproxy) >/dev/null || echo "setup_env: haproxy not installed" >&2
fi
