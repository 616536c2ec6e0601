"""The Flexi-JEST++ pipeline: data -> reference -> reference cache -> JEST learner (+ baselines) -> eval -> promotion.

    python pipelines/flexi_jest_pp.py compile --out flexi_jest_pp.yaml          # KFP IR YAML for a cluster
    python pipelines/flexi_jest_pp.py run-local --workdir runs/pipeline         # no cluster, no Docker
    python pipelines/flexi_jest_pp.py run-local --runner docker ...             # each component in its image
    python pipelines/flexi_jest_pp.py submit --host https://kfp.example.com --param steps=2000

Every stage is a component over a flexi_jest library function (components/stages.py), tracked in
MLflow (one parent run per pipeline run, a nested run per stage) with its data at storage URIs
(local paths, or s3://... on a cluster via FLEXI_JEST_S3_ENDPOINT). The learner named by `method`
is promoted through the MLflow registry; `baseline_methods` train side by side on the same data
and budget so that every run shows JEST against a baseline.
"""

import argparse
import dataclasses
import hashlib
import inspect
import json
import os
import sys
import time
import types
from pathlib import Path
from typing import Any, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `components`

from kfp import compiler, dsl, kubernetes  # noqa: E402
from kfp.dsl import pipeline_context  # noqa: E402

from components.image import GPU_IMAGE  # noqa: E402
from components.stages import (  # noqa: E402
    cache_reference_scores,
    close_tracking,
    compare_methods,
    open_tracking,
    prepare_data,
    promote_model,
    reference_finetune,
    resolve_run,
    track_stages,
    train_learner,
    zero_shot_eval,
)
from flexi_jest.config import METHOD_PRESETS, TrainLearnerConfig  # noqa: E402
from flexi_jest.device import SHARED_CPU_ENV  # noqa: E402

# GPU node pool scheduling for the training stages, read at compile time.
GPU_NODE_SELECTOR = os.environ.get("FLEXI_JEST_GPU_NODE_SELECTOR", "flexi-jest/node-pool=gpu")  # key=value
GPU_TOLERATION_KEY = os.environ.get("FLEXI_JEST_GPU_TOLERATION", "nvidia.com/gpu")

# the main learner's default config: Flexi-JEST's fields of config.METHOD_PRESETS beyond the method and score knobs
FLEXI_TINY = json.dumps({k: v for k, v in METHOD_PRESETS["flexi-jest"].items() if k not in ("method", "score")})
# the learner knobs' defaults, from the learner's Pydantic config (one source of truth)
LEARNER = {name: field.default for name, field in TrainLearnerConfig.model_fields.items()}


@dataclasses.dataclass(frozen=True)
class ClusterSettings:
    """How a pipeline is built, passed to every function that builds it (make_pipeline). accelerators: for a
    cluster (GPU requests, the GPU node pool, the services' Secrets and endpoints); False for KFP local
    execution, which cannot resolve them. learner_nodes > 1 (compile --learner-nodes): the main learner trains
    as a PyTorchJob of learner_nodes x gpus_per_node GPUs."""

    accelerators: bool = True
    learner_nodes: int = 1
    gpus_per_node: int = 1

    @property
    def multinode(self) -> bool:
        return self.accelerators and self.learner_nodes > 1


CLUSTER, LOCAL = ClusterSettings(), ClusterSettings(accelerators=False)


def on_gpu_pool(settings: ClusterSettings, task: dsl.PipelineTask, accelerator_type: Any,
                accelerator_count: Any) -> dsl.PipelineTask:
    """Ask for accelerators and schedule onto the GPU node pool. KFP local execution cannot resolve
    accelerator settings given as pipeline parameters, and runs on this machine's devices anyway, so the
    pipeline built for it (settings LOCAL) leaves them out."""
    if not settings.accelerators:
        return task
    task.set_accelerator_type(accelerator_type).set_accelerator_limit(accelerator_count)
    key, _, value = GPU_NODE_SELECTOR.partition("=")
    kubernetes.add_node_selector(task, label_key=key, label_value=value)
    kubernetes.add_toleration(task, key=GPU_TOLERATION_KEY, operator="Exists", effect="NoSchedule")
    return task


# where the PyTorchJob runs: the namespace of k8s/base, with the S3 Secret and the runner's Role
JOB_NAMESPACE = os.environ.get("FLEXI_JEST_JOB_NAMESPACE", "flexi-jest")


def multinode_settings(settings: ClusterSettings) -> str:
    """What the learner task needs to launch its PyTorchJob (flexi_jest.pytorchjob.run_pytorchjob), as JSON."""
    key, _, value = GPU_NODE_SELECTOR.partition("=")
    return json.dumps({"gpus_per_node": settings.gpus_per_node, "image": GPU_IMAGE, "node_selector": {key: value},
                       "namespace": JOB_NAMESPACE,
                       "toleration_key": GPU_TOLERATION_KEY, "secret_name": S3_SECRET,
                       "tracking_uri": CLUSTER_ENV["MLFLOW_TRACKING_URI"], "s3_endpoint": S3_ENDPOINT})


