"""The Flexi-JEST++ pipeline's DAG: data -> reference -> reference cache -> JEST learner (+ baselines) -> eval ->
promotion, and its reruns from one stage, for a cluster (GPU node pools, Secrets) or for this machine.

Every stage is a component over a flexi_jest library function (components/stages.py), tracked in
MLflow (one parent run per pipeline run, a nested run per stage) with its data at storage URIs
(local paths, or s3://... on a cluster via FLEXI_JEST_S3_ENDPOINT). The learner named by `method`
is promoted through the MLflow registry; `baseline_methods` train side by side on the same data
and budget so that every run shows JEST against a baseline.

Its command line (pipelines/cli.py) runs from this file too; running it here: pipelines/runner.py.

    python pipelines/flexi_jest_pp.py compile --out flexi_jest_pp.yaml          # KFP IR YAML for a cluster
    python pipelines/flexi_jest_pp.py run-local --workdir runs/pipeline         # no cluster, no Docker
    python pipelines/flexi_jest_pp.py submit --host https://kfp.example.com --param steps=2000
"""

import dataclasses
import functools
import inspect
import json
import os
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `components`

from kfp import compiler, dsl, kubernetes  # noqa: E402
from kfp.dsl import pipeline_context  # noqa: E402

from components.image import GPU_IMAGE  # noqa: E402
from components.stages import (  # noqa: E402
    cache_reference,
    close_tracking,
    compare,
    evaluate,
    make_data,
    open_tracking,
    promote,
    resolve_run,
    track_stages,
    train_learner,
    train_reference,
)
from flexi_jest.config import METHOD_PRESETS, TrainLearnerConfig  # noqa: E402

# the main learner's default config: Flexi-JEST's fields of config.METHOD_PRESETS beyond the method and score knobs
FLEXI_TINY = json.dumps({k: v for k, v in METHOD_PRESETS["flexi-jest"].items() if k not in ("method", "score")})
# the learner knobs' defaults, from the learner's Pydantic config (one source of truth)
LEARNER = {name: field.default for name, field in TrainLearnerConfig.model_fields.items()}

# in-cluster defaults: the services, Secrets and node pool of k8s/base
IN_CLUSTER_S3 = "http://minio.flexi-jest.svc.cluster.local:9000"
IN_CLUSTER_MLFLOW = "http://mlflow.flexi-jest.svc.cluster.local:5000"
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
MLFLOW_SECRET_KEYS = {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                      "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"}


def cluster_url(environ: Mapping[str, str], name: str, default: str) -> str:
    """An http(s) URL from the compile-time environment, else the in-cluster default (a local MLflow store
    such as sqlite:///... exported in the shell is of no use to a pod)."""
    value = environ.get(name, "")
    return value if value.startswith(("http://", "https://")) else default


