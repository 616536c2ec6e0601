"""The multi-node learner: the pipeline task launches a PyTorchJob (flexi_jest.pytorchjob.run_pytorchjob), waits
for it and tracks its result. Kubernetes is replaced by a fake API (no cluster here); storage is real S3 (moto)."""

import json

import pytest

from conftest import TEST_MODEL
from flexi_jest import storage
from flexi_jest.config import TrainLearnerConfig
from flexi_jest.pytorchjob import JobFailed, config_map_name, job_name, job_state, run_pytorchjob

SETTINGS = dict(gpus_per_node=8, image="registry.example.com/flexi-jest-cuda:0.1.0",
                node_selector={"flexi-jest/node-pool": "gpu"}, toleration_key="nvidia.com/gpu",
                secret_name="flexi-jest-s3", tracking_uri="http://mlflow:5000", namespace="team-a", poll_seconds=1.0)


class NotFound(Exception):
    status = 404


class FakeCluster:
    """CoreV1Api + CustomObjectsApi, as far as run_pytorchjob uses them. on_create(cluster, job) plays the
    training operator: it may run the training and must end by setting the job's status."""

    def __init__(self, on_create=None, states=("Created", "Running", "Succeeded")):
        self.config_maps, self.jobs, self.created, self.deleted = {}, {}, [], []
        self.on_create, self.states = on_create, list(states)
        self.calls: set[tuple[str, str, str]] = set()  # (API group, resource, RBAC verb) of every request

    def __getattribute__(self, name):
        verbs = {"read": "get", "get": "get", "create": "create", "replace": "update", "delete": "delete"}
        if name.split("_")[0] in verbs and name.endswith(("config_map", "custom_object")):
            group, resource = ("", "configmaps") if name.endswith("config_map") else ("kubeflow.org", "pytorchjobs")
            object.__getattribute__(self, "calls").add((group, resource, verbs[name.split("_")[0]]))
        return object.__getattribute__(self, name)

    # CoreV1Api
    def read_namespaced_config_map(self, name, namespace):
        if name not in self.config_maps:
            raise NotFound(name)
        return self.config_maps[name]

    def create_namespaced_config_map(self, namespace, body):
        self.config_maps[body["metadata"]["name"]] = body

    def replace_namespaced_config_map(self, name, namespace, body):
        self.config_maps[name] = body

    # CustomObjectsApi
    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        if name not in self.jobs:
            raise NotFound(name)
        job = self.jobs[name]
        if self.states and job.get("managed"):  # the operator moves the job on at each poll
            set_state(job, self.states.pop(0))
        return job

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        assert (group, version, plural) == ("kubeflow.org", "v1", "pytorchjobs")
        job = {**body, "managed": True}
        self.jobs[body["metadata"]["name"]] = job
        self.created.append(body)
        if self.on_create:
            self.on_create(self, job)

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.deleted.append(name)
        del self.jobs[name]


def set_state(job: dict, state: str, message: str = "") -> None:
    job.setdefault("status", {}).setdefault("conditions",
                                            []).append({"type": state, "status": "True", "message": message})


def write_result(out_dir: str, **fields) -> None:
    result = {"out_dir": out_dir, "checkpoint": storage.join(out_dir, "model.pt"), "checkpoint_sha256": "ab" * 32,
              "steps": 5, "final_loss": 1.5, "seconds": 10.0, "images_per_second": 100.0, "flops": {},
              "total_flops": 1e12, "metrics_path": storage.join(out_dir, "metrics.jsonl"), "world_size": 16, **fields}
    storage.write_bytes(storage.join(out_dir, "result.json"), json.dumps(result).encode())


def test_job_state_reads_the_newest_true_condition():
    assert job_state({}) == ("Pending", "")
    job = {"status": {"conditions": [{"type": "Created", "status": "True"}, {"type": "Running", "status": "True"},
                                     {"type": "Restarting", "status": "False"}]}}
    assert job_state(job) == ("Running", "")