def cluster_url(name: str, default: str) -> str:
    """An http(s) URL from the compile-time environment, else the in-cluster default (a local MLflow store
    such as sqlite:///... exported in the shell is of no use to a pod)."""
    value = os.environ.get(name, "")
    return value if value.startswith(("http://", "https://")) else default


# Object storage and MLflow for every component pod on a cluster, read at compile time; the defaults are the
# services of k8s/base. The S3 keys come from a Kubernetes Secret in the pods' namespace, never from here.
S3_SECRET = os.environ.get("FLEXI_JEST_S3_SECRET", "flexi-jest-s3")
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
# MLflow's basic-auth credentials (k8s/base: the server's admin account), from a Secret as well
MLFLOW_SECRET = os.environ.get("FLEXI_JEST_MLFLOW_SECRET", "flexi-jest-mlflow")
MLFLOW_SECRET_KEYS = {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                      "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"}
S3_ENDPOINT = cluster_url("FLEXI_JEST_S3_ENDPOINT", "http://minio.flexi-jest.svc.cluster.local:9000")
CLUSTER_ENV = {
    "FLEXI_JEST_S3_ENDPOINT": S3_ENDPOINT,
    "MLFLOW_S3_ENDPOINT_URL": cluster_url("MLFLOW_S3_ENDPOINT_URL", S3_ENDPOINT),
    "MLFLOW_TRACKING_URI": cluster_url("MLFLOW_TRACKING_URI", "http://mlflow.flexi-jest.svc.cluster.local:5000"),
}


def add_cluster_services(settings: ClusterSettings) -> None:
    """For a cluster (settings.accelerators), the S3 and MLflow Secrets as env vars and the endpoints on every
    container task of the pipeline being built; local execution cannot resolve Kubernetes settings and uses this
    machine's env."""
    if not settings.accelerators:
        return
    for task in pipeline_context.Pipeline.get_default_pipeline().tasks.values():
        if task.component_spec.implementation.container is None:  # importers run no container
            continue
        kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=S3_SECRET_KEYS)
        kubernetes.use_secret_as_env(task, secret_name=MLFLOW_SECRET, secret_key_to_env=MLFLOW_SECRET_KEYS)
        for name, value in CLUSTER_ENV.items():
            task.set_env_variable(name, value)


def train_evaluate_promote(settings: ClusterSettings, *, learner_config, eval_config, profile, method, score,
                           filter_ratio, n_chunks, steps, learning_rate, super_batch_size, model_name, storage_root,
                           experiment, accelerator_type, accelerator_count, pool, cache, eval_split, reference,
                           reference_json, parent_run_id,
                           promotion_config, eval_sets, champion_metric, data_access) -> dsl.PipelineTask:
    """Stages 4-6, shared by the full pipeline and the single-stage rerun: the learner, its zero-shot
    evaluation, their tracking and the learner's promotion through the MLflow registry; returns the evaluation."""
    multinode = settings.multinode
    task = train_learner(config_json=learner_config, profile=profile, method=method, score=score,
                         filter_ratio=filter_ratio, n_chunks=n_chunks, steps=steps, learning_rate=learning_rate,
                         super_batch_size=super_batch_size, model_name=model_name, storage_root=storage_root,
                         experiment=experiment, pool=pool, cache=cache, eval_split=eval_split, reference=reference,
                         nodes=settings.learner_nodes if multinode else 1,
                         multinode_json=multinode_settings(settings) if multinode else "{}",
                         data_access=data_access)
    # several nodes: this task only launches and watches the PyTorchJob, so it needs no GPU itself
    learner = (task if multinode else on_gpu_pool(settings, task, accelerator_type, accelerator_count)).set_retry(2)
    evaluation = zero_shot_eval(config_json=eval_config, profile=profile, method=method, experiment=experiment,
                                model=learner.outputs["model"], eval_split=eval_split, eval_sets=eval_sets,
                                champion_metric=champion_metric, data_access=data_access)
    track_stages(parent_run_id=parent_run_id, first=learner.outputs["Output"],
                 second=evaluation.outputs["Output"]).set_caching_options(False)
    promote_model(evaluation_json=evaluation.outputs["Output"], learner_json=learner.outputs["Output"],
                  reference_json=reference_json, parent_run_id=parent_run_id, experiment=experiment,
                  promotion_config=promotion_config).set_caching_options(False)
    return evaluation


def open_run_tracking(**params) -> dsl.PipelineTask:
    """The tracking-only task opening the MLflow parent run, keyed by the KFP run ID (never by the run's name)."""
    return open_tracking(kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, **params).set_caching_options(False)


def close_run_tracking(experiment) -> dsl.PipelineTask:
    return close_tracking(kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, experiment=experiment).set_caching_options(False)


