"""MLflow tracking and the model registry: the one module of the library that talks to MLflow.

One parent run per pipeline run, a nested run per stage (linked by the `mlflow.parentRunId` tag, so
stages running in separate processes or pods nest correctly). Params are the stage's config,
flattened; metrics are the result's numbers and the training curves; artifacts are the config and
result JSON, plots and the model.

Where MLflow lives: MLFLOW_TRACKING_URI from the environment (a cluster's tracking server), else a
local SQLite store `mlflow.db` in the working directory (the embedded default).

Promotion: a registered version gets the alias `champion` only if its eval metric beats the
current champion's (recorded as a version tag); otherwise it gets `challenger`.
"""

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

DEFAULT_EXPERIMENT = "flexi-jest"
LEARNER_MODEL = "flexi-jest-learner"
REFERENCE_MODEL = "flexi-jest-reference"
METRIC_TAG = "eval_metric"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else sqlite:///<cwd>/mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _mlflow():
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no calls home from clusters or laptops
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}; lists become JSON strings."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def numeric_metrics(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) result dict, flattened, as MLflow metrics."""
    out: dict[str, float] = {}
    for key, value in flatten(values, prefix).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if value == value and abs(value) != float("inf"):
            out[key] = float(value)
    return out


def start_pipeline_run(run_name: str, params: dict[str, Any], experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Create the parent run of one pipeline run; returns its run id (left open for the stages)."""
    mlflow = _mlflow()
    mlflow.set_experiment(experiment)
    client = mlflow.MlflowClient()
    experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
    run = client.create_run(experiment_id, run_name=run_name, tags={"flexi_jest.kind": "pipeline"})
    for key, value in flatten(params).items():
        client.log_param(run.info.run_id, key, value)
    return run.info.run_id


def finish_pipeline_run(run_id: str, status: str = "FINISHED") -> None:
    _mlflow().MlflowClient().set_terminated(run_id, status=status)


def find_pipeline_run(run_name: str, experiment: str = DEFAULT_EXPERIMENT):
    """The newest parent run named run_name, or None."""
    client = _mlflow().MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], f"attributes.run_name = '{run_name}' and tags.flexi_jest.kind = 'pipeline'",
                              max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def finish_pipeline_run_named(run_name: str, experiment: str = DEFAULT_EXPERIMENT, status: str = "FINISHED") -> bool:
    """End the parent run named run_name (the exit handler knows the name, not the id); False if there is none."""
    run = find_pipeline_run(run_name, experiment)
    if run is None:
        return False
    finish_pipeline_run(run.info.run_id, status)
    return True


def log_to_pipeline_run(pipeline_run: str, experiment: str, figures: dict[str, Any] | None = None,
                        data: dict[str, dict[str, Any]] | None = None, metrics: dict[str, float] | None = None) -> str:
    """Log figures (name -> matplotlib Figure), JSON artifacts (name -> dict) and metrics on the pipeline's
    parent run (found by its unique name), where a pipeline run's overall results belong; returns its id."""
    client = _mlflow().MlflowClient()
    parent = find_pipeline_run(pipeline_run, experiment)
    if parent is None:
        raise LookupError(f"no MLflow pipeline run named {pipeline_run!r} in experiment {experiment!r} at {tracking_uri()}")
    run_id = parent.info.run_id
    for name, figure in (figures or {}).items():
        client.log_figure(run_id, figure, name)
    for name, value in (data or {}).items():
        client.log_dict(run_id, value, name)
    for key, value in numeric_metrics(metrics or {}).items():
        client.log_metric(run_id, key, value)
    return run_id


def parent_tags(pipeline_run: str | None, experiment: str) -> dict[str, str]:
    """Tags nesting a run under the pipeline's parent run, found by its unique name (stages know the name,
    a pipeline parameter, which every stage gets reliably; the id is only known at run time)."""
    if not pipeline_run:
        return {}
    parent = find_pipeline_run(pipeline_run, experiment)
    if parent is None:
        raise LookupError(f"no MLflow pipeline run named {pipeline_run!r} in experiment {experiment!r} at {tracking_uri()}")
    return {"mlflow.parentRunId": parent.info.run_id}


@contextmanager
def stage_run(pipeline_run: str | None, stage: str, config: BaseModel, experiment: str = DEFAULT_EXPERIMENT) -> Iterator[Any]:
    """A run for one stage, nested under the pipeline's parent run; logs the config as params and artifact."""
    mlflow = _mlflow()
    mlflow.set_experiment(experiment)
    tags = {"flexi_jest.stage": stage, **parent_tags(pipeline_run, experiment)}
    with mlflow.start_run(run_name=stage, tags=tags) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(config.model_dump()).items()})
        mlflow.log_dict(config.model_dump(), "config.json")
        yield run


def log_result(result: BaseModel, prefix: str = "") -> None:
    """Log a stage result: its numbers as metrics, the whole of it as result.json."""
    mlflow = _mlflow()
    mlflow.log_metrics(numeric_metrics(result.model_dump(), prefix))
    mlflow.log_dict(result.model_dump(), "result.json")


def log_history(metrics_path: str) -> None:
    """Log a training run's JSON-lines history as step-indexed metrics (loss, FLOPs, selection stats...)."""
    from flexi_jest import storage

    mlflow = _mlflow()
    for line in storage.read_bytes(metrics_path).decode().splitlines():
        record = json.loads(line)
        step = int(record.pop("step"))
        mlflow.log_metrics(numeric_metrics(record), step=step)


def log_figure(figure, name: str) -> None:
    _mlflow().log_figure(figure, name)


def log_model(model) -> None:
    """Log a DualEncoder as the active run's MLflow PyTorch model `model` (runs:/<id>/model registers it)."""
    _mlflow()
    import mlflow.pytorch

    mlflow.pytorch.log_model(model.cpu(), name="model", serialization_format="pickle",
                             pip_requirements=[f"flexi-jest=={_version()}"])


def _version() -> str:
    from flexi_jest import __version__
    return __version__


class PromotionDecision(BaseModel):
    model_name: str
    version: str
    metric: str
    value: float
    champion_version: str | None
    champion_value: float | None
    promoted: bool
    alias: str


def promote(model_name: str, version: str, metric: str, value: float, higher_is_better: bool = True) -> PromotionDecision:
    """Move `champion` to this version if it beats the current champion on `metric`, else mark it `challenger`."""
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    client.set_model_version_tag(model_name, version, METRIC_TAG, f"{metric}={value}")
    try:
        champion = client.get_model_version_by_alias(model_name, "champion")
    except mlflow.exceptions.MlflowException:
        champion = None
    champion_value = None
    if champion is not None and str(champion.version) != str(version):
        tag = champion.tags.get(METRIC_TAG, "")
        name, _, number = tag.partition("=")
        champion_value = float(number) if name == metric and number else None
    better = champion_value is None or (value > champion_value if higher_is_better else value < champion_value)
    alias = "champion" if better else "challenger"
    client.set_registered_model_alias(model_name, alias, version)
    return PromotionDecision(model_name=model_name, version=str(version), metric=metric, value=value,
                             champion_version=str(champion.version) if champion is not None else None,
                             champion_value=champion_value, promoted=better, alias=alias)


def write_json_artifact(data: dict[str, Any], name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(data, indent=1))
        _mlflow().log_artifact(str(path))