def test_launch_creates_the_config_map_and_job_waits_and_returns_the_result(s3):  # noqa: F811
    out_dir = f"{s3}/runs/learner"
    cluster = FakeCluster(on_create=lambda c, job: write_result(out_dir))
    config = json.dumps({"out_dir": out_dir, "method": "joint"})
    sleeps = []
    result = run_pytorchjob(config, out_dir, nodes=2, apis=(cluster, cluster), sleep=sleeps.append, **SETTINGS)

    assert result["world_size"] == 16 and result["steps"] == 5
    name = job_name(out_dir)
    assert cluster.config_maps[config_map_name(name)]["data"]["config.json"] == config
    (job,) = cluster.created
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert job["metadata"]["namespace"] == "team-a" and job["spec"]["nprocPerNode"] == "8"
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 1
    container = specs["Worker"]["template"]["spec"]["containers"][0]
    assert container["image"] == SETTINGS["image"] and container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert len(sleeps) == 2  # Created, Running, then Succeeded


def test_a_failed_job_is_an_error_naming_it_and_where_to_look(s3):  # noqa: F811
    out_dir = f"{s3}/runs/learner"
    cluster = FakeCluster(states=("Running", "Failed"))
    with pytest.raises(JobFailed, match=f"PyTorchJob team-a/{job_name(out_dir)} failed.*kubectl -n team-a logs"):
        run_pytorchjob("{}", out_dir, nodes=2, apis=(cluster, cluster), sleep=lambda s: None, **SETTINGS)


def test_a_job_that_never_finishes_times_out(s3):  # noqa: F811
    cluster = FakeCluster(states=["Running"] * 100)
    with pytest.raises(JobFailed, match="did not finish in 3 s"):
        run_pytorchjob("{}", f"{s3}/x", nodes=2, apis=(cluster, cluster), sleep=lambda s: None, timeout_seconds=3,
                       **SETTINGS)


def test_a_success_without_a_result_is_an_error(s3):  # noqa: F811
    cluster = FakeCluster()
    with pytest.raises(JobFailed, match="wrote no .*result.json"):
        run_pytorchjob("{}", f"{s3}/empty", nodes=2, apis=(cluster, cluster), sleep=lambda s: None, **SETTINGS)