def flexi_jest_pp_definition(
    settings: ClusterSettings,
    dataset: str = "shapes",
    data_source: str = "generate",
    curated_uri: str = "",
    pool_uri: str = "",
    eval_uri: str = "",
    profile: str = "tiny",
    method: str = LEARNER["method"],
    score: str = LEARNER["score"],
    filter_ratio: float = LEARNER["filter_ratio"],
    n_chunks: int = LEARNER["n_chunks"],
    steps: int = 0,
    learning_rate: float = 0.0,
    super_batch_size: int = 0,
    model_name: str = "",
    batch_size: int = 0,
    init_checkpoint: str = "",
    baseline_methods: List[str] = ["uniform", "offline-filter"],
    baseline_budget: str = "learner-flops",
    storage_root: str = "",
    experiment: str = "flexi-jest",
    run_name: str = "flexi-jest-pp",
    data_config: str = "{}",
    reference_config: str = "{}",
    cache_config: str = "{}",
    learner_config: str = FLEXI_TINY,
    baseline_config: str = "{}",
    eval_config: str = "{}",
    eval_sets: List[str] = [],
    champion_metric: str = "",
    promotion_config: str = "{}",
    accelerator_type: str = "nvidia.com/gpu",
    accelerator_count: str = "1",
    data_access: str = "{}",
):
    """The knobs a rerun changes are typed parameters (editable in the KFP UI) that override the stage's JSON
    config: the learner's method, score, filter_ratio, n_chunks, steps, learning_rate (optim.lr),
    super_batch_size and model_name (a preset of flexi_jest.config.MODEL_PRESETS), also used by the baselines;
    the reference's batch_size and init_checkpoint. steps, learning_rate, super_batch_size, model_name,
    batch_size and init_checkpoint at 0 / "" keep the config's (or profile's) value. *_config are JSON objects
    of stage config fields (validated by the stage's Pydantic model; promotion_config: config.ChampionRule);
    storage_root "" keeps data beside the KFP artifacts; run_name labels the MLflow parent run (runs are found
    by the KFP run ID, and a name never enters a cached stage). eval_sets: more eval sets besides the eval
    split, each 'name=uri' (an ImageFolder, a CLIP_benchmark webdataset root, tars), reported under its name;
    champion_metric: the metric promotion compares, e.g. 'imagenet-val.top1' ("": the eval split's top1).
    data_source "generate" makes `dataset`'s data; "register" trains on the team's own data: curated_uri, pool_uri
    and eval_uri are dataset specs (a directory, `pool/{00000..00099}.tar`, s3://..., '::'-joined, ...).
    baseline_budget "learner-flops" (the paper's count): each baseline trains on the main learner's own FLOPs,
    its scoring and training, the reference's cached embeddings free; "flops": on its total-FLOP budget, the
    reference's share charged to whichever uses it; "steps": for the main learner's steps.
    data_access: what every stage's dataset specs may reach besides storage, a JSON config.DataAccess, e.g.
    '{"pipe_commands": ["curl"], "allow_http": true}'; the default "{}" refuses pipe: and http(s) specs
    (docs/security.md: the pods hold the S3 and MLflow Secrets)."""
    with dsl.ExitHandler(close_run_tracking(experiment)):
        tracking = open_run_tracking(run_name=run_name, experiment=experiment, dataset=dataset, profile=profile,
                                     method=method, score=score, filter_ratio=filter_ratio, n_chunks=n_chunks,
                                     steps=steps, storage_root=storage_root)
        parent_run_id = tracking.outputs["Output"]
        data = prepare_data(config_json=data_config, profile=profile, dataset=dataset, storage_root=storage_root,
                            experiment=experiment, source=data_source, curated_uri=curated_uri, pool_uri=pool_uri,
                            eval_uri=eval_uri, data_access=data_access).after(tracking)
        reference = on_gpu_pool(settings, reference_finetune(
            config_json=reference_config, profile=profile, storage_root=storage_root, experiment=experiment,
            curated=data.outputs["curated"], batch_size=batch_size, init_checkpoint=init_checkpoint,
            data_access=data_access), accelerator_type, accelerator_count)
        cache = on_gpu_pool(settings, cache_reference_scores(
            config_json=cache_config, profile=profile, experiment=experiment, storage_root=storage_root,
            reference=reference.outputs["model"], pool=data.outputs["pool"], data_access=data_access),
            accelerator_type, accelerator_count)
        track_stages(parent_run_id=parent_run_id, first=data.outputs["Output"], second=reference.outputs["Output"],
                     third=cache.outputs["Output"]).set_caching_options(False)
        evaluation = train_evaluate_promote(
            settings, learner_config=learner_config, eval_config=eval_config, profile=profile, method=method,
            score=score,
            filter_ratio=filter_ratio, n_chunks=n_chunks, steps=steps, learning_rate=learning_rate,
            super_batch_size=super_batch_size, model_name=model_name, storage_root=storage_root,
            experiment=experiment, accelerator_type=accelerator_type, accelerator_count=accelerator_count,
            pool=data.outputs["pool"], cache=cache.outputs["cache"], eval_split=data.outputs["eval_split"],
            reference=reference.outputs["model"], reference_json=reference.outputs["Output"],
            parent_run_id=parent_run_id,
            promotion_config=promotion_config, eval_sets=eval_sets, champion_metric=champion_metric,
            data_access=data_access)
        with dsl.ParallelFor(baseline_methods) as baseline:
            baseline_learner = on_gpu_pool(settings, train_learner(
                config_json=baseline_config, profile=profile, method=baseline, score=score, filter_ratio=filter_ratio,
                n_chunks=n_chunks, steps=steps, learning_rate=learning_rate, super_batch_size=super_batch_size,
                model_name=model_name, storage_root=storage_root, experiment=experiment,
                pool=data.outputs["pool"], cache=cache.outputs["cache"], eval_split=data.outputs["eval_split"],
                reference=reference.outputs["model"], budget=baseline_budget, main_config_json=learner_config,
                main_method=method, main_score=score, data_access=data_access), accelerator_type,
                accelerator_count).set_retry(2)
            baseline_evaluation = zero_shot_eval(
                config_json=eval_config, profile=profile, method=baseline, experiment=experiment,
                model=baseline_learner.outputs["model"], eval_split=data.outputs["eval_split"], eval_sets=eval_sets,
                champion_metric=champion_metric, data_access=data_access)
        # the reference's own zero-shot metric beside its learners' (a learner passing it: data-quality bootstrapping)
        reference_evaluation = zero_shot_eval(
            config_json=eval_config, profile=profile, method="reference", experiment=experiment,
            model=reference.outputs["model"], eval_split=data.outputs["eval_split"], eval_sets=eval_sets,
            champion_metric=champion_metric, data_access=data_access)
        # the baselines' tracking after their loop: inside it, KFP 2.17's local execution resolves an upstream
        # task's output parameter to the loop item
        track_stages(parent_run_id=parent_run_id, first=reference_evaluation.outputs["Output"],
                     learners=dsl.Collected(baseline_learner.outputs["Output"]),
                     evaluations=dsl.Collected(baseline_evaluation.outputs["Output"])).set_caching_options(False)
        compare_methods(main=evaluation.outputs["Output"],
                        baselines=dsl.Collected(baseline_evaluation.outputs["Output"]),
                        parent_run_id=parent_run_id,
                        reference=reference_evaluation.outputs["Output"]).set_caching_options(False)


