"""MLflow run tracking: the connection, the pipeline's parent run, a nested run per stage, and what they log.

One parent run per pipeline run, a nested run per stage (linked by the `mlflow.parentRunId` tag, so
stages running in separate processes or pods nest correctly). Params are the stage's config,
flattened; metrics are the result's numbers and the training curves; artifacts are the config and
result JSON, plots and the model. The model registry (versions, the champion rule and its lock) is
registry.py's, over this module's connection (connect, mlflow_client); the library talks to MLflow through
these two modules only.

Where MLflow lives: MLFLOW_TRACKING_URI from the environment (a cluster's tracking server), else a
local SQLite store `mlflow.db` in the working directory (the embedded default).

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

from flexi_jest.errors import Unavailable

DEFAULT_EXPERIMENT = "flexi-jest"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else sqlite:///<cwd>/mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def connect():
    """The mlflow module, pointed at tracking_uri(), its HTTP retries bounded (bound_http_retries)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no calls home from clusters or laptops
    bound_http_retries()
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def mlflow_client():
    """An MlflowClient of the tracking server at tracking_uri() (connect)."""
    return connect().MlflowClient()


# ---- an unreachable tracking server: bounded retries, said out loud, runs closed on the way out -------------------

# MLflow's own defaults retry a failed request 7 times, backing off 2, 4, ... 120 s, each try waiting up to 120 s:
# a stage whose server died sat silent for minutes per request. Unless these are set, the stages use:
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
CLOSE_WAIT_ENV = "FLEXI_JEST_MLFLOW_CLOSE_WAIT"  # seconds a stage waits for the server to mark its run (120)
FAILURE_TAG = "flexi_jest.failure"  # on a FAILED stage run: the error that ended it, one line


class TrackingUnavailable(ConnectionError, Unavailable):
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
    mlflow = connect()
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
    mlflow = connect()
    mlflow.set_experiment(experiment)
    client = mlflow.MlflowClient()
    experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
    tags = {"flexi_jest.kind": "pipeline", **({KFP_RUN_TAG: kfp_run_id} if kfp_run_id else {})}
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    for key, value in flatten(params).items():
        client.log_param(run.info.run_id, key, value)
    return run.info.run_id


def finish_pipeline_run(run_id: str, status: str = "FINISHED") -> None:
    mlflow_client().set_terminated(run_id, status=status)


def find_pipeline_run(run_ref: str, experiment: str | None = None):
    """The MLflow parent run of a pipeline run, by its KFP run ID (the tag start_pipeline_run wrote) or by its
    own MLflow run id; None if there is none. Never by name: two runs may share a name."""
    mlflow = connect()
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
        raise LookupError(
            f"no MLflow pipeline run with KFP run ID or MLflow run id {run_ref!r}{where} at {tracking_uri()}")
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
    client = mlflow_client()
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
    client = mlflow_client()
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
def stage_run(parent_run_id: str | None, stage: str, config: BaseModel,
              experiment: str = DEFAULT_EXPERIMENT) -> Iterator[Any]:
    """A run for one stage, nested under the pipeline's parent run if given (a pipeline's cached stages are
    attached afterwards by record_stage); logs the config as params and artifact. Closed on the way out
    (tracked_run): FINISHED, or FAILED with the error tagged, also when the server stopped answering mid-stage."""
    mlflow = connect()
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
    mlflow = connect()
    mlflow.log_metrics(numeric_metrics(result.model_dump(), prefix))
    mlflow.log_dict(result.model_dump(), "result.json")


def log_history(metrics_path: str) -> None:
    """Log a training run's JSON-lines history as step-indexed metrics (loss, FLOPs, selection stats...)."""
    from flexi_jest import storage

    mlflow = connect()
    for line in storage.read_bytes(metrics_path).decode().splitlines():
        record = json.loads(line)
        step = int(record.pop("step"))
        mlflow.log_metrics(numeric_metrics(record), step=step)


def log_figure(figure, name: str) -> None:
    """A matplotlib figure as an artifact of the active run."""
    connect().log_figure(figure, name)


def set_tags(tags: dict[str, str]) -> None:
    """Tags on the active run."""
    connect().set_tags(tags)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Metrics on the active run (at `step`, if given)."""
    connect().log_metrics(metrics, step=step)


LINEAGE_PREFIX = "lineage."  # run tags (train stages) copied onto registered model versions (registry.tag_version)


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
        inputs=Schema([ColSpec(DataType.string, "image", required=False),
                       ColSpec(DataType.string, "text", required=False)]),
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

    mlflow = connect()
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
    mlflow = connect()
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    tags = {f"{LINEAGE_PREFIX}{k}": (json.dumps(v) if isinstance(v, (dict, list)) else str(v))[:5000]
            for k, v in lineage.items() if v is not None}
    tags.update({f"{LINEAGE_PREFIX}{name}_uri": uri for name, uri in datasets.items()})
    mlflow.set_tags(tags)
    for name, uri in datasets.items():
        mlflow.log_input(MetaDataset(resolve_dataset_source(uri), name=name), context="training")


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


def check_reachable(timeout: float = 5.0) -> None:
    """Raise ConnectionError (one line) if the tracking URI is a server that does not answer /health."""
    import urllib.request

    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout)
    except OSError as exc:
        raise ConnectionError(
            f"the MLflow tracking server at {uri} is unreachable ({getattr(exc, 'reason', exc)})") from None


