#!/usr/bin/env bash
# The main job: install, then run the whole Flexi-JEST++ pipeline locally (KFP local execution, MLflow in
# runs/pipeline/mlflow.db, data beside the KFP artifacts) on the tiny profile and generated shapes data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh data,pipeline
exec .venv/bin/python pipelines/flexi_jest_pp.py run-local --workdir runs/pipeline "$@"