RERUN_STAGES = {  # --from-stage of a rerun -> what it runs, after resolving the earlier run's outputs
    "train_reference": "the reference, its cache of the pool, the learner, its evaluation and promotion",
    "cache_reference": "the reference's cache of the pool, the learner, its evaluation and promotion",
    "train_learner": "the learner, its evaluation and promotion",
    "evaluate": "the evaluation of the earlier run's learner (e.g. on more eval_sets) and its promotion",
}


# the full pipeline's parameters a rerun has no stage for: the data's and the baselines'
FULL_PIPELINE_ONLY = ("dataset", "data_source", "curated_uri", "pool_uri", "eval_uri", "baseline_methods",
                      "baseline_budget", "data_config", "baseline_config")


def rerun_parameters(stage: str) -> list[inspect.Parameter]:
    """A rerun's parameters, derived from the full pipeline's (one source): from_run first, then the full
    pipeline's knobs less FULL_PIPELINE_ONLY, with run_name's default naming the rerun."""
    parameters = [inspect.Parameter("from_run", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str)]
    for parameter in PIPELINE_PARAMETERS:
        if parameter.name == "run_name":
            parameter = parameter.replace(default=f"flexi-jest-rerun-{stage}")
        if parameter.name not in FULL_PIPELINE_ONLY:
            parameters.append(parameter)
    return parameters


def rerun_definition(settings: ClusterSettings, stage: str, **params: Any) -> None:
    """The single-stage rerun from `stage` (RERUN_STAGES): the earlier run's outputs upstream of it are resolved
    from its MLflow parent run (from_run: its KFP run ID or MLflow parent run id, one argument), and the stage
    and those after it run. params: rerun_parameters(stage), the knobs as in the full pipeline; those of stages a
    rerun skips are ignored."""
    k = types.SimpleNamespace(**params)
    with dsl.ExitHandler(close_run_tracking(k.experiment)):
        tracking = open_run_tracking(run_name=k.run_name, experiment=k.experiment, dataset="(from run)",
                                     profile=k.profile, method=k.method, score=k.score, filter_ratio=k.filter_ratio,
                                     n_chunks=k.n_chunks, steps=k.steps, storage_root=k.storage_root)
        parent_run_id = tracking.outputs["Output"]
        earlier = resolve_run(from_run=k.from_run, parent_run_id=parent_run_id, stage=stage,
                              data_access=k.data_access).set_caching_options(False)
        reference, reference_json = earlier.outputs["reference"], earlier.outputs["reference_json"]
        cache = earlier.outputs["cache"]
        if stage == "train_reference":
            trained = on_gpu_pool(settings, reference_finetune(
                config_json=k.reference_config, profile=k.profile, storage_root=k.storage_root,
                experiment=k.experiment,
                curated=earlier.outputs["curated"], batch_size=k.batch_size, init_checkpoint=k.init_checkpoint,
                data_access=k.data_access), k.accelerator_type, k.accelerator_count)
            reference, reference_json = trained.outputs["model"], trained.outputs["Output"]
        if stage in ("train_reference", "cache_reference"):
            cached = on_gpu_pool(settings, cache_reference_scores(
                config_json=k.cache_config, profile=k.profile, experiment=k.experiment, storage_root=k.storage_root,
                reference=reference, pool=earlier.outputs["pool"], data_access=k.data_access), k.accelerator_type,
                k.accelerator_count)
            track_stages(parent_run_id=parent_run_id, first=reference_json if stage == "train_reference" else "",
                         second=cached.outputs["Output"]).set_caching_options(False)
            cache = cached.outputs["cache"]
        if stage == "evaluate":
            evaluation = zero_shot_eval(config_json=k.eval_config, profile=k.profile, method=k.method,
                                        experiment=k.experiment, model=earlier.outputs["learner"],
                                        eval_split=earlier.outputs["eval_split"], eval_sets=k.eval_sets,
                                        champion_metric=k.champion_metric, data_access=k.data_access)
            track_stages(parent_run_id=parent_run_id, first=evaluation.outputs["Output"]).set_caching_options(False)
            promote_model(evaluation_json=evaluation.outputs["Output"], learner_json=earlier.outputs["learner_json"],
                          reference_json=reference_json, parent_run_id=parent_run_id, experiment=k.experiment,
                          promotion_config=k.promotion_config).set_caching_options(False)
        else:
            evaluation = train_evaluate_promote(
                settings, learner_config=k.learner_config, eval_config=k.eval_config, profile=k.profile,
                method=k.method, score=k.score,
                filter_ratio=k.filter_ratio, n_chunks=k.n_chunks, steps=k.steps, learning_rate=k.learning_rate,
                super_batch_size=k.super_batch_size, model_name=k.model_name, storage_root=k.storage_root,
                experiment=k.experiment, accelerator_type=k.accelerator_type, accelerator_count=k.accelerator_count,
                pool=earlier.outputs["pool"], cache=cache, eval_split=earlier.outputs["eval_split"],
                reference=reference, reference_json=reference_json, parent_run_id=parent_run_id,
                promotion_config=k.promotion_config, eval_sets=k.eval_sets, champion_metric=k.champion_metric,
                data_access=k.data_access)
        compare_methods(main=evaluation.outputs["Output"], baselines=[],
                        parent_run_id=parent_run_id).set_caching_options(False)


