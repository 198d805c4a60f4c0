#!/usr/bin/env bash
# Create .venv-playground for tools/playground/ from tools/playground/requirements.txt (gradio and requests, pinned),
# apart from the model's .venv: the playground only speaks HTTP to a server and never imports the model.
# With --browser (CI passes it), also install Debian's chromium and chromium-driver for the browser tests
# (tests/browser/test_playground.py); without them those tests skip and say why.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--browser" ] && { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-liberation >/dev/null
  else
    echo "setup_playground: chromium and chromium-driver missing; install them (Debian packages) for the browser tests" >&2
  fi
fi

[ -x .venv-playground/bin/python ] || python3 -m venv .venv-playground
.venv-playground/bin/python -m pip install -q --disable-pip-version-check -r tools/playground/requirements.txt