def test_a_retried_task_waits_for_its_running_job_and_replaces_a_failed_one(s3):  # noqa: F811
    out_dir = f"{s3}/runs/retry"
    name = job_name(out_dir)
    running = FakeCluster(states=("Succeeded",))
    running.jobs[name] = {"metadata": {"name": name}, "managed": True}
    write_result(out_dir)
    run_pytorchjob("{}", out_dir, nodes=3, apis=(running, running), sleep=lambda s: None, **SETTINGS)
    assert running.created == []  # waited for the job already there

    failed = FakeCluster(states=("Running", "Succeeded"))
    failed.jobs[name] = {"metadata": {"name": name}, "status": {"conditions": [{"type": "Failed", "status": "True"}]}}
    run_pytorchjob("{}", out_dir, nodes=3, apis=(failed, failed), sleep=lambda s: None, **SETTINGS)
    assert failed.deleted == [name] and len(failed.created) == 1  # a new job, resuming from out_dir's checkpoints
    assert failed.created[0]["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2


def test_the_runner_role_allows_every_request_the_launcher_makes(s3):  # noqa: F811
    """Every call of a launch (create), a retry (read, replace, delete) is granted by k8s/base/rbac.yaml's Role."""
    from pathlib import Path

    import yaml

    out_dir = f"{s3}/runs/rbac"
    name = job_name(out_dir)
    cluster = FakeCluster(states=("Succeeded",))
    cluster.jobs[name] = {"metadata": {"name": name}, "status": {"conditions": [{"type": "Failed", "status": "True"}]}}
    cluster.config_maps[config_map_name(name)] = {}
    write_result(out_dir)
    run_pytorchjob("{}", out_dir, nodes=2, apis=(cluster, cluster), sleep=lambda s: None, **SETTINGS)
    role = next(d for d in yaml.safe_load_all((Path(__file__).parents[1] / "k8s/base/rbac.yaml").read_text())
                if d["kind"] == "Role")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert {("", "configmaps", "update"), ("kubeflow.org", "pytorchjobs", "delete")} <= cluster.calls
    assert cluster.calls <= granted, cluster.calls - granted


def test_multinode_needs_shared_storage_and_two_nodes(tmp_path):
    with pytest.raises(ValueError, match="local path the job's pods cannot share; set the pipeline's storage_root"):
        run_pytorchjob("{}", str(tmp_path), nodes=2, apis=(None, None), **SETTINGS)
    with pytest.raises(ValueError, match="nodes >= 2"):
        run_pytorchjob("{}", "s3://b/x", nodes=1, apis=(None, None), **SETTINGS)


def test_learner_stage_trains_through_the_job_and_tracks_its_result(s3, shapes_data, tmp_path, monkeypatch):  # noqa: F811
    """The stage hands its validated config to the job; the fake operator trains it from the ConfigMap (as the
    job's `flexi-jest train-learner --config` would), and the stage logs the job's result to MLflow."""
    import mlflow

    from flexi_jest.stages import train_learner_stage
    from flexi_jest.train import train_learner

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    # MLflow remembers the active experiment per process (and in MLFLOW_EXPERIMENT_ID): forget this store's after
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")

    def operator(cluster, job):
        config = cluster.config_maps[config_map_name(job["metadata"]["name"])]["data"]["config.json"]
        train_learner(TrainLearnerConfig.model_validate_json(config))
        set_state(job, "Succeeded")

    cluster = FakeCluster(on_create=operator, states=())
    out_dir = f"{s3}/learner"
    values = {"pool": shapes_data.splits["pool"].path, "method": "uniform", "out_dir": out_dir, "steps": 2,
              "model": TEST_MODEL.model_dump(), "progress": False, "device": "cpu"}
    result, run_id = train_learner_stage(values, "tiny", multinode={**SETTINGS, "nodes": 2, "apis": (cluster, cluster),
                                                                    "sleep": lambda s: None})
    assert result.steps == 2 and result.out_dir == out_dir and storage.exists(result.checkpoint)
    run = mlflow.get_run(run_id)
    assert run.data.metrics["steps"] == 2 and run.data.params["method"] == "uniform"


def test_compiled_multinode_pipeline_launches_the_main_learner_without_a_gpu(tmp_path):
    import yaml

    from pipelines.flexi_jest_pp import compile_pipeline
    out = tmp_path / "pp.yaml"
    compile_pipeline(str(out), learner_nodes=4, gpus_per_node=8)
    pipeline, platform = yaml.safe_load_all(out.read_text())
    tasks = pipeline["root"]["dag"]["tasks"]["exit-handler-1"]["componentRef"]["name"]
    dag = pipeline["components"][tasks]["dag"]["tasks"]
    inputs = dag["train-learner"]["inputs"]["parameters"]
    assert inputs["nodes"]["runtimeValue"]["constant"] == 4
    settings = json.loads(inputs["multinode_json"]["runtimeValue"]["constant"])
    assert settings["gpus_per_node"] == 8 and settings["secret_name"] and settings["node_selector"]
    assert settings["namespace"] == "flexi-jest"  # where k8s/base puts the S3 Secret and the runner's Role
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert "nodeSelector" not in executors["exec-train-learner"]  # the launcher holds no GPU
    assert "secretAsEnv" in executors["exec-train-learner"]
    resources = pipeline["deploymentSpec"]["executors"]["exec-train-learner"]["container"].get("resources", {})
    assert "accelerator" not in resources
    assert "nodeSelector" in executors["exec-train-learner-2"]  # the baselines stay single-node GPU tasks
