"""MLflow tracking and the model registry: the one module of the library that talks to MLflow.

One parent run per pipeline run, a nested run per stage (linked by the `mlflow.parentRunId` tag, so
stages running in separate processes or pods nest correctly). Params are the stage's config,
flattened; metrics are the result's numbers and the training curves; artifacts are the config and
result JSON, plots and the model.

Where MLflow lives: MLFLOW_TRACKING_URI from the environment (a cluster's tracking server), else a
local SQLite store `mlflow.db` in the working directory (the embedded default).

Promotion: a registered version gets the alias `champion` only if it beats the current champion under
the champion rule (config.ChampionRule: metric by name, direction, minimum margin) on a metric both were
evaluated on (recorded as version tags); otherwise it gets `challenger`. The dethroned version gets
`previous-champion`, which `flexi-jest rollback` restores.

A tracking server that stops answering: MLflow's HTTP retries are bounded (HTTP_RETRY_DEFAULTS, unless the
environment sets MLFLOW_HTTP_REQUEST_*), said on stderr while they run, and a stage's run is closed on the
way out (tracked_run): FAILED with the error tagged, once the server is back (waiting a bounded time).
"""

import contextlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

DEFAULT_EXPERIMENT = "flexi-jest"
LEARNER_MODEL = "flexi-jest-learner"
REFERENCE_MODEL = "flexi-jest-reference"
LEGACY_METRIC_TAG = "eval_metric"  # "<metric>=<value>": read only, on versions promoted before 8453f28


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else sqlite:///<cwd>/mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _mlflow():
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no calls home from clusters or laptops
    bound_http_retries()
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


# ---- an unreachable tracking server: bounded retries, said out loud, runs closed on the way out -------------------

# MLflow's own defaults retry a failed request 7 times, backing off 2, 4, ... 120 s, each try waiting up to 120 s:
# a stage whose server died sat silent for minutes per request. Unless these are set, the stages use:
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
CLOSE_WAIT_ENV = "FLEXI_JEST_MLFLOW_CLOSE_WAIT"  # seconds a stage waits for the server to mark its run (120)
FAILURE_TAG = "flexi_jest.failure"  # on a FAILED stage run: the error that ended it, one line


class TrackingUnavailable(ConnectionError):
    """The MLflow tracking server did not answer within the retry bounds (retry_seconds)."""


