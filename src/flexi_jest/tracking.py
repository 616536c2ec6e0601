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
LEGACY_METRIC_TAG = "eval_metric"  # "<metric>=<value>": read only, on versions promoted before 8453f28


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
    attached afterwards by record_stage); logs the config as params and artifact."""
    mlflow = _mlflow()
    mlflow.set_experiment(experiment)
    tags = {"flexi_jest.stage": stage, **parent_tags(parent_run_id)}
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
    alias: str
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
    import time
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
    its evaluation could not read; a metric of a set with a shortfall crowns nobody unless rule.allow_partial."""
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
        if value is None:
            promoted = False
            reason = f"not crowned: version {version} has no metric {metric!r} (it has {sorted(metrics)})"
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
            else:
                gain = value - champion_value if rule.direction == "max" else champion_value - value
                promoted = gain > rule.min_margin
                verdict = "crowned" if promoted else "not crowned"
                reason = (f"{verdict}: {metric} {value:.4f} vs champion version {champion.version}'s "
                          f"{champion_value:.4f} ({rule.direction}, margin {rule.min_margin})")
        if promoted:
            crown(client, model_name, version)
        elif champion is None or str(champion.version) != str(version):
            client.set_registered_model_alias(model_name, CHALLENGER, version)
        client.set_model_version_tag(model_name, version, PROMOTION_TAG, reason)
    print(f"[promote] {model_name} version {version}: {reason}", flush=True)
    return PromotionDecision(model_name=model_name, version=str(version), metric=metric, value=value,
                             champion_version=str(champion.version) if champion is not None else None,
                             champion_value=champion_value, promoted=promoted,
                             alias=CHAMPION if promoted else CHALLENGER, reason=reason)


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