def make_pipeline(definition, name: str, description: str, settings: ClusterSettings,
                  parameters: list[inspect.Parameter], *bound: Any):
    """A pipeline of `parameters` (KFP compiles the pipeline function's signature), built by
    definition(settings, *bound, **arguments) for a cluster or for local execution (settings), with the cluster's
    services on every task (add_cluster_services)."""
    signature = inspect.Signature(parameters)

    def pipeline_function(*args: Any, **kwargs: Any) -> None:  # KFP passes the parameters positionally
        definition(settings, *bound, **signature.bind(*args, **kwargs).arguments)
        add_cluster_services(settings)

    pipeline_function.__name__ = definition.__name__ if not bound else f"rerun_from_{bound[0]}"
    pipeline_function.__doc__ = definition.__doc__
    pipeline_function.__signature__ = signature
    return dsl.pipeline(name=name, description=description)(pipeline_function)


# the full pipeline's parameters: flexi_jest_pp_definition's after the settings
PIPELINE_PARAMETERS = list(inspect.signature(flexi_jest_pp_definition).parameters.values())[1:]
DEFINITIONS = [  # --from-stage, definition, its parameters, what it binds after the settings, name, description
    ("prepare_data", flexi_jest_pp_definition, PIPELINE_PARAMETERS, (), "flexi-jest-pp",
     "Flexi-JEST++: joint example selection with a FlexiViT learner"),
    *((stage, rerun_definition, rerun_parameters(stage), (stage,), f"flexi-jest-pp-rerun-{stage.replace('_', '-')}",
       f"Flexi-JEST++ rerun from {stage} on an earlier run's outputs: {what}") for stage, what in RERUN_STAGES.items()),
]


def build(from_stage: str, settings: ClusterSettings):
    """The pipeline from `from_stage` (prepare_data: the whole pipeline) under settings."""
    _, definition, parameters, bound, name, description = next(d for d in DEFINITIONS if d[0] == from_stage)
    return make_pipeline(definition, name, description, settings, parameters, *bound)


PIPELINES = {stage: (build(stage, CLUSTER), build(stage, LOCAL)) for stage, *_ in DEFINITIONS}  # (cluster, local)


def cluster_pipeline(from_stage: str = "prepare_data", learner_nodes: int = 1, gpus_per_node: int = 1):
    """The pipeline for a cluster; with learner_nodes > 1 its main learner is a multi-node PyTorchJob."""
    if learner_nodes <= 1:
        return PIPELINES[from_stage][0]
    return build(from_stage, ClusterSettings(learner_nodes=learner_nodes, gpus_per_node=gpus_per_node))


flexi_jest_pp, flexi_jest_pp_local = PIPELINES["prepare_data"]


# ---- the command line ------------------------------------------------------------------------------------


def parse_params(pairs: list[str], pipeline=None) -> dict[str, Any]:
    """["steps=100", "baseline_methods=[\"uniform\"]"] -> pipeline arguments typed by the pipeline's signature
    (string parameters, the *_config JSON objects included, stay strings; others are parsed as JSON)."""
    import inspect

    signature = inspect.signature((pipeline or flexi_jest_pp).pipeline_func).parameters
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"--param expects key=value, got {pair!r}")
        if key not in signature:
            raise SystemExit(f"unknown pipeline parameter {key!r}; expected one of {sorted(signature)}")
        if signature[key].annotation is str:
            params[key] = raw
            continue
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--param {key}: {raw!r} is not a JSON value ({exc})") from None
    return params