def retry_seconds() -> float:
    """About how long MLflow's client retries one request under the current MLFLOW_HTTP_REQUEST_* settings: the
    backoff sleeps before its R retries (urllib3's: 0, 2f, 4f, ... 120 s at most, plus up to the jitter) and R + 1
    tries of up to the timeout each. A refused connection (a dead server on a live host) costs the sleeps alone."""
    retries = int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", 7))
    factor = float(os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", 2))
    jitter = float(os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", 1.0))
    timeout = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", 120))
    sleeps = sum(min(120.0, factor * 2 ** (k - 1)) + jitter for k in range(2, retries + 1))
    return sleeps + (retries + 1) * timeout


class _RetryNotice(logging.Handler):
    """Says on stderr, once per outage, that the tracking server is unreachable and for how long the client retries.
    urllib3 logs each retry of a broken connection as a warning to a logger with no handler: MLflow's retries
    were silent. Only requests to MLflow's REST API (/api/2.0/mlflow/...) are reported."""

    MLFLOW_PATH = re.compile(r"/(ajax-)?api/\d\.\d/mlflow")

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.said_at = -math.inf

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        if not (str(record.msg).startswith("Retrying") and len(args) == 3 and self.MLFLOW_PATH.search(str(args[2]))):
            return
        now = time.monotonic()
        if now - self.said_at < retry_seconds():
            return
        self.said_at = now
        reason = failure_reason(str(args[1]))
        print(f"[mlflow] the tracking server at {tracking_uri()} is unreachable ({reason}); retrying for at most "
              f"{retry_seconds():.0f} s (MLFLOW_HTTP_REQUEST_MAX_RETRIES, _BACKOFF_FACTOR, _TIMEOUT)",
              file=sys.stderr, flush=True)


_RETRY_NOTICE = _RetryNotice()


def bound_http_retries() -> float:
    """Set HTTP_RETRY_DEFAULTS where the environment does not set them, and have retries said on stderr; returns
    retry_seconds()."""
    for name, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(name, value)
    connection_log = logging.getLogger("urllib3.connectionpool")
    if _RETRY_NOTICE not in connection_log.handlers:
        connection_log.addHandler(_RETRY_NOTICE)
    return retry_seconds()


def connection_failure(exc: BaseException) -> bool:
    """Whether exc (an MlflowException or what it wraps) is the tracking server not answering: a refused, reset or
    timed-out connection, or retries exhausted on 5xx answers."""
    import requests

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (TrackingUnavailable, requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                            requests.exceptions.RetryError)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:2000]


def unavailable(what: str, exc: BaseException, closing: str = "") -> TrackingUnavailable:
    """The one-line error for a tracking server that stopped answering during `what`."""
    return TrackingUnavailable(f"the MLflow tracking server at {tracking_uri()} did not answer during {what} "
                               f"({failure_reason(str(exc))}, after retrying for up to {retry_seconds():.0f} s)"
                               f"{closing}")


def failure_reason(text: str) -> str:
    """The cause in an HTTP client's error text, short: '[Errno 111] Connection refused', 'Read timed out', ..."""
    found = re.search(r"\[Errno -?\d+\] [^'\"()]+|Read timed out|Connection aborted|Remote end closed connection"
                      r"|too many \d{3} error responses", text)
    return found.group(0).strip() if found else " ".join(text.split())[:200]


def close_wait_seconds() -> float:
    return float(os.environ.get(CLOSE_WAIT_ENV, 120))


def end_run(run_id: str, status: str, failure: str = "", server_down: bool = False) -> bool:
    """End run_id (the active run) as status ("FINISHED", "FAILED"), with the error that ended it as the tag
    FAILURE_TAG. If the tracking server does not answer (or server_down: it just failed to), wait for it to
    come back, at most close_wait_seconds(), trying every second, so that the run is not left RUNNING; says
    so on stderr. Returns whether the run was marked."""
    import mlflow

    client = mlflow.MlflowClient()

    def mark() -> None:
        client.set_terminated(run_id, status)
        if failure:
            client.set_tag(run_id, FAILURE_TAG, failure[:5000])

    active = mlflow.active_run()
    try:
        if active is not None and active.info.run_id == run_id:  # off the active-run stack first, then marked
            with at_most_once() if server_down else contextlib.nullcontext():
                mlflow.end_run(status)
            if failure:
                client.set_tag(run_id, FAILURE_TAG, failure[:5000])
        else:
            mark()
        return True
    except Exception as exc:
        if not connection_failure(exc):
            print(f"[mlflow] could not mark run {run_id} {status}: {one_line(exc)}", file=sys.stderr, flush=True)
            return False
    wait = close_wait_seconds()
    print(f"[mlflow] waiting at most {wait:.0f} s for the tracking server at {tracking_uri()} to come back, to mark "
          f"run {run_id} {status} ({CLOSE_WAIT_ENV})", file=sys.stderr, flush=True)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        time.sleep(1.0)
        try:
            with at_most_once():
                mark()
        except Exception as exc:
            if connection_failure(exc):
                continue
            print(f"[mlflow] could not mark run {run_id} {status}: {one_line(exc)}", file=sys.stderr, flush=True)
            return False
        print(f"[mlflow] the tracking server is back: run {run_id} marked {status}", file=sys.stderr, flush=True)
        return True
    print(f"[mlflow] the tracking server at {tracking_uri()} did not come back within {wait:.0f} s: run {run_id} is "
          "left RUNNING", file=sys.stderr, flush=True)
    return False


@contextmanager
def tracked_run(run_name: str, tags: dict[str, str], experiment: str = DEFAULT_EXPERIMENT) -> Iterator[Any]:
    """mlflow.start_run for a stage, closed on the way out whatever happens: FINISHED, or FAILED with the error as
    the tag FAILURE_TAG (end_run: waiting for a server that stopped answering). A server that does not answer
    is a TrackingUnavailable saying what happened to the run."""
    mlflow = _mlflow()
    try:
        mlflow.set_experiment(experiment)
        run = mlflow.start_run(run_name=run_name, tags=tags)
    except Exception as exc:
        if connection_failure(exc):
            raise unavailable(f"the start of {run_name}'s run", exc) from None
        raise
    run_id = run.info.run_id
    try:
        yield run
    except BaseException as exc:
        down = connection_failure(exc)
        marked = end_run(run_id, "FAILED", one_line(exc), server_down=down)
        if down:
            raise unavailable(f"{run_name}", exc, f"; what it wrote to storage is kept; its run {run_id} "
                              + ("was marked FAILED" if marked else "is left RUNNING")) from None
        raise
    if not end_run(run_id, "FINISHED"):
        raise TrackingUnavailable(f"{run_name} finished, but its MLflow run {run_id} at {tracking_uri()} could not "
                                  "be marked FINISHED: it is left RUNNING")


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


KFP_RUN_TAG = "flexi_jest.kfp_run_id"
OUTPUT_TAG = "flexi_jest.output."  # + name: the storage URI (or sha256) of a stage output, on the parent run
STAGE_TAG = "flexi_jest.stage_run."  # + stage: the MLflow run holding that stage's work, on the parent run


def start_pipeline_run(run_name: str, params: dict[str, Any], experiment: str = DEFAULT_EXPERIMENT,
                       kfp_run_id: str = "") -> str:
    """Create the parent run of one pipeline run, tagged with the KFP run ID; returns its MLflow run id (left
    open for the stages). run_name is a label for people, never a key: runs are found by id."""
    mlflow = _mlflow()
    mlflow.set_experiment(experiment)
    client = mlflow.MlflowClient()
    experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
    tags = {"flexi_jest.kind": "pipeline", **({KFP_RUN_TAG: kfp_run_id} if kfp_run_id else {})}
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    for key, value in flatten(params).items():
        client.log_param(run.info.run_id, key, value)
    return run.info.run_id


def finish_pipeline_run(run_id: str, status: str = "FINISHED") -> None:
    _mlflow().MlflowClient().set_terminated(run_id, status=status)


def find_pipeline_run(run_ref: str, experiment: str | None = None):
    """The MLflow parent run of a pipeline run, by its KFP run ID (the tag start_pipeline_run wrote) or by its
    own MLflow run id; None if there is none. Never by name: two runs may share a name."""
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        experiment_ids = [found.experiment_id] if found is not None else []
    else:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if experiment_ids:
        runs = client.search_runs(experiment_ids, f"tags.`{KFP_RUN_TAG}` = '{run_ref}'", max_results=2)
        if len(runs) > 1:
            raise LookupError(f"two MLflow runs are tagged with KFP run {run_ref!r}: {[r.info.run_id for r in runs]}")
        if runs:
            return runs[0]
    try:
        run = client.get_run(run_ref)
    except mlflow.exceptions.MlflowException:
        return None
    return run if run.data.tags.get("flexi_jest.kind") == "pipeline" else None


def pipeline_run_or_fail(run_ref: str, experiment: str | None = None):
    run = find_pipeline_run(run_ref, experiment)
    if run is None:
        where = f" in experiment {experiment!r}" if experiment else ""
        raise LookupError(f"no MLflow pipeline run with KFP run ID or MLflow run id {run_ref!r}{where} at {tracking_uri()}")
    return run


def finish_pipeline_run_of(kfp_run_id: str, experiment: str = DEFAULT_EXPERIMENT, status: str = "FINISHED") -> bool:
    """End the parent run of KFP run kfp_run_id (the exit handler knows the KFP run ID); False if there is none."""
    run = find_pipeline_run(kfp_run_id, experiment)
    if run is None:
        return False
    finish_pipeline_run(run.info.run_id, status)
    return True


def log_to_pipeline_run(parent_run_id: str, figures: dict[str, Any] | None = None,
                        data: dict[str, dict[str, Any]] | None = None, metrics: dict[str, float] | None = None) -> str:
    """Log figures (name -> matplotlib Figure), JSON artifacts (name -> dict) and metrics on the pipeline's
    parent run, where a pipeline run's overall results belong; returns its id."""
    client = _mlflow().MlflowClient()
    run_id = pipeline_run_or_fail(parent_run_id).info.run_id
    for name, figure in (figures or {}).items():
        client.log_figure(run_id, figure, name)
    for name, value in (data or {}).items():
        client.log_dict(run_id, value, name)
    for key, value in numeric_metrics(metrics or {}).items():
        client.log_metric(run_id, key, value)
    return run_id


def parent_tags(parent_run_id: str | None) -> dict[str, str]:
    """Tags nesting a run under the pipeline's parent run (given by its MLflow run id or KFP run ID)."""
    if not parent_run_id:
        return {}
    return {"mlflow.parentRunId": pipeline_run_or_fail(parent_run_id).info.run_id}


def record_stage(parent_run_id: str, stage: str, stage_run_id: str, outputs: dict[str, str]) -> bool:
    """Attach a stage's MLflow run to the pipeline's parent run and record its outputs' URIs on the parent (tags
    flexi_jest.output.<name>), from which a later run resolves them (resolve_outputs). A stage computed for
    this pipeline run is nested under the parent; one KFP took from its cache (a run already nested under an
    earlier pipeline run) stays where it is, and a child run `<stage> (cached)` pointing at it is nested here.
    Returns whether the stage came from the cache."""
    client = _mlflow().MlflowClient()
    parent = pipeline_run_or_fail(parent_run_id)
    stage_run = client.get_run(stage_run_id)
    owner = stage_run.data.tags.get("mlflow.parentRunId")
    cached = owner is not None and owner != parent.info.run_id
    if owner is None:
        client.set_tag(stage_run_id, "mlflow.parentRunId", parent.info.run_id)
    elif cached:
        reused = client.create_run(parent.info.experiment_id, run_name=f"{stage} (cached)", tags={
            "mlflow.parentRunId": parent.info.run_id, "flexi_jest.stage": stage, "flexi_jest.cached": "true",
            "flexi_jest.reused_run_id": stage_run_id})
        client.set_terminated(reused.info.run_id)
    client.set_tag(parent.info.run_id, f"{STAGE_TAG}{stage}", stage_run_id)
    client.set_tag(parent.info.run_id, f"flexi_jest.cached.{stage}", str(cached).lower())
    for name, value in outputs.items():
        client.set_tag(parent.info.run_id, f"{OUTPUT_TAG}{name}", value)
    return cached


def recorded_outputs(run_ref: str, experiment: str | None = None) -> dict[str, str]:
    """The stage outputs a pipeline run recorded (record_stage), by name: {"pool": uri, "reference": uri, ...};
    the run given by its KFP run ID or its MLflow parent run id."""
    return outputs_of(pipeline_run_or_fail(run_ref, experiment))


def outputs_of(parent: Any) -> dict[str, str]:
    """recorded_outputs of a pipeline's parent run already looked up (an mlflow Run)."""
    tags = parent.data.tags
    outputs = {key[len(OUTPUT_TAG):]: value for key, value in tags.items() if key.startswith(OUTPUT_TAG)}
    stages = {key[len(STAGE_TAG):]: value for key, value in tags.items() if key.startswith(STAGE_TAG)}
    return {**outputs, **{f"{stage}.mlflow_run_id": run_id for stage, run_id in stages.items()},
            "parent_run_id": parent.info.run_id}


@contextmanager
def stage_run(parent_run_id: str | None, stage: str, config: BaseModel, experiment: str = DEFAULT_EXPERIMENT) -> Iterator[Any]:
    """A run for one stage, nested under the pipeline's parent run if given (a pipeline's cached stages are
    attached afterwards by record_stage); logs the config as params and artifact. Closed on the way out
    (tracked_run): FINISHED, or FAILED with the error tagged, also when the server stopped answering mid-stage."""
    mlflow = _mlflow()
    try:
        tags = {"flexi_jest.stage": stage, **parent_tags(parent_run_id)}
    except Exception as exc:
        if connection_failure(exc):
            raise unavailable(f"the start of {stage}", exc) from None
        raise
    with tracked_run(stage, tags, experiment) as run:
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


LINEAGE_PREFIX = "lineage."  # run tags (train stages) copied onto registered model versions (promote)


def example_image_base64(size: int) -> str:
    """A grey size x size PNG, base64: the registered model's input example."""
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def model_signature():
    """The pyfunc's signature: `image` (base64 image files) and/or `text` in; their embeddings out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "image", required=False), ColSpec(DataType.string, "text", required=False)]),
        outputs=Schema([ColSpec(Array(DataType.double), "image_embedding", required=False),
                        ColSpec(Array(DataType.double), "text_embedding", required=False)]),
    )


def log_model(model, lineage: dict[str, Any] | None = None, datasets: dict[str, str] | None = None) -> None:
    """Log a DualEncoder on the active run as the MLflow model `model` (runs:/<id>/model registers it): a pyfunc
    (flexi_jest/models/pyfunc_model.py, which needs open_clip but not flexi_jest) over the model's open_clip
    export (the artifact `open_clip`: config JSON + weights-only state_dict), with a signature and an input
    example. lineage: recorded as run tags `lineage.<key>` (promote copies them onto the registered
    version); datasets: {name: URI} logged as the run's dataset inputs (mlflow.log_input)."""
    import importlib.metadata

    mlflow = _mlflow()
    import pandas as pd
    import torch

    from flexi_jest.export import export_open_clip
    from flexi_jest.models import pyfunc_model

    log_lineage(lineage or {}, datasets or {})
    example = pd.DataFrame({"image": [example_image_base64(model.cfg.image_size)], "text": ["a photo of a thing"]})
    requirements = [f"open_clip_torch=={importlib.metadata.version('open_clip_torch')}",
                    f"torch=={torch.__version__.split('+')[0]}", "pillow", "pandas"]
    with tempfile.TemporaryDirectory() as tmp:
        export_open_clip(model.cpu(), tmp)
        mlflow.pyfunc.log_model(name="model", python_model=pyfunc_model.__file__,
                                artifacts={pyfunc_model.ARTIFACT: tmp}, signature=model_signature(),
                                input_example=example, pip_requirements=requirements)


def log_lineage(lineage: dict[str, Any], datasets: dict[str, str]) -> None:
    """Tags `lineage.<key>` (dicts as JSON) and dataset inputs (name -> URI, context training) on the active run."""
    mlflow = _mlflow()
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    tags = {f"{LINEAGE_PREFIX}{k}": (json.dumps(v) if isinstance(v, (dict, list)) else str(v))[:5000]
            for k, v in lineage.items() if v is not None}
    tags.update({f"{LINEAGE_PREFIX}{name}_uri": uri for name, uri in datasets.items()})
    mlflow.set_tags(tags)
    for name, uri in datasets.items():
        mlflow.log_input(MetaDataset(resolve_dataset_source(uri), name=name), context="training")


def tag_version(model_name: str, version: str, run_id: str, metrics: dict[str, float]) -> dict[str, str]:
    """Lineage on a registered version: the run's `lineage.*` tags and the eval metrics by name (eval.<name>)."""
    client = _mlflow().MlflowClient()
    run_tags = client.get_run(run_id).data.tags
    tags = {k: v for k, v in run_tags.items() if k.startswith(LINEAGE_PREFIX)}
    tags.update({f"eval.{name}": str(value) for name, value in metrics.items()})
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    return tags


def register_once(model_name: str, run_id: str) -> str:
    """The registry version of runs:/<run_id>/model under model_name, registered now if it is not yet: a stage
    KFP took from its cache hands over the same run, which must not become a second version."""
    mlflow = _mlflow()
    existing = mlflow.MlflowClient().search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    if existing:
        return str(min(int(v.version) for v in existing))
    return str(mlflow.register_model(f"runs:/{run_id}/model", model_name).version)


METRIC_VALUE_TAG = "flexi_jest.metric."  # + metric name: the version's evaluation, one tag per metric
PROMOTION_TAG = "flexi_jest.promotion"  # the decision on this version, in words
CHAMPION, CHALLENGER, PREVIOUS_CHAMPION = "champion", "challenger", "previous-champion"


class PromotionDecision(BaseModel):
    model_name: str
    version: str
    metric: str
    value: float | None
    champion_version: str | None
    champion_value: float | None
    promoted: bool
    alias: str  # champion, challenger, or "" (refused: a metric that is not finite)
    reason: str


def version_metrics(version) -> dict[str, float]:
    """The evaluation metrics a registered version was tagged with (metric name -> value)."""
    metrics = {key[len(METRIC_VALUE_TAG):]: float(value) for key, value in version.tags.items()
               if key.startswith(METRIC_VALUE_TAG)}
    # a version promoted before the per-metric tags has only the legacy tag: still read, or a champion of an older
    # registry could never be compared (and so never replaced)
    name, _, number = version.tags.get(LEGACY_METRIC_TAG, "").partition("=")
    if name and number and name not in metrics:
        metrics[name] = float(number)
    return metrics


def alias_holder(client, model_name: str, alias: str):
    """The version holding alias, or None."""
    import mlflow
    try:
        return client.get_model_version_by_alias(model_name, alias)
    except mlflow.exceptions.MlflowException:
        return None


@contextmanager
def at_most_once() -> Iterator[None]:
    """MLflow's HTTP client retries every request, POST and DELETE included, after a timeout or a 5xx; a lock's
    create or delete must not be repeated behind our back (a repeated delete could remove the next holder's
    lock). Inside this block requests are sent once, and the lock checks what happened itself."""
    previous = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = previous


def lock_holder(client, name: str) -> tuple[str, float] | None:
    """(owner, since) of the lock registered model `name`, or None if nobody holds it."""
    import mlflow
    try:
        tags = client.get_registered_model(name).tags
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return tags.get("flexi_jest.lock_owner", ""), float(tags.get("flexi_jest.lock_since", "inf"))


@contextmanager
def registry_lock(model_name: str, timeout: float = 600.0, stale_after: float = 900.0) -> Iterator[None]:
    """Mutual exclusion between promotions of one model, held by creating the registered model
    `<model_name>.promotion-lock` (the registry's unique name: one creator wins, in the database's transaction)
    with this holder's token, and released by deleting it. Lock requests are sent at most once (at_most_once)
    and their outcome read back from the lock's owner tag. A lock older than stale_after seconds (a crashed
    holder) is broken."""
    import uuid

    import mlflow

    client = mlflow.MlflowClient()
    name, owner = f"{model_name}.promotion-lock", uuid.uuid4().hex
    deadline = time.time() + timeout
    while True:
        try:
            with at_most_once():
                client.create_registered_model(name, tags={"flexi_jest.lock_owner": owner,
                                                           "flexi_jest.lock_since": str(time.time())},
                                               description=f"held while a version of {model_name} is promoted")
            break
        except Exception:  # taken, or the answer was lost: the owner tag says which
            holder = lock_holder(client, name)
            if holder is not None and holder[0] == owner:
                break
            if holder is not None and time.time() - holder[1] > stale_after:
                with at_most_once():
                    client.delete_registered_model(name)
                continue
            if time.time() > deadline:
                raise TimeoutError(f"{name} is held by another promotion (since {holder[1] if holder else '?'}); "
                                   f"a crashed holder's lock is broken after {stale_after:.0f} s") from None
            time.sleep(0.2)
    try:
        yield
    finally:
        for _ in range(20):
            holder = lock_holder(client, name)
            if holder is None or holder[0] != owner:
                break
            try:
                with at_most_once():
                    client.delete_registered_model(name)
            except Exception:  # checked again above
                time.sleep(0.5)


def crown(client, model_name: str, version: str, alias: str = CHAMPION) -> str | None:
    """Give version `alias`; the version that held it becomes `previous-champion` (alias and tag); a version
    holding both champion and challenger is not left behind. Returns the version that held it before."""
    old = alias_holder(client, model_name, alias)
    old_version = str(old.version) if old is not None else None
    if old_version == str(version):
        return old_version
    client.set_registered_model_alias(model_name, alias, version)  # the new holder first: never no champion
    if alias == CHAMPION:
        if old_version is not None:
            client.set_registered_model_alias(model_name, PREVIOUS_CHAMPION, old_version)
            client.set_model_version_tag(model_name, old_version, PREVIOUS_CHAMPION, f"until version {version}")
        challenger = alias_holder(client, model_name, CHALLENGER)
        if challenger is not None and str(challenger.version) == str(version):
            client.delete_registered_model_alias(model_name, CHALLENGER)
    return old_version


def promote(model_name: str, version: str, metrics: dict[str, float], rule=None,
            shortfalls: dict[str, int] | None = None) -> PromotionDecision:
    """Crown this version `champion` if it beats the current champion under the champion rule (config.ChampionRule:
    the metric by name, its direction, a minimum margin), else make it `challenger`. It is compared only on a
    metric the champion was also evaluated on: a champion without it keeps its title, and the reason is written
    to the version's tags (flexi_jest.promotion) and printed. Concurrent promotions of one model take turns
    (registry_lock), so two racing end with the better model as champion. shortfalls: per eval set, the samples
    its evaluation could not read; a metric of a set with a shortfall crowns nobody unless rule.allow_partial.
    A metric that is not finite (NaN, inf: a diverged model) is refused: no alias. A champion whose metric is not
    finite is replaced by any version with a finite one (NaN compares False with everything: it could never be
    beaten), and the reason says so."""
    from flexi_jest.config import ChampionRule

    rule = rule or ChampionRule()
    metric = rule.metric or next(iter(metrics), "")
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    for name, number in metrics.items():
        client.set_model_version_tag(model_name, version, f"{METRIC_VALUE_TAG}{name}", str(number))
    value = metrics.get(metric)
    with registry_lock(model_name):
        champion = alias_holder(client, model_name, CHAMPION)
        champion_value = None
        missing = (shortfalls or {}).get(metric.rsplit(".", 1)[0], 0)
        refused = False  # a version whose metric is not a number gets no alias at all
        if value is None:
            promoted = False
            reason = f"not crowned: version {version} has no metric {metric!r} (it has {sorted(metrics)})"
        elif not math.isfinite(value):
            promoted, refused = False, True
            reason = (f"refused: version {version}'s {metric} is {value}, not a finite number (a diverged model): "
                      "it is neither champion nor challenger")
        elif missing and not rule.allow_partial:
            promoted = False
            reason = (f"not crowned: {metric} = {value:.4f} was measured on a partial eval set ({missing} samples "
                      "unreadable; the promotion rule's allow_partial accepts that)")
        elif champion is None:
            promoted, reason = True, f"crowned: no champion yet ({metric} = {value:.4f})"
        elif str(champion.version) == str(version):
            promoted, reason = True, f"already champion ({metric} = {value:.4f})"
        else:
            champion_value = version_metrics(champion).get(metric)
            if champion_value is None:
                promoted = False
                reason = (f"not crowned: champion version {champion.version} has no metric {metric!r} to compare "
                          f"with (it has {sorted(version_metrics(champion))})")
            elif not math.isfinite(champion_value):  # nan > margin is False: such a champion could never be beaten
                promoted = True
                reason = (f"crowned: champion version {champion.version}'s {metric} is {champion_value}, not a finite "
                          f"number, so a finite {metric} ({value:.4f}) replaces it")
            else:
                gain = value - champion_value if rule.direction == "max" else champion_value - value
                promoted = gain > rule.min_margin
                verdict = "crowned" if promoted else "not crowned"
                reason = (f"{verdict}: {metric} {value:.4f} vs champion version {champion.version}'s "
                          f"{champion_value:.4f} ({rule.direction}, margin {rule.min_margin})")
        if promoted:
            crown(client, model_name, version)
        elif not refused and (champion is None or str(champion.version) != str(version)):
            client.set_registered_model_alias(model_name, CHALLENGER, version)
        client.set_model_version_tag(model_name, version, PROMOTION_TAG, reason)
    print(f"[promote] {model_name} version {version}: {reason}", flush=True)
    return PromotionDecision(model_name=model_name, version=str(version), metric=metric, value=value,
                             champion_version=str(champion.version) if champion is not None else None,
                             champion_value=champion_value, promoted=promoted,
                             alias=CHAMPION if promoted else "" if refused else CHALLENGER, reason=reason)


def check_reachable(timeout: float = 5.0) -> None:
    """Raise ConnectionError (one line) if the tracking URI is a server that does not answer /health."""
    import urllib.request

    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout)
    except OSError as exc:
        raise ConnectionError(f"the MLflow tracking server at {uri} is unreachable ({getattr(exc, 'reason', exc)})") from None