@dataclasses.dataclass(frozen=True)
class ClusterSettings:
    """How a pipeline is built, passed to every function that builds it (make_pipeline); nothing is read from
    module state. accelerators: for a cluster (GPU requests, the GPU node pool, the services' Secrets and
    endpoints); False for KFP local execution, which cannot resolve them. learner_nodes > 1 (compile
    --learner-nodes): the main learner trains as a PyTorchJob of learner_nodes x gpus_per_node GPUs.

    The rest is where the pods find the cluster's services; from_env reads it from the compile-time environment
    (the variables k8s/base's ConfigMap flexi-jest-settings holds), defaulting to k8s/base's names. The S3 and
    MLflow credentials come from the two Kubernetes Secrets named here, never from the environment."""

    accelerators: bool = True
    learner_nodes: int = 1
    gpus_per_node: int = 1
    gpu_node_selector: str = "flexi-jest/node-pool=gpu"  # key=value: FLEXI_JEST_GPU_NODE_SELECTOR
    gpu_toleration_key: str = "nvidia.com/gpu"  # FLEXI_JEST_GPU_TOLERATION
    job_namespace: str = "flexi-jest"  # where the PyTorchJob runs (the S3 Secret, the runner's Role): ..._JOB_NAMESPACE
    s3_secret: str = "flexi-jest-s3"  # FLEXI_JEST_S3_SECRET
    mlflow_secret: str = "flexi-jest-mlflow"  # FLEXI_JEST_MLFLOW_SECRET (MLflow's basic-auth account)
    s3_endpoint: str = IN_CLUSTER_S3  # FLEXI_JEST_S3_ENDPOINT
    mlflow_s3_endpoint: str = IN_CLUSTER_S3  # MLFLOW_S3_ENDPOINT_URL (default: the S3 endpoint)
    tracking_uri: str = IN_CLUSTER_MLFLOW  # MLFLOW_TRACKING_URI

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **fields: Any) -> "ClusterSettings":
        """The settings the compile-time environment (default: os.environ) gives, with fields on top."""
        env = os.environ if environ is None else environ
        s3 = cluster_url(env, "FLEXI_JEST_S3_ENDPOINT", IN_CLUSTER_S3)
        return cls(**{
            "gpu_node_selector": env.get("FLEXI_JEST_GPU_NODE_SELECTOR", cls.gpu_node_selector),
            "gpu_toleration_key": env.get("FLEXI_JEST_GPU_TOLERATION", cls.gpu_toleration_key),
            "job_namespace": env.get("FLEXI_JEST_JOB_NAMESPACE", cls.job_namespace),
            "s3_secret": env.get("FLEXI_JEST_S3_SECRET", cls.s3_secret),
            "mlflow_secret": env.get("FLEXI_JEST_MLFLOW_SECRET", cls.mlflow_secret),
            "s3_endpoint": s3, "mlflow_s3_endpoint": cluster_url(env, "MLFLOW_S3_ENDPOINT_URL", s3),
            "tracking_uri": cluster_url(env, "MLFLOW_TRACKING_URI", IN_CLUSTER_MLFLOW), **fields})

    @property
    def multinode(self) -> bool:
        return self.accelerators and self.learner_nodes > 1

    @property
    def cluster_env(self) -> dict[str, str]:
        """The endpoints every component pod gets as env vars."""
        return {"FLEXI_JEST_S3_ENDPOINT": self.s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": self.mlflow_s3_endpoint,
                "MLFLOW_TRACKING_URI": self.tracking_uri}

    @property
    def node_selector(self) -> tuple[str, str]:
        key, _, value = self.gpu_node_selector.partition("=")
        return key, value


LOCAL = ClusterSettings(accelerators=False)  # KFP local execution: nothing of the cluster


def on_gpu_pool(settings: ClusterSettings, task: dsl.PipelineTask, accelerator_type: Any,
                accelerator_count: Any) -> dsl.PipelineTask:
    """Ask for accelerators and schedule onto the GPU node pool. KFP local execution cannot resolve
    accelerator settings given as pipeline parameters, and runs on this machine's devices anyway, so the
    pipeline built for it (settings LOCAL) leaves them out."""
    if not settings.accelerators:
        return task
    task.set_accelerator_type(accelerator_type).set_accelerator_limit(accelerator_count)
    key, value = settings.node_selector
    kubernetes.add_node_selector(task, label_key=key, label_value=value)
    kubernetes.add_toleration(task, key=settings.gpu_toleration_key, operator="Exists", effect="NoSchedule")
    return task


def multinode_settings(settings: ClusterSettings) -> str:
    """What the learner task needs to launch its PyTorchJob (flexi_jest.pytorchjob.run_pytorchjob), as JSON."""
    key, value = settings.node_selector
    return json.dumps({"gpus_per_node": settings.gpus_per_node, "image": GPU_IMAGE, "node_selector": {key: value},
                       "namespace": settings.job_namespace, "toleration_key": settings.gpu_toleration_key,
                       "secret_name": settings.s3_secret, "tracking_uri": settings.tracking_uri,
                       "s3_endpoint": settings.s3_endpoint})


