#!/usr/bin/env bash
# Create .venv (if missing) and install flexi-jest with the given extras. Usage: scripts/setup.sh data,test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-data}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch/torchvision are pinned in pyproject.toml (2.14.1 / 0.29.1: on this project's machines they install from local files)
.venv/bin/python -m pip install -q -e ".[${extras}]"
