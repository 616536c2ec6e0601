#!/usr/bin/env bash
# Install with the test extras, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh data,pipeline,test
exec .venv/bin/python -m pytest -q --durations=25 "$@"  # the 25 slowest tests, with their times