def add_cluster_services(settings: ClusterSettings) -> None:
    """For a cluster (settings.accelerators), the S3 and MLflow Secrets as env vars and the endpoints on every
    container task of the pipeline being built; local execution cannot resolve Kubernetes settings and uses this
    machine's env."""
    if not settings.accelerators:
        return
    for task in pipeline_context.Pipeline.get_default_pipeline().tasks.values():
        if task.component_spec.implementation.container is None:  # importers run no container
            continue
        kubernetes.use_secret_as_env(task, secret_name=settings.s3_secret, secret_key_to_env=S3_SECRET_KEYS)
        kubernetes.use_secret_as_env(task, secret_name=settings.mlflow_secret, secret_key_to_env=MLFLOW_SECRET_KEYS)
        for name, value in settings.cluster_env.items():
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
    evaluation = evaluate(config_json=eval_config, profile=profile, method=method, experiment=experiment,
                          model=learner.outputs["model"], eval_split=eval_split, eval_sets=eval_sets,
                          champion_metric=champion_metric, data_access=data_access)
    track_stages(parent_run_id=parent_run_id, first=learner.outputs["Output"],
                 second=evaluation.outputs["Output"]).set_caching_options(False)
    promote(evaluation_json=evaluation.outputs["Output"], learner_json=learner.outputs["Output"],
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
        data = make_data(config_json=data_config, profile=profile, dataset=dataset, storage_root=storage_root,
                         experiment=experiment, source=data_source, curated_uri=curated_uri, pool_uri=pool_uri,
                         eval_uri=eval_uri, data_access=data_access).after(tracking)
        reference = on_gpu_pool(settings, train_reference(
            config_json=reference_config, profile=profile, storage_root=storage_root, experiment=experiment,
            curated=data.outputs["curated"], batch_size=batch_size, init_checkpoint=init_checkpoint,
            data_access=data_access), accelerator_type, accelerator_count)
        cache = on_gpu_pool(settings, cache_reference(
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
            baseline_evaluation = evaluate(
                config_json=eval_config, profile=profile, method=baseline, experiment=experiment,
                model=baseline_learner.outputs["model"], eval_split=data.outputs["eval_split"], eval_sets=eval_sets,
                champion_metric=champion_metric, data_access=data_access)
        # the reference's own zero-shot metric beside its learners' (a learner passing it: data-quality bootstrapping)
        reference_evaluation = evaluate(
            config_json=eval_config, profile=profile, method="reference", experiment=experiment,
            model=reference.outputs["model"], eval_split=data.outputs["eval_split"], eval_sets=eval_sets,
            champion_metric=champion_metric, data_access=data_access)
        # the baselines' tracking after their loop: inside it, KFP 2.17's local execution resolves an upstream
        # task's output parameter to the loop item
        track_stages(parent_run_id=parent_run_id, first=reference_evaluation.outputs["Output"],
                     learners=dsl.Collected(baseline_learner.outputs["Output"]),
                     evaluations=dsl.Collected(baseline_evaluation.outputs["Output"])).set_caching_options(False)
        compare(main=evaluation.outputs["Output"],
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
            trained = on_gpu_pool(settings, train_reference(
                config_json=k.reference_config, profile=k.profile, storage_root=k.storage_root,
                experiment=k.experiment,
                curated=earlier.outputs["curated"], batch_size=k.batch_size, init_checkpoint=k.init_checkpoint,
                data_access=k.data_access), k.accelerator_type, k.accelerator_count)
            reference, reference_json = trained.outputs["model"], trained.outputs["Output"]
        if stage in ("train_reference", "cache_reference"):
            cached = on_gpu_pool(settings, cache_reference(
                config_json=k.cache_config, profile=k.profile, experiment=k.experiment, storage_root=k.storage_root,
                reference=reference, pool=earlier.outputs["pool"], data_access=k.data_access), k.accelerator_type,
                k.accelerator_count)
            track_stages(parent_run_id=parent_run_id, first=reference_json if stage == "train_reference" else "",
                         second=cached.outputs["Output"]).set_caching_options(False)
            cache = cached.outputs["cache"]
        if stage == "evaluate":
            evaluation = evaluate(config_json=k.eval_config, profile=k.profile, method=k.method,
                                  experiment=k.experiment, model=earlier.outputs["learner"],
                                  eval_split=earlier.outputs["eval_split"], eval_sets=k.eval_sets,
                                  champion_metric=k.champion_metric, data_access=k.data_access)
            track_stages(parent_run_id=parent_run_id, first=evaluation.outputs["Output"]).set_caching_options(False)
            promote(evaluation_json=evaluation.outputs["Output"], learner_json=earlier.outputs["learner_json"],
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
        compare(main=evaluation.outputs["Output"], baselines=[],
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
    ("make_data", flexi_jest_pp_definition, PIPELINE_PARAMETERS, (), "flexi-jest-pp",
     "Flexi-JEST++: joint example selection with a FlexiViT learner"),
    *((stage, rerun_definition, rerun_parameters(stage), (stage,), f"flexi-jest-pp-rerun-{stage.replace('_', '-')}",
       f"Flexi-JEST++ rerun from {stage} on an earlier run's outputs: {what}") for stage, what in RERUN_STAGES.items()),
]


STAGES = [stage for stage, *_ in DEFINITIONS]  # --from-stage: make_data (the whole pipeline), then the reruns


@functools.lru_cache(maxsize=None)
def build(from_stage: str, settings: ClusterSettings):
    """The pipeline from `from_stage` (make_data: the whole pipeline) under settings; built when first asked for
    (a pipeline is a few dozen DSL calls: importing this module builds none)."""
    if from_stage not in STAGES:
        raise ValueError(f"no pipeline from stage {from_stage!r}; the stages are {STAGES}")
    _, definition, parameters, bound, name, description = next(d for d in DEFINITIONS if d[0] == from_stage)
    return make_pipeline(definition, name, description, settings, parameters, *bound)


def cluster_pipeline(from_stage: str = "make_data", learner_nodes: int = 1, gpus_per_node: int = 1,
                     environ: Mapping[str, str] | None = None):
    """The pipeline for a cluster, under the compile-time environment (default: os.environ; ClusterSettings);
    with learner_nodes > 1 its main learner is a multi-node PyTorchJob."""
    settings = ClusterSettings.from_env(environ, learner_nodes=max(learner_nodes, 1),
                                        gpus_per_node=gpus_per_node if learner_nodes > 1 else 1)
    return build(from_stage, settings)


def local_pipeline(from_stage: str = "make_data"):
    """The pipeline for KFP local execution (pipelines/runner.py)."""
    return build(from_stage, LOCAL)


def __getattr__(name: str):
    """`flexi_jest_pp` and `flexi_jest_pp_local`, the whole pipeline for a cluster and for local execution, built
    on first use (PEP 562), so that `from pipelines.flexi_jest_pp import flexi_jest_pp` works as KFP's examples do."""
    if name == "flexi_jest_pp":
        return cluster_pipeline()
    if name == "flexi_jest_pp_local":
        return local_pipeline()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def compile_pipeline(out: str, from_stage: str = "make_data", learner_nodes: int = 1,
                     gpus_per_node: int = 1) -> None:
    pipeline = cluster_pipeline(from_stage, learner_nodes, gpus_per_node)
    compiler.Compiler().compile(pipeline, package_path=out)
    print(f"compiled {pipeline.name} to {out}")


if __name__ == "__main__":  # `python pipelines/flexi_jest_pp.py ...`: the command line of pipelines/cli.py, on this
    sys.modules.setdefault("pipelines.flexi_jest_pp", sys.modules[__name__])  # module (its pipelines built once)
    from pipelines.cli import main

    sys.exit(main())