def compile_pipeline(out: str, from_stage: str = "prepare_data", learner_nodes: int = 1,
                     gpus_per_node: int = 1) -> None:
    pipeline = cluster_pipeline(from_stage, learner_nodes, gpus_per_node)
    compiler.Compiler().compile(pipeline, package_path=out)
    print(f"compiled {pipeline.name} to {out}")


def summarize(tracking_uri: str, parent_run_id: str, workdir: Path) -> dict[str, Any]:
    """From MLflow: the parent run, each method's eval metrics and FLOPs, the registered learner, the stages KFP
    took from its cache, and the methods' comparison (compare_methods: accuracy-vs-FLOPs plot, downloaded into
    workdir, and FLOPs ratios)."""
    import mlflow

    from flexi_jest.tracking import STAGE_TAG, find_pipeline_run

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    parent = find_pipeline_run(parent_run_id)
    if parent is None:
        raise SystemExit(
            f"no MLflow pipeline run {parent_run_id!r} in {tracking_uri}: the pipeline did not start tracking")
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    comparison = json.loads(Path(client.download_artifacts(parent.info.run_id, "method_comparison.json",
                                                           str(workdir))).read_text())
    plot = client.download_artifacts(parent.info.run_id, "accuracy_vs_flops.png", str(workdir))
    tags = parent.data.tags
    evaluations = [client.get_run(run_id) for key, run_id in sorted(tags.items())
                   if key.startswith(f"{STAGE_TAG}evaluate.")]  # computed here or taken from KFP's cache
    rows = []
    headline = comparison["metric"].rsplit(".", 1)[0]  # the eval split the methods are compared on
    for run in evaluations:
        m = run.data.metrics
        top1, i2t, t2i = (m.get(f"splits.{headline}.{key}") for key in ("top1", "image_to_text_r1", "text_to_image_r1"))
        method = run.data.tags.get("flexi_jest.method")
        compared = comparison["methods"].get(method, {})  # the reference is evaluated, not compared
        total = m.get("total_flops")
        rows.append({"method": method, "top1": top1, "i2t_r1": i2t, "t2i_r1": t2i, "total_flops": total,
                     "learner_flops": total - compared.get("reference_share_flops", 0.0) if total else None,
                     **{field: compared.get(field) for field in ("steps_to_target", "flops_to_target",
                                                                 "flops_ratio_vs_uniform",
                                                                 "flops_ratio_vs_uniform_learner_only",
                                                                 "break_even_runs")}})
    rows.sort(key=lambda r: r["method"] or "")
    promotion = next((r for r in children if r.data.tags.get("flexi_jest.stage") == "promote"), None)
    cached = sorted(key.split(".", 2)[2] for key, value in tags.items()
                    if key.startswith("flexi_jest.cached.") and value == "true")
    return {"parent_run_id": parent.info.run_id, "kfp_run_id": tags.get("flexi_jest.kfp_run_id"), "rows": rows,
            "plot": plot, "comparison": comparison, "cached_stages": cached,
            "decision": promotion.data.tags.get("decision") if promotion else None,
            "learner_version": promotion.data.tags.get("learner_version") if promotion else None}


# --runner docker: the services and S3 keys a component container gets from this environment, as a pod gets
# them from the cluster's env and its Secret (with_cluster_services); nothing else of this machine goes in.
CONTAINER_ENV = ("MLFLOW_TRACKING_URI", "FLEXI_JEST_S3_ENDPOINT", "MLFLOW_S3_ENDPOINT_URL", "FLEXI_JEST_S3_REGION",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                 "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")  # an MLflow server with basic auth (k8s/)
CONTAINER_USER = "10001:10001"  # the images' USER, as a pod's securityContext runAsUser/runAsGroup would set
# KFP's Docker task handler calls docker.from_env() with docker-py's 60 s read timeout, which also bounds the
# silence between two lines of a container's streamed log: a component quiet for a minute (a training step on a
# loaded machine), or podman's API busy removing the previous container, would fail a task that is fine.
DOCKER_API_TIMEOUT_S = 3600


def docker_runner(params: dict[str, Any]):
    """KFP's DockerRunner, running each component in its image (components/image.py: FLEXI_JEST_IMAGE) as a pod
    would: as CONTAINER_USER, only KFP's pipeline root mounted, the MLflow server and S3 reached over the network
    (their URLs must be reachable from the containers, not loopback), data at an s3:// storage_root."""
    from kfp import local

    tracking = os.environ.get("MLFLOW_TRACKING_URI", "")
    endpoint = os.environ.get("FLEXI_JEST_S3_ENDPOINT") or os.environ.get("MLFLOW_S3_ENDPOINT_URL", "")
    problems = []
    if not tracking.startswith(("http://", "https://")):
        problems.append(f"MLFLOW_TRACKING_URI must be an MLflow server the containers reach (http://...), "
                        f"got {tracking or 'nothing'}")
    if not endpoint.startswith(("http://", "https://")):
        problems.append("FLEXI_JEST_S3_ENDPOINT must be the S3 server the containers reach (http://...)")
    if not str(params.get("storage_root", "")).startswith("s3://"):
        problems.append("--param storage_root=s3://bucket/prefix is required: a container's own disk is gone after it")
    for url in (tracking, endpoint):
        if any(f"//{host}" in url for host in ("127.", "localhost", "[::1]")):
            problems.append(f"{url} is loopback: inside a container that is the container itself")
    if problems:
        raise SystemExit("run-local --runner docker: " + "; ".join(problems))
    import docker.client

    docker.client.DEFAULT_TIMEOUT_SECONDS = DOCKER_API_TIMEOUT_S  # from_env's default, read when it is called
    environment = {name: os.environ[name] for name in CONTAINER_ENV if os.environ.get(name)}
    return local.DockerRunner(user=CONTAINER_USER, environment=environment)