def registered_version(client, model_name: str, version: str):
    """The registered version, or LookupError (one line) if the model or the version does not exist."""
    import mlflow
    try:
        return client.get_model_version(model_name, str(version))
    except mlflow.exceptions.MlflowException:
        raise LookupError(f"{model_name} has no version {version} at {tracking_uri()}") from None


def promote_by_hand(model_name: str, version: str, alias: str = CHAMPION) -> str | None:
    """`flexi-jest promote`: give version `alias` (a person's decision, no rule applied); for `champion` the
    version that held it becomes `previous-champion`. Returns the version that held the alias."""
    check_reachable()
    client = _mlflow().MlflowClient()
    registered_version(client, model_name, version)
    with registry_lock(model_name):
        old = crown(client, model_name, str(version), alias)
        client.set_model_version_tag(model_name, str(version), PROMOTION_TAG, f"{alias} by hand (flexi-jest promote)")
    return old


def rollback(model_name: str) -> tuple[str, str]:
    """`flexi-jest rollback`: `champion` back to the `previous-champion` version, which the current champion
    becomes (a second rollback undoes the first). Returns (new champion, old champion)."""
    check_reachable()
    client = _mlflow().MlflowClient()
    with registry_lock(model_name):
        previous = alias_holder(client, model_name, PREVIOUS_CHAMPION)
        if previous is None:
            raise LookupError(f"{model_name} has no version with alias {PREVIOUS_CHAMPION!r} to roll back to "
                              f"at {tracking_uri()}")
        old = crown(client, model_name, str(previous.version))
        client.set_model_version_tag(model_name, str(previous.version), PROMOTION_TAG,
                                     f"champion again by rollback from version {old}")
    return str(previous.version), str(old)

