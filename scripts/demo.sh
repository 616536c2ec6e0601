#!/usr/bin/env bash
# The main job: install, then run every stage end to end on generated data (tiny profile) and print the result table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh data,pipeline
exec .venv/bin/flexi-jest demo --workdir runs/demo "$@"