def local_parent_run_id(pipeline_root: Path, pipeline_name: str, since: float) -> str:
    """The MLflow parent run id of the local pipeline run started at `since`: open_tracking's `tracking`
    artifact (KFP local execution names the run <pipeline name>-<timestamp> and does not hand out its run ID)."""
    found = sorted((path.stat().st_mtime,
                    path) for path in pipeline_root.glob(f"{pipeline_name}-*/open-tracking/tracking")
                   if path.stat().st_mtime >= since)
    if not found:
        raise SystemExit(
            f"the pipeline wrote no open-tracking artifact under {pipeline_root}: it did not start tracking")
    return json.loads(found[-1][1].read_text())["mlflow_run_id"]


def code_digest(repo: Path = Path(__file__).resolve().parents[1]) -> str:
    """sha256 (12 hex) of the code a local run executes: every .py file of the library and the components.
    KFP's cache key holds a component's own source and image tag, not the library it calls, so run-local keeps
    one cache per code digest: a stage is never taken from the cache of other code."""
    digest = hashlib.sha256()
    for path in sorted([*(repo / "src" / "flexi_jest").rglob("*.py"), *(repo / "components").rglob("*.py")]):
        digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def run_local(workdir: str, params: dict[str, Any], from_stage: str = "prepare_data",
              runner: str = "subprocess", cache: bool = True) -> dict[str, Any]:
    """Run the whole pipeline with KFP local execution: subprocesses in this environment, or (runner "docker")
    each component in its container image (docker_runner). cache: KFP's local cache under workdir/kfp-cache,
    so that a rerun with one knob changed recomputes only what depends on it (one cache per code_digest)."""
    from kfp import local

    root = Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if runner == "docker":
        task_runner = docker_runner(params)
        # KFP mounts its pipeline root into every container at the same path; CONTAINER_USER writes there.
        (root / "kfp").mkdir(exist_ok=True)
        (root / "kfp").chmod(0o1777)
    else:
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        os.environ.setdefault("MLFLOW_ARTIFACTS_DESTINATION", str(root / "mlartifacts"))
        task_runner = local.SubprocessRunner(use_venv=False)
    params = {"run_name": f"flexi-jest-pp-{time.strftime('%Y%m%d-%H%M%S')}", **params}
    if runner != "docker":  # the ParallelFor's baselines train side by side here: each takes its share of the cores
        baselines = params.get("baseline_methods", inspect.signature(flexi_jest_pp_definition).parameters[
            "baseline_methods"].default)
        os.environ.setdefault(SHARED_CPU_ENV, str(max(1, len(baselines))))
    local.init(runner=task_runner, pipeline_root=str(root / "kfp"), enable_caching=cache,
               cache_root=str(root / "kfp-cache" / code_digest()))
    pipeline = PIPELINES[from_stage][1]
    started_at = time.time() - 1
    started = time.perf_counter()
    pipeline(**params)
    seconds = time.perf_counter() - started
    parent_run_id = local_parent_run_id(root / "kfp", pipeline.name, started_at)
    summary = summarize(os.environ["MLFLOW_TRACKING_URI"], parent_run_id, root)
    summary["seconds"] = seconds
    summary["tracking_uri"] = os.environ["MLFLOW_TRACKING_URI"]
    summary["runner"] = runner
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"pipeline finished in {summary['seconds']:.1f} s; MLflow parent run {summary['parent_run_id']} "
             f"(rerun a stage on its outputs: --from-run {summary['parent_run_id']} [--from-stage STAGE])",
             f"from KFP's cache: {', '.join(summary['cached_stages']) or 'nothing'}",
             f"MLflow store: {summary['tracking_uri']}  (browse: mlflow ui --backend-store-uri "
             f"{summary['tracking_uri']})",
             f"registered model: flexi-jest-learner version {summary['learner_version']} -> alias "
             f"'{summary['decision']}'",
             f"accuracy-vs-FLOPs plot: {summary['plot']}", "",
             f"{'method':<15} {'top1':>7} {'i2t R@1':>8} {'t2i R@1':>8} {'learner GFLOP':>13} {'all GFLOP':>10} "
             f"{'steps to tgt':>12} {'learner ratio':>13} {'all ratio':>10} {'break-even':>10}"]
    for row in summary["rows"]:
        fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
        times = lambda v: f"{v:.2f}x" if v else "-"  # noqa: E731
        giga = lambda v: f"{v / 1e9:.1f}" if v else "-"  # noqa: E731
        steps = f"{row['steps_to_target']:.0f}" if row.get("steps_to_target") is not None else "-"
        runs = row.get("break_even_runs")
        even = "-" if row["method"] in ("reference", "uniform") or row.get("flops_to_target") is None else (
            "never" if runs is None else f"{runs} run{'s' if runs > 1 else ''}")
        lines.append(
            f"{row['method'] or '?':<15} {fmt(row['top1']):>7} {fmt(row['i2t_r1']):>8} {fmt(row['t2i_r1']):>8} "
                     f"{giga(row.get('learner_flops')):>13} {giga(row['total_flops']):>10} {steps:>12} "
                     f"{times(row.get('flops_ratio_vs_uniform_learner_only')):>13} "
                     f"{times(row.get('flops_ratio_vs_uniform')):>10} {even:>10}")
    lines.append("learner: learner FLOPs (reference cached: the paper's count); all: all FLOPs (reference training and "
                 "caching charged); steps to tgt: training steps to reach uniform's final top-1 ('-': never, or the "
                 "reference, which is evaluated, not compared); ratio: uniform's FLOPs to that top-1 / the method's "
                 "(> 1: cheaper); break-even: learner runs on this pool and reference before the method's all-FLOPs "
                 "total falls below uniform's")
    return "\n".join(lines)


