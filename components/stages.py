"""The pipeline's components: one per stage, each taking its Pydantic config as a JSON string.

Every component body imports only `flexi_jest` (installed in the image) and hands its work to a
`flexi_jest.stages` function: the config is validated on entry (a bad field fails the task with
the field named), the stage runs and is tracked in MLflow under the pipeline's parent run, and
the data's storage URI (a local path or s3://...) travels in each artifact's metadata["uri"].

Caching: the stages KFP may take from its cache (data, reference, reference cache, learners, evaluation)
take content only: their typed config, their input artifacts (URI, sha256) and the image (the code
version). Run names, the KFP run ID and MLflow run ids never enter them, so a cloned run with one
learner knob changed reuses everything upstream. Their MLflow runs are attached to the pipeline's parent
run by the tracking-only tasks (open_tracking, track_stages, compare, promote, close_tracking), which are
never cached and know the parent by the KFP run ID.
"""

from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.image import GPU_IMAGE, IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def open_tracking(kfp_run_id: str, run_name: str, experiment: str, dataset: str, profile: str, method: str,
                  score: str, filter_ratio: float, n_chunks: int, steps: int, storage_root: str,
                  tracking: Output[Artifact]) -> str:
    """Create the MLflow parent run of this pipeline run (tagged with the KFP run ID, dsl.PIPELINE_JOB_ID_PLACEHOLDER),
    with the pipeline's main knobs as params; returns its id (also in the `tracking` artifact)."""
    import json

    from flexi_jest.tracking import start_pipeline_run

    params = {"dataset": dataset, "profile": profile, "method": method, "score": score, "filter_ratio": filter_ratio,
              "n_chunks": n_chunks, "steps": steps, "storage_root": storage_root or "(beside the KFP artifacts)"}
    run_id = start_pipeline_run(run_name, params, experiment, kfp_run_id)
    tracking.metadata.update({"mlflow_run_id": run_id, "kfp_run_id": kfp_run_id})
    with open(tracking.path, "w") as f:
        json.dump({"mlflow_run_id": run_id, "kfp_run_id": kfp_run_id, "experiment": experiment}, f)
    return run_id


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def make_data(config_json: str, profile: str, dataset: str, storage_root: str, experiment: str,
              curated: Output[Dataset], pool: Output[Dataset], eval_split: Output[Dataset],
              source: str = "generate", curated_uri: str = "", pool_uri: str = "", eval_uri: str = "",
              data_access: str = "{}") -> str:
    """source 'generate': write the curated / pool / eval webdataset shards; 'register': check the user's own
    (curated_uri, pool_uri, eval_uri: dataset specs) and record them under storage_root, reading them only.
    data_access: a JSON config.DataAccess for every stage that reads data ("{}": storage only, no pipe: or http)."""
    import json

    from flexi_jest.pipeline_support import output_location, stage_output, with_data_access
    from flexi_jest.stages import make_data_stage

    values = with_data_access(json.loads(config_json), data_access)
    values.setdefault("source", source)
    if values["source"] == "register":
        given = {"curated": curated_uri, "pool": pool_uri, "eval": eval_uri}
        values.update({name: spec for name, spec in given.items() if spec})
    else:
        values.setdefault("dataset", dataset)
    values.setdefault("out_dir", output_location(storage_root, curated.uri, curated.path, "data"))
    result, run_id = make_data_stage(values, profile, "", experiment)
    for artifact, split in ((curated, "curated"), (pool, "pool"), (eval_split, "eval")):
        info = result.splits[split]
        artifact.metadata.update({"uri": info.path, "num_shards": info.num_shards, "dataset": result.dataset})
        if info.num_samples is not None:  # a registered pool's count may be unknown
            artifact.metadata["num_samples"] = info.num_samples
        with open(artifact.path, "w") as f:
            json.dump(info.model_dump(), f)
    paths = {name: result.splits[split].path for name, split in (("curated", "curated"), ("pool", "pool"),
                                                                  ("eval_split", "eval"))}
    return stage_output("make-data", run_id, result, paths)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def train_reference(config_json: str, profile: str, storage_root: str, experiment: str,
                    curated: Input[Dataset], model: Output[Model], metrics: Output[Metrics],
                    batch_size: int = 0, init_checkpoint: str = "", data_access: str = "{}") -> str:
    """Train the reference on the curated split (SigLIP), resuming from its checkpoints on a retry; the typed
    knobs (0 / "": the config's own) override config_json."""
    import json

    from flexi_jest.pipeline_support import output_location, stage_output, with_data_access, with_knobs
    from flexi_jest.stages import train_reference_stage

    values = with_knobs(with_data_access(json.loads(config_json), data_access), batch_size=batch_size,
                        init_checkpoint=init_checkpoint)
    values.update(data=curated.metadata["uri"],
                  out_dir=output_location(storage_root, model.uri, model.path, "reference"))
    result, run_id = train_reference_stage(values, profile, "", experiment)
    model.metadata.update({"uri": result.checkpoint, "sha256": result.checkpoint_sha256,
                           "total_flops": result.total_flops})
    with open(model.path, "w") as f:
        f.write(result.model_dump_json())
    metrics.log_metric("final_loss", result.final_loss)
    metrics.log_metric("reference_training_flops", result.flops.reference_training)
    with open(metrics.path, "w") as f:  # the artifact's file: KFP's local cache takes an output without one as lost
        json.dump(metrics.metadata, f)
    return stage_output("train-reference", run_id, result, {"reference": result.checkpoint,
                                                            "reference_sha256": result.checkpoint_sha256})


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def cache_reference(config_json: str, profile: str, experiment: str,
                    reference: Input[Model], pool: Input[Dataset], cache: Output[Dataset],
                    storage_root: str = "", data_access: str = "{}") -> str:
    """One pass of the frozen reference over the pool; the cache is written beside this task's output (under
    storage_root when set), unique per run and task: a rerun never overwrites the cache an earlier run's
    learners read (the config's out_dir, if it sets one, wins)."""
    import json

    from flexi_jest.pipeline_support import output_location, stage_output, with_data_access
    from flexi_jest.stages import cache_reference_stage

    values = with_data_access(json.loads(config_json), data_access)
    values.update(reference=reference.metadata["uri"], pool=pool.metadata["uri"])
    if not values.get("out_dir"):
        values["out_dir"] = output_location(storage_root, cache.uri, cache.path, "refcache")
    result, run_id = cache_reference_stage(values, profile, "", experiment)
    cache.metadata.update({"uri": result.cache_dir, "reference_sha256": result.reference_sha256,
                           "num_samples": result.num_samples, "flops": result.flops})
    with open(cache.path, "w") as f:
        f.write(result.model_dump_json())
    return stage_output("cache-reference", run_id, result, {"cache": result.cache_dir})


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def train_learner(config_json: str, profile: str, method: str, score: str, filter_ratio: float, n_chunks: int,
                  steps: int, storage_root: str, experiment: str,
                  pool: Input[Dataset], cache: Input[Dataset], eval_split: Input[Dataset], reference: Input[Model],
                  model: Output[Model], metrics: Output[Metrics], nodes: int = 1, multinode_json: str = "{}",
                  learning_rate: float = 0.0,
                  super_batch_size: int = 0, model_name: str = "", budget: str = "steps", main_config_json: str = "",
                  main_method: str = "", main_score: str = "", data_access: str = "{}") -> str:
    """JEST / Flexi-JEST (or a baseline) learner; checkpoints beside its output, so a retried task resumes.
    The typed knobs override config_json (steps, learning_rate, super_batch_size, model_name: 0 / "" keep it).
    The cache must come from `reference` (the reference stage's output): a cache of another reference fails.
    budget "learner-flops" (a baseline, the paper's count): its steps spend the main learner's own FLOPs
    (main_config_json with main_method, main_score and the same knobs; the reference's cached embeddings free);
    "flops": the main learner's total FLOPs, the reference's share charged to whichever uses it; "steps": the
    steps the knobs and config give it (the main learner's). With FLEXI_JEST_SHARED_CPU set (run-local: the
    baselines of a ParallelFor train side by side on one machine), a CPU run takes its share of the cores.
    nodes > 1: trained by a PyTorchJob this task launches and waits for (multinode_json: its image, GPUs per
    node, scheduling and services; see flexi_jest.pytorchjob.run_pytorchjob)."""
    import json

    from flexi_jest.pipeline_support import (
        baseline_values,
        learner_reference,
        output_location,
        stage_output,
        with_data_access,
        with_eval_points,
        with_knobs,
    )
    from flexi_jest.stages import train_learner_stage

    knobs = dict(steps=steps, learning_rate=learning_rate, super_batch_size=super_batch_size, model_name=model_name)
    shared = dict(filter_ratio=filter_ratio, n_chunks=n_chunks, pool=pool.metadata["uri"],
                  reference_cache=cache.metadata["uri"],
                  # the reference's sha256 from its own artifact (checked against the cache) and its FLOPs
                  **learner_reference(cache.metadata["uri"], dict(reference.metadata)))
    out_dir = output_location(storage_root, model.uri, model.path, f"learner-{method}")
    values = {**with_knobs(with_data_access(json.loads(config_json), data_access), **knobs), "method": method,
              "score": score, "out_dir": out_dir, **shared}
    main_values = {**with_knobs(with_data_access(json.loads(main_config_json or "{}"), data_access), **knobs),
                   "method": main_method, "score": main_score, "out_dir": out_dir,
                   **shared} if budget != "steps" else {}
    values = baseline_values(values, main_values, profile, budget)
    # a few evaluations during training: the accuracy-vs-FLOPs curve the compare stage draws
    values = with_eval_points("train-learner", values, profile, eval_split.metadata["uri"])
    multinode = {**json.loads(multinode_json), "nodes": nodes} if nodes > 1 else None
    if main_method:  # a baseline: it may train beside the others on one machine (run-local)
        from flexi_jest.device import share_cpu_threads
        share_cpu_threads()
    result, run_id = train_learner_stage(values, profile, "", experiment, multinode)
    model.metadata.update({"uri": result.checkpoint, "sha256": result.checkpoint_sha256, "method": method,
                           "total_flops": result.total_flops, "world_size": result.world_size})
    with open(model.path, "w") as f:
        f.write(result.model_dump_json())
    metrics.log_metric("final_loss", result.final_loss)
    metrics.log_metric("total_flops", result.total_flops)
    for key, value in result.selection.items():
        metrics.log_metric(key, value)
    with open(metrics.path, "w") as f:  # the artifact's file: KFP's local cache takes an output without one as lost
        json.dump(metrics.metadata, f)
    return stage_output(f"train-learner.{method}", run_id, result, {f"learner.{method}": result.checkpoint})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(config_json: str, profile: str, method: str, experiment: str,
             model: Input[Model], eval_split: Input[Dataset], metrics: Output[Metrics], report: Output[HTML],
             eval_sets: List[str] = [], champion_metric: str = "", data_access: str = "{}") -> str:
    """Zero-shot classification and retrieval on the pipeline's eval split and on eval_sets ('name=uri', each
    reported under its name); a report with the metric against training FLOPs. champion_metric (e.g.
    'imagenet-val.top1'; "" keeps the config's, by default the eval split's top1) is what promotion compares."""
    import json

    from flexi_jest.pipeline_support import stage_output, with_data_access
    from flexi_jest.stages import evaluate_stage

    with open(model.path) as f:
        training = json.load(f)
    values = with_data_access(json.loads(config_json), data_access)
    values.update(model=model.metadata["uri"], eval_data=[eval_split.metadata["uri"], *eval_sets])
    if champion_metric:
        values["champion_metric"] = champion_metric
    result, run_id = evaluate_stage(values, profile, method, training, "", experiment, report.path)
    for split, split_metrics in result.splits.items():
        for key, value in split_metrics.model_dump().items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):  # not the uri, layout, skip reasons
                metrics.log_metric(f"{split}.{key}", value)
    if result.champion_value is not None:
        metrics.log_metric("champion_metric", result.champion_value)
    with open(metrics.path, "w") as f:  # the artifact's file: KFP's local cache takes an output without one as lost
        json.dump(metrics.metadata, f)
    reference_share = training["flops"]["reference_training"] + training["flops"]["reference_caching"]
    return stage_output(f"evaluate.{method}", run_id, result, method=method, total_flops=training["total_flops"],
                        metrics_path=training["metrics_path"], reference_share=reference_share,
                        steps=training["steps"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def track_stages(parent_run_id: str, first: str = "", second: str = "", third: str = "", learners: List[str] = [],
                 evaluations: List[str] = []) -> str:
    """Tracking only (never cached): attach stages' MLflow runs (their outputs: up to three, and the lists a
    ParallelFor collected) to the pipeline's parent run and record their outputs' URIs there; a stage KFP took
    from its cache is marked `cached`."""
    import json

    from flexi_jest.pipeline_support import record_stages

    return json.dumps(record_stages(parent_run_id, first, second, third, *learners, *evaluations))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def compare(main: str, baselines: List[str], parent_run_id: str,
            report: Output[HTML], metrics: Output[Metrics], reference: str = "") -> str:
    """The learners this run trained side by side: eval metric against total training FLOPs (the benchmark's
    plot), steps and FLOPs to reach the uniform baseline's final metric and the ratios (charged, and with the
    reference amortised), and the reference's own metric (reference: its evaluation); on the MLflow parent run."""
    import json

    from flexi_jest.stages import compare_stage

    evaluations = [json.loads(main)] + [json.loads(b) for b in baselines]
    summary = compare_stage(evaluations, parent_run_id, report_path=report.path,
                            reference=json.loads(reference) if reference else None)
    for name, info in summary["methods"].items():
        metrics.log_metric(f"{name}.final_metric", info["final_metric"])
        for field in ("flops_ratio_vs_uniform", "flops_ratio_vs_uniform_learner_only", "steps_ratio_vs_uniform"):
            if info.get(field) is not None:
                metrics.log_metric(f"{name}.{field}", info[field])
    if "reference" in summary:
        metrics.log_metric("reference.final_metric", summary["reference"]["final_metric"])
    return json.dumps(summary)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(evaluation_json: str, learner_json: str, reference_json: str, parent_run_id: str,
            experiment: str, promotion_config: str = "{}") -> str:
    """Register learner and reference (each once, however often KFP's cache hands them over); move `champion`
    to the learner only if it beats the current champion under the champion rule (promotion_config: a JSON
    config.ChampionRule). reference_json: the reference stage's output, or {"mlflow_run_id": ...} of a
    reference resolved from an earlier run."""
    import json

    from flexi_jest.stages import promote_stage

    evaluation = json.loads(evaluation_json)["result"]
    decision = promote_stage(json.loads(learner_json)["mlflow_run_id"], evaluation, parent_run_id, experiment,
                             json.loads(reference_json).get("mlflow_run_id"), json.loads(promotion_config))
    return decision.model_dump_json()


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def close_tracking(kfp_run_id: str, experiment: str, status: dsl.PipelineTaskFinalStatus) -> str:
    """Exit handler: end the MLflow parent run (found by the KFP run ID) as FINISHED or FAILED."""
    from flexi_jest.tracking import finish_pipeline_run_of

    state = "FINISHED" if status.state == "SUCCEEDED" else "FAILED"
    finish_pipeline_run_of(kfp_run_id, experiment, state)
    return state


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def resolve_run(from_run: str, parent_run_id: str, stage: str, curated: Output[Dataset], pool: Output[Dataset],
                cache: Output[Dataset], eval_split: Output[Dataset], reference: Output[Model], learner: Output[Model],
                data_access: str = "{}") -> NamedTuple("Resolved", [("reference_json", str), ("learner_json", str)]):
    """Tracking only (never cached): the outputs an earlier pipeline run recorded on its MLflow parent run
    (its KFP run ID or MLflow parent run id: from_run) as this run's input artifacts, for a rerun from `stage`
    (flexi_jest.pipeline_support.RERUN_INPUTS): curated, pool, reference cache, eval split, the reference (with its
    registered version) and the run's main learner (its training result as the artifact's file); an output the
    stage does not need and the run did not record has uri "". Recorded on this run's parent run too.
    reference_json / learner_json: {"mlflow_run_id": ...} of the reference and learner runs for the promote stage.
    The MLflow tags are input: checked first (pipeline_support.check_recorded_outputs; a pipe: or http(s) spec
    refused unless data_access, a JSON config.DataAccess, allows it)."""
    import json
    from collections import namedtuple

    from flexi_jest.pipeline_support import learner_result_of, resolve_earlier_run

    resolved = resolve_earlier_run(from_run, parent_run_id, stage, json.loads(data_access or "{}"))
    trained = learner_result_of(resolved["learner"]) if resolved.get("learner") else None
    for artifact, name in ((curated, "curated"), (pool, "pool"), (cache, "cache"), (eval_split, "eval_split"),
                           (reference, "reference"), (learner, "learner")):
        uri = resolved.get(name, "")
        artifact.metadata.update({"uri": uri, "from_run": resolved["parent_run_id"]})
        with open(artifact.path, "w") as f:
            json.dump(
                trained if name == "learner" and trained else {"uri": uri, "from_run": resolved["parent_run_id"]}, f)
    reference.metadata["sha256"] = resolved.get("reference_sha256", "")
    if trained:
        learner.metadata["sha256"] = trained["checkpoint_sha256"]
    Resolved = namedtuple("Resolved", ["reference_json", "learner_json"])
    return Resolved(json.dumps({"mlflow_run_id": resolved.get("train-reference.mlflow_run_id"),
                                "reference_version": resolved.get("reference_version")}),
                    json.dumps({"mlflow_run_id": resolved.get("learner_run_id", "")}))
