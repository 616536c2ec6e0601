"""What only the pipeline's KFP components need around the stage entry points (stages.py); no kfp import.

The typed knobs a component lays over a stage's JSON config (with_knobs, with_data_access), where a stage writes
its data (output_location), what a stage hands downstream (stage_output) and records on the pipeline's parent run
(record_stages), the learners' evaluation points and the baselines' budgets (with_eval_points, baseline_values),
the learner's reference (learner_reference), and a rerun's inputs resolved from an earlier run's MLflow tags,
checked first (resolve_earlier_run, check_recorded_outputs, learner_result_of).
"""

import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from flexi_jest import storage
from flexi_jest.config import TrainResult, validated_stage_config

# the pipeline's typed knobs that keep the config's own value at 0 / "" (the others always apply), and the
# config field each one sets
KNOB_FIELDS = {"learning_rate": "optim.lr", "steps": "steps", "super_batch_size": "super_batch_size",
               "batch_size": "batch_size", "model_name": "model", "init_checkpoint": "init_checkpoint"}


def with_data_access(values: dict[str, Any], data_access: str) -> dict[str, Any]:
    """values (a stage's JSON config) with the pipeline's data_access (a JSON object of config.DataAccess: which
    pipe: programs and whether http(s) its dataset specs may use); "" or "{}" keeps the config's own (off)."""
    access = json.loads(data_access or "{}")
    return {**values, "data_access": access} if access else values


def with_knobs(values: dict[str, Any], **knobs: Any) -> dict[str, Any]:
    """values (a stage's JSON config) with the pipeline's typed knobs on top (KNOB_FIELDS: learning_rate sets
    optim.lr, model_name a model preset of config.MODEL_PRESETS, ...); a knob at 0 or "" keeps the config's value."""
    from flexi_jest.config import MODEL_PRESETS, ConfigError, deep_merge

    for knob, value in knobs.items():
        if value in (0, ""):
            continue
        if knob == "model_name":
            if value not in MODEL_PRESETS:
                raise ConfigError(f"model_name {value!r} is no model preset; expected one of {sorted(MODEL_PRESETS)}")
            value = MODEL_PRESETS[value].model_dump()
        *parents, leaf = KNOB_FIELDS[knob].split(".")
        override: dict[str, Any] = {leaf: value}
        for parent in reversed(parents):
            override = {parent: override}
        values = deep_merge(values, override)
    return values


def learner_reference(cache_uri: str, reference: dict[str, Any]) -> dict[str, Any]:
    """A pipeline learner's reference fields (reference_sha256, reference_training_flops, reference_caching_flops).

    reference: the metadata of the reference stage's output (its model artifact): the sha256 its training
    recorded, else (an imported model file) the sha256 of the file at its uri. The cache must have been made by
    that reference: a cache of another reference fails here with a CacheError naming both sha256s (the cache's
    own record of its reference is never trusted as the expectation)."""
    from flexi_jest.reference_cache import reference_share

    sha = reference.get("sha256") or storage.sha256_file(reference["uri"])
    return reference_share(cache_uri, sha)


EVAL_POINTS = 5  # evaluations during a pipeline learner's training: its accuracy-vs-FLOPs curve