def submit(host: str, experiment: str, params: dict[str, Any], from_stage: str = "prepare_data", learner_nodes: int = 1,
           gpus_per_node: int = 1, service_account: str = "") -> None:
    """Submit to a Kubeflow Pipelines endpoint. A multi-node learner launches a PyTorchJob: run the pipeline under
    a service account allowed to (k8s/base: flexi-jest-pipeline-runner's Role)."""
    import kfp

    pipeline = cluster_pipeline(from_stage, learner_nodes, gpus_per_node)
    client = kfp.Client(host=host)
    run = client.create_run_from_pipeline_func(pipeline, arguments=params, experiment_name=experiment,
                                               service_account=service_account or None)
    print(f"submitted run {run.run_id} to {host}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("compile", help="write the KFP IR YAML")
    c.add_argument("--out", default="flexi_jest_pp.yaml")
    r = commands.add_parser("run-local", help="run the whole pipeline here with KFP local execution")
    r.add_argument("--workdir", default="runs/pipeline")
    r.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--runner", choices=("subprocess", "docker"), default="subprocess",
                   help="docker: each component in its image (FLEXI_JEST_IMAGE) through DOCKER_HOST, as uid 10001, "
                        "with MLFLOW_TRACKING_URI and FLEXI_JEST_S3_ENDPOINT servers the containers reach and an "
                        "s3:// storage_root (README, \"Before a cluster\")")
    r.add_argument("--no-cache", action="store_true", help="recompute every stage (default: KFP's local cache "
                   "under WORKDIR/kfp-cache reuses stages whose inputs are unchanged)")
    s = commands.add_parser("submit", help="submit to a Kubeflow Pipelines endpoint")
    s.add_argument("--host", required=True)
    s.add_argument("--experiment", default="flexi-jest")
    s.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--service-account", default="", help="the pipeline pods' service account (multi-node: "
                   "one allowed to create PyTorchJobs)")
    for sub in (c, s):
        sub.add_argument("--learner-nodes", type=int, default=1, help="> 1: train the main learner as a PyTorchJob "
                         "on this many nodes (storage_root must be s3://...)")
        sub.add_argument("--gpus-per-node", type=int, default=1)
    for sub in (c, r, s):
        sub.add_argument("--from-stage", default="prepare_data", choices=list(PIPELINES),
                         help="prepare_data: the whole pipeline; another stage: rerun from it on an earlier run's "
                              "outputs, given by --from-run (" + "; ".join(f"{k}: {v}" for k, v in RERUN_STAGES.items())
                              + ")")
    for sub in (r, s):
        sub.add_argument("--from-run", default="", metavar="RUN_ID", help="rerun on this earlier pipeline run's "
                         "outputs (its KFP run ID or MLflow parent run id), from --from-stage (default: train_learner)")
    args = parser.parse_args(argv)
    from_stage = args.from_stage
    if getattr(args, "from_run", "") and from_stage == "prepare_data":
        from_stage = "train_learner"
    pipeline = PIPELINES[from_stage][0]
    params = parse_params(getattr(args, "param", []), pipeline)
    if getattr(args, "from_run", ""):
        params["from_run"] = args.from_run
    if args.command != "compile" and from_stage != "prepare_data" and not params.get("from_run"):
        raise SystemExit(f"--from-stage {from_stage} reruns on an earlier run's outputs: give that run with --from-run")
    if args.command == "compile":
        compile_pipeline(args.out, from_stage, args.learner_nodes, args.gpus_per_node)
    elif args.command == "run-local":
        print(format_summary(run_local(args.workdir, params, from_stage, args.runner, cache=not args.no_cache)))
    else:
        submit(args.host, args.experiment, params, from_stage, args.learner_nodes, args.gpus_per_node,
               args.service_account)
    return 0


if __name__ == "__main__":
    sys.exit(main())
