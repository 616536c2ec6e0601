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
if [[ ",${extras}," == *",test,"* ]]; then
  # img2dataset writes the tests' img2dataset-layout pool; its webdataset<0.3 pin conflicts with webdataset>=1.0
  # (it uses only TarWriter, which 1.x keeps), so it is installed without its pins (its dependencies: the test extra)
  .venv/bin/python -m pip install -q --no-deps "img2dataset==1.47"
fi