def with_eval_points(stage: str, values: dict[str, Any], profile: str, eval_data: str,
                     points: int = EVAL_POINTS) -> dict[str, Any]:
    """values that also evaluate on eval_data `points` times during training (and at the end), unless they
    set eval_data / eval_every themselves: the pipeline's learners give the method comparison its curves."""
    values = {"eval_data": [eval_data], **values}
    if not values.get("eval_every"):
        steps = validated_stage_config(stage, profile, values).steps
        values["eval_every"] = max(1, steps // points)
    return values


BASELINE_BUDGETS = ("learner-flops", "flops", "steps")


def flop_matched_steps(values: dict[str, Any], main_values: dict[str, Any], profile: str, charged: bool = True) -> int:
    """Steps for a baseline learner (values) on the main learner's FLOP budget (main_values; the benchmark's
    rules, bench/learning_efficiency.py). charged=False, the paper's count: the budget is the main learner's own
    FLOPs (its steps x its step's scoring and training FLOPs; the reference's cached embeddings free), divided by
    the baseline's step FLOPs. charged=True: budget = the same + the reference's share (training and caching
    pass) if the main learner uses the reference; the baseline gets the budget less the share if it uses the
    reference itself (the offline filter: plus its cosines). Both configs name the same reference cache, whose
    manifest gives the embedding width and pool size."""
    from flexi_jest import flops
    from flexi_jest.config import TrainLearnerConfig
    from flexi_jest.reference_cache import ReferenceCache

    own: TrainLearnerConfig = validated_stage_config("train-learner", profile, values)
    main: TrainLearnerConfig = validated_stage_config("train-learner", profile, main_values)
    if own.reference_cache is None:
        raise ValueError("flop_matched_steps: the baseline's config names no reference_cache (its reference's "
                         "FLOPs are part of the budget)")
    manifest = ReferenceCache(own.reference_cache).manifest
    dim = int(manifest["embed_dim"])
    share = main.reference_training_flops + main.reference_caching_flops
    budget = main.steps * flops.learner_step_flops(main, dim)
    if not charged:
        return flops.steps_for_budget(budget, own, 0.0, dim)
    budget += share if flops.uses_reference(main) else 0.0
    own_share = own.reference_training_flops + own.reference_caching_flops
    if own.method == "offline-filter" or own.prefilter_keep_ratio is not None:
        own_share += flops.offline_filter_flops(int(manifest["num_samples"]), dim)
    return flops.steps_for_budget(budget, own, own_share, dim)


def baseline_values(values: dict[str, Any], main_values: dict[str, Any], profile: str, budget: str) -> dict[str, Any]:
    """A pipeline baseline learner's config: budget "learner-flops" (the paper's count) sets its steps to spend the
    main learner's own FLOPs, the reference's cached embeddings free; "flops" the main learner's total FLOPs with
    the reference's share charged to whichever uses it (flop_matched_steps); "steps" keeps the steps it has (the
    main learner's, through the same knobs)."""
    from flexi_jest.config import ConfigError

    if budget not in BASELINE_BUDGETS:
        raise ConfigError(f"baseline_budget must be one of {list(BASELINE_BUDGETS)}, got {budget!r}")
    if budget == "steps":
        return values
    return {**values, "steps": flop_matched_steps(values, main_values, profile, charged=budget == "flops")}


def output_location(storage_root: str, artifact_uri: str, artifact_path: str, name: str) -> str:
    """Where a stage writes its data: beside its KFP output artifact when storage_root is empty (local runs),
    else under storage_root/<run>/<task>/name (e.g. s3://flexi-jest/...), unique per pipeline run and task
    and stable across retries of the task, so a retried training task finds its checkpoints."""
    if not storage_root:
        return str(Path(artifact_path).parent / name)
    run, task = artifact_uri.rstrip("/").split("/")[-3:-1]
    return storage.join(storage_root, run, task, name)


def stage_output(stage: str, run_id: str, result: BaseModel, outputs: dict[str, str] | None = None,
                 **extra: Any) -> str:
    """What a pipeline stage returns (its KFP output parameter), as JSON: the stage, its MLflow run, its result
    and its outputs' storage URIs by name, which record_stage writes on the pipeline's parent run."""
    return json.dumps({"stage": stage, "mlflow_run_id": run_id, "outputs": outputs or {}, "result": result.model_dump(),
                       **extra})


def record_stages(parent_run_id: str, *stage_outputs: str) -> dict[str, bool]:
    """Attach stages (their stage_output JSON; "" skipped) to the pipeline's parent run: {stage: from the cache}."""
    from flexi_jest import tracking

    cached = {}
    for text in stage_outputs:
        if text:
            output = json.loads(text)
            cached[output["stage"]] = tracking.record_stage(parent_run_id, output["stage"], output["mlflow_run_id"],
                                                            output["outputs"])
    return cached


# what a rerun from each stage resolves from the earlier run's recorded outputs ("learner": its main learner)
RERUN_INPUTS = {
    "train_reference": ("curated", "pool", "eval_split"),
    "cache_reference": ("pool", "eval_split", "reference", "reference_sha256"),
    "train_learner": ("pool", "cache", "eval_split", "reference", "reference_sha256"),
    "evaluate": ("eval_split", "reference", "reference_sha256", "learner"),
}


class RecordedOutputError(ValueError):
    """An output an earlier run recorded on MLflow (a tag anyone with write access can change) is not what the
    stage that wrote it could have written; the message names the tag, the run and why."""


DATASET_OUTPUTS = {"curated": "curated", "pool": "pool", "eval_split": "eval"}  # tag name -> make-data split
FILE_OUTPUTS = ("reference", "cache", "learner")  # written by the pipeline's stages under its storage root
VERSION_NUMBER = re.compile(r"[0-9]{1,12}")
RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
BESIDE_ARTIFACTS = "(beside the KFP artifacts)"  # the storage_root param of a run that kept data beside them
MAX_RERUN_CHAIN = 16


def _storage_uri_problem(value: str) -> str | None:
    """Why value is not one storage URI (a path, file://, s3://) a stage wrote, or None."""
    if not value or any(c in value for c in "\0\n\r"):
        return "is empty or holds a control character"
    if value.startswith(("pipe:", "http://", "https://")) or "::" in value:
        return "is not a storage URI (a path, file:// or s3://)"
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", value)
    if scheme and scheme[1] not in ("s3", "file"):
        return f"has the scheme {scheme[1]!r}; expected a path, file:// or s3://"
    if any(part == ".." for part in value.split("/")):
        return "has a '..' component"
    return None


def _storage_roots(client, earlier) -> list[str] | None:
    """The storage roots (storage_root params, which MLflow never lets change) of the earlier run and the runs it
    resolved its own inputs from (flexi_jest.from_run); None if one of them kept data beside its KFP artifacts
    (no root to check against)."""
    roots, run, seen = [], earlier, set()
    while run is not None and run.info.run_id not in seen and len(seen) < MAX_RERUN_CHAIN:
        seen.add(run.info.run_id)
        root = run.data.params.get("storage_root", "")
        if not root or root == BESIDE_ARTIFACTS:
            return None
        roots.append(root.rstrip("/") + "/")
        source = run.data.tags.get("flexi_jest.from_run")
        try:
            run = client.get_run(source) if source else None
        except Exception:  # noqa: BLE001 - a from_run that no longer resolves ends the chain
            run = None
    return roots


def _registered_specs(client, resolved: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """What the earlier run's make-data stage read or wrote, by tag name (from its params, which cannot change):
    a registered training split's shard list (or its spec, as runs before shard lists recorded it); empty when the
    run recorded no make-data stage (a rerun's own parent) or it cannot be read."""
    from flexi_jest.data.register import registered_path

    run_id = resolved.get("make-data.mlflow_run_id")
    if not run_id:
        return {}
    try:
        params = client.get_run(run_id).data.params
    except Exception:  # noqa: BLE001 - no stage run to compare with: the tag is checked by kind only
        return {}
    if params.get("source") == "register":
        return {name: (registered_path(params.get("out_dir", ""), split, params[split]), params[split])
                for name, split in DATASET_OUTPUTS.items() if params.get(split)}
    if params.get("out_dir"):
        return {name: (storage.join(params["out_dir"], split),) for name, split in DATASET_OUTPUTS.items()}
    return {}


def check_recorded_outputs(resolved: dict[str, str], earlier, client, data_access=None) -> None:
    """Check what a rerun resolved from an earlier run's MLflow tags before anything uses it: dataset specs
    (curated, pool, eval_split) under the same data-access rules as a config (data/access.py: no pipe: or
    http(s) unless data_access enables it; SpecError) and, where the run recorded its make-data stage, equal to
    what that stage registered or wrote; model and cache URIs storage URIs under the storage root of the run
    (and of the runs it was resolved from) when it had one; sha256s, versions and run ids of their form.
    Raises RecordedOutputError (or SpecError) naming the tag and the run."""
    from flexi_jest import tracking
    from flexi_jest.data.access import DataAccess, check_spec

    access = data_access if isinstance(data_access, DataAccess) else DataAccess.model_validate(data_access or {})
    run_id = resolved["parent_run_id"]

    def where(name: str) -> str:
        stage_tag = name.endswith(".mlflow_run_id")
        tag = (f"{tracking.STAGE_TAG}{name.removesuffix('.mlflow_run_id')}" if stage_tag
               else f"{tracking.OUTPUT_TAG}{name}")
        return f"MLflow tag {tag} of pipeline run {run_id}"

    registered = _registered_specs(client, resolved)
    roots = _storage_roots(client, earlier)
    for name, value in resolved.items():
        if name == "parent_run_id":
            continue
        base = name.split(".", 1)[0]
        if base in DATASET_OUTPUTS and name == base:
            check_spec(value, access, where(name))
            expected = registered.get(name)
            if expected is not None and value[:500] not in {e[:500] for e in expected}:  # params: 500 characters
                raise RecordedOutputError(f"{where(name)}: {value!r} is not what its make-data stage run "
                                          f"{resolved['make-data.mlflow_run_id']} read or wrote "
                                          f"({' or '.join(map(repr, dict.fromkeys(expected)))})")
        elif base in FILE_OUTPUTS:
            problem = _storage_uri_problem(value)
            if problem is None and roots is not None and not any(value.startswith(root) for root in roots):
                problem = f"is outside the run's storage root ({', '.join(roots)})"
            if problem:
                raise RecordedOutputError(f"{where(name)}: {value!r} {problem}")
        elif name == "reference_sha256" and not storage.is_sha256(value):
            raise RecordedOutputError(f"{where(name)}: {value!r} is not a sha256 (64 hex digits)")
        elif name.endswith("_version") and not VERSION_NUMBER.fullmatch(value):
            raise RecordedOutputError(f"{where(name)}: {value!r} is not a registry version number")
        elif name.endswith("run_id") and value and not RUN_ID.fullmatch(value):
            raise RecordedOutputError(f"{where(name)}: {value!r} is not an MLflow run id")


def resolve_earlier_run(from_run: str, parent_run_id: str = "", stage: str = "train_learner",
                        data_access=None) -> dict[str, str]:
    """The outputs an earlier pipeline run recorded (tracking.recorded_outputs), checked to hold what a rerun from
    `stage` needs (RERUN_INPUTS; "learner": the run's main learner, with its MLflow run as "learner_run_id") and
    to be what its stages could have written (check_recorded_outputs: MLflow tags are input; data_access, a
    config.DataAccess or its dict, allows pipe: / http(s) specs as a stage config's does; default: refused);
    recorded on this run's parent run (parent_run_id) too, with the run they came from."""
    from flexi_jest import tracking

    if stage not in RERUN_INPUTS:
        raise ValueError(f"no rerun from stage {stage!r}; expected one of {sorted(RERUN_INPUTS)}")
    earlier = tracking.pipeline_run_or_fail(from_run)
    resolved = tracking.outputs_of(earlier)
    method = earlier.data.params.get("method", "")
    if f"learner.{method}" in resolved:  # the earlier run's main learner (its baselines are recorded beside it)
        resolved["learner"] = resolved[f"learner.{method}"]
        resolved["learner_run_id"] = resolved.get(f"train-learner.{method}.mlflow_run_id", "")
    missing = [name for name in RERUN_INPUTS[stage] if name not in resolved]
    if missing:
        raise LookupError(f"pipeline run {from_run!r} (MLflow run {resolved['parent_run_id']}) recorded no "
                          f"{', '.join(missing)}, which a rerun from {stage} needs: did its stages up to {stage} "
                          f"finish?")
    client = tracking.mlflow_client()
    check_recorded_outputs(resolved, earlier, client, data_access)
    if parent_run_id:
        parent = tracking.pipeline_run_or_fail(parent_run_id).info.run_id
        client.set_tag(parent, "flexi_jest.from_run", resolved["parent_run_id"])
        client.set_tag(parent, "flexi_jest.from_stage", stage)
        for name in RERUN_INPUTS[stage] + ("reference_version", "curated"):
            if name in resolved and name != "learner":
                client.set_tag(parent, f"{tracking.OUTPUT_TAG}{name}", resolved[name])
        if "train-reference.mlflow_run_id" in resolved and stage != "train_reference":
            client.set_tag(parent, f"{tracking.STAGE_TAG}train-reference", resolved["train-reference.mlflow_run_id"])
    return resolved


def learner_result_of(checkpoint: str) -> dict[str, Any]:
    """The TrainResult (as a dict) a learner wrote beside its checkpoint (out_dir/model.pt -> out_dir/result.json):
    what evaluating an earlier run's learner needs (its FLOPs, metrics path, steps)."""
    out_dir = checkpoint.rsplit("/", 1)[0]
    path = storage.join(out_dir, "result.json")
    if not storage.exists(path):
        raise FileNotFoundError(f"the learner checkpoint {checkpoint} has no result.json beside it ({path}): "
                                "was its training interrupted?")
    return TrainResult.model_validate_json(storage.read_bytes(path)).model_dump()
