"""Fault: a dataset spec, a KFP parameter or an MLflow tag that runs a command (issue 20, finding 1).

The probe ran `make-data source=register --set "pool=pipe:sh -c 'env > f; cat shard.tar'"` and the shell ran
with every secret of the environment; on a `--from-run` rerun the pool comes back from an MLflow tag, so anyone
with write access to MLflow could plant a command for the next rerun. Expected: pipe: and http(s) specs are
refused unless the stage's data_access enables them (data/access.py, docs/security.md), with one line naming
the spec and the setting; the config is refused before anything runs; a rerun checks every tag it resolves
before any stage reads it. Each planted command would create a file: the tests assert that it does not exist.
"""

import json

import pytest
from faults import record, write_raw_split

from flexi_jest import tracking
from flexi_jest.config import ConfigError, validated_stage_config
from flexi_jest.data.access import SpecError

SHELL = "data_access.pipe_commands"
HTTP = "data_access.allow_http"


def planted(marker) -> str:
    """The probe's spec: a shell that writes the environment to a file, then prints a tar."""
    return f"pipe:sh -c 'env > {marker}; cat /dev/null'"


@pytest.mark.parametrize("stage,field,spec,flag", [
    ("make-data", "pool", "SHELL", SHELL),
    ("train-reference", "data", "pipe:cat curated.tar", SHELL),
    ("train-reference", "eval_data.0", "heldout=pipe:curl -s https://example.com/eval.tar", SHELL),
    ("cache-reference", "pool", "https://example.com/pool/{000..009}.tar", HTTP),
    ("train-learner", "pool", "SHELL", SHELL),
    ("evaluate", "eval_data.1", "imagenet=https://example.com/imagenet/{0..9}.tar", HTTP),
])
def test_a_stage_config_refuses_pipe_and_http_specs_naming_the_field_and_the_setting(stage, field, spec, flag,
                                                                                      tmp_path):
    marker = tmp_path / "ran"
    spec = planted(marker) if spec == "SHELL" else spec
    values = {
        "make-data": {"source": "register", "curated": "c", "pool": spec, "eval": "e"},
        "train-reference": {"data": spec} if field == "data" else {"eval_data": [spec], "eval_every": 10},
        "cache-reference": {"pool": spec},
        "train-learner": {"pool": spec, "method": "uniform"},
        "evaluate": {"eval_data": ["runs/data/eval", spec]},
    }[stage]
    with pytest.raises(ConfigError) as error:
        validated_stage_config(stage, "tiny", values)
    message = str(error.value)
    assert f"  {field}: " in message and flag in message and spec.split("=", 1)[-1] in message
    enabled = {"pipe_commands": ["sh", "cat", "curl"]} if flag == SHELL else {"allow_http": True}
    validated_stage_config(stage, "tiny", {**values, "data_access": enabled})  # enabled: the config is valid
    assert not marker.exists()


def test_the_cli_refuses_a_planted_pipe_pool_before_running_anything(tmp_path, capsys):
    from flexi_jest.cli import main
    split = str(tmp_path / "data")
    write_raw_split(split, [record(f"k{i}") for i in range(4)], per_shard=4, manifest=False)
    shard = tmp_path / "data" / "shard-000000.tar"
    marker, out_dir = tmp_path / "environment", tmp_path / "registration"
    pool = f"pipe:sh -c 'env > {marker}; cat {shard}'"
    status = main(["make-data", "--set", "source=register", "--set", f"curated={shard}", "--set", f"pool={pool}",
                   "--set", f"eval={shard}", "--set", f"out_dir={out_dir}", "--set", "check_images=1"])
    error = capsys.readouterr().err
    assert status == 2 and "pool: dataset spec" in error and SHELL in error and "runs its arguments" in error
    assert not marker.exists() and not out_dir.exists()  # nothing ran, nothing was written


@pytest.fixture(scope="module")
def module_store(tmp_path_factory):
    """One SQLite MLflow store for this module's rerun tests (each uses its own KFP run ids): creating a store
    runs MLflow's migrations, seconds each."""
    import mlflow
    path = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path / 'mlflow.db'}")
        patch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
        patch.chdir(path)
        yield path


@pytest.fixture
def mlflow_store(module_store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{module_store / 'mlflow.db'}")
    monkeypatch.chdir(module_store)
    return module_store


ROOT = "s3://team/runs"
GOOD = {"pool": f"{ROOT}/run-1/make-data/data/pool", "eval_split": f"{ROOT}/run-1/make-data/data/eval",
        "curated": f"{ROOT}/run-1/make-data/data/curated", "cache": f"{ROOT}/run-1/cache/refcache",
        "reference": f"{ROOT}/run-1/train-reference/reference/model.pt", "reference_sha256": "ab" * 32,
        "learner.joint": f"{ROOT}/run-1/train-learner/learner-joint/model.pt", "reference_version": "3"}


def earlier_run(outputs: dict[str, str], storage_root: str = ROOT, kfp_run_id: str = "kfp-earlier") -> str:
    """A pipeline's parent run as open_tracking makes it (its storage_root a param), with outputs as tags."""
    import mlflow
    run = tracking.start_pipeline_run("earlier", {"method": "joint", "storage_root": storage_root},
                                      kfp_run_id=kfp_run_id)
    for name, value in outputs.items():
        mlflow.MlflowClient().set_tag(run, f"{tracking.OUTPUT_TAG}{name}", value)
    return run


def test_a_planted_pipe_tag_is_refused_on_a_rerun_without_running(mlflow_store, tmp_path):
    import mlflow

    from flexi_jest.pipeline_support import resolve_earlier_run
    marker = tmp_path / "environment"
    earlier_run({**GOOD, "pool": planted(marker)})
    rerun = tracking.start_pipeline_run("rerun", {}, kfp_run_id="kfp-rerun")
    for stage in ("train_learner", "cache_reference"):
        with pytest.raises(SpecError) as error:
            resolve_earlier_run("kfp-earlier", parent_run_id="kfp-rerun", stage=stage)
        message = str(error.value)
        assert f"MLflow tag {tracking.OUTPUT_TAG}pool of pipeline run" in message and SHELL in message
        assert "\n" not in message
    with pytest.raises(SpecError, match="runs its arguments as a command"):  # another program allowed: still no shell
        resolve_earlier_run("kfp-earlier", stage="train_learner", data_access={"pipe_commands": ["cat", "curl"]})
    assert not marker.exists()
    tags = mlflow.MlflowClient().get_run(rerun).data.tags
    assert "flexi_jest.from_run" not in tags and f"{tracking.OUTPUT_TAG}pool" not in tags  # nothing copied over


def test_a_planted_http_pool_needs_allow_http_on_the_rerun(mlflow_store):
    from flexi_jest.pipeline_support import resolve_earlier_run
    earlier_run({**GOOD, "pool": "https://attacker.example/{0..9}.tar"}, kfp_run_id="kfp-http")
    with pytest.raises(SpecError, match=HTTP):
        resolve_earlier_run("kfp-http", stage="train_learner")
    assert resolve_earlier_run("kfp-http", stage="train_learner", data_access={"allow_http": True})["pool"]


PLANTS = [  # (tag name, planted value, why it is refused)
    ("reference", "https://attacker.example/model.pt", "is not a storage URI"),
    ("reference", "pipe:cat model.pt", "is not a storage URI"),
    ("reference", "s3://another-bucket/model.pt", "is outside the run's storage root"),
    ("cache", "/etc/refcache", "is outside the run's storage root"),
    ("cache", f"{ROOT}/run-1/../../elsewhere/refcache", "has a '..' component"),
    ("learner.joint", "ftp://host/model.pt", "has the scheme 'ftp'"),
    ("reference_sha256", "not-a-digest", "is not a sha256"),
    ("reference_version", "1 or 1=1", "is not a registry version number"),
]


def test_rerun_tags_must_be_what_the_stages_could_have_written(mlflow_store):
    from flexi_jest.pipeline_support import RecordedOutputError, resolve_earlier_run
    for index, (name, value, reason) in enumerate(PLANTS):
        earlier_run({**GOOD, name: value}, kfp_run_id=f"kfp-plant-{index}")
        with pytest.raises(RecordedOutputError, match=rf"MLflow tag {tracking.OUTPUT_TAG}{name} .*{reason}"):
            resolve_earlier_run(f"kfp-plant-{index}", stage="train_learner")


def test_good_tags_resolve_and_a_registered_pool_must_match_its_make_data_run(mlflow_store):
    """Registered data lives anywhere (the team's bucket), so a registered spec is checked against the params of
    the run's make-data stage (MLflow never lets a param change), not against the storage root."""
    import mlflow

    from flexi_jest.config import MakeDataConfig
    from flexi_jest.pipeline_support import RecordedOutputError, resolve_earlier_run
    good = earlier_run(GOOD, kfp_run_id="kfp-good")
    assert resolve_earlier_run(good, stage="train_learner")["learner"] == GOOD["learner.joint"]
    registered = {"curated": "s3://team-data/curated/{0..3}.tar", "pool": "s3://team-data/laion/",
                  "eval": "s3://team-data/eval/0.tar"}
    config = MakeDataConfig(source="register", out_dir="s3://runs/kfp-registered/data", **registered)
    with tracking.stage_run(None, "make-data", config) as stage:
        make_data = stage.info.run_id
    # a training split as the stage recorded it: the shard list it wrote under its out_dir; eval: its spec
    listed = {"curated": "s3://runs/kfp-registered/data/curated.shardlist.json",
              "pool": "s3://runs/kfp-registered/data/pool.shardlist.json"}
    outputs = {**GOOD, **listed, "eval_split": registered["eval"]}
    run = earlier_run(outputs, kfp_run_id="kfp-registered")
    mlflow.MlflowClient().set_tag(run, f"{tracking.STAGE_TAG}make-data", make_data)
    assert resolve_earlier_run("kfp-registered", stage="train_learner")["pool"] == listed["pool"]
    mlflow.MlflowClient().set_tag(run, f"{tracking.OUTPUT_TAG}pool", "s3://team-data/laion/")  # as runs before lists
    assert resolve_earlier_run("kfp-registered", stage="train_learner")["pool"] == "s3://team-data/laion/"
    for planted in ("s3://team-data/other-pool/", "s3://runs/kfp-registered/data/eval.shardlist.json",
                    "s3://elsewhere/data/pool.shardlist.json"):
        mlflow.MlflowClient().set_tag(run, f"{tracking.OUTPUT_TAG}pool", planted)
        with pytest.raises(RecordedOutputError, match=rf"is not what its make-data stage run {make_data} read or "
                                                      r"wrote \('s3://runs/kfp-registered/data/pool.shardlist.json' "
                                                      r"or 's3://team-data/laion/'\)"):
            resolve_earlier_run("kfp-registered", stage="train_learner")


@pytest.mark.parametrize("stage", ["make_data",  # the whole pipeline; two reruns slow (reason: each compiles a
                                   # cluster pipeline, 4 s on 2 cores; the reruns share the DAG's code)
                                   *(pytest.param(s, marks=pytest.mark.slow) for s in ("train_reference", "evaluate"))])
def test_the_pipelines_pass_data_access_to_every_stage_that_reads_data_off_by_default(stage):
    """data_access is a pipeline parameter, "{}" (storage only) by default, handed to every data-reading task."""
    from google.protobuf.json_format import MessageToDict

    from pipelines.flexi_jest_pp import cluster_pipeline
    readers = {"make-data", "train-reference", "cache-reference", "train-learner", "evaluate", "resolve-run"}
    spec = MessageToDict(cluster_pipeline(stage).pipeline_spec)  # the IR `compile` writes (cluster pipeline)
    assert spec["root"]["inputDefinitions"]["parameters"]["data_access"]["defaultValue"] == "{}"
    seen = set()

    def walk(dag: dict) -> None:
        for task_name, task in dag.get("tasks", {}).items():
            component = spec["components"][task["componentRef"]["name"]]
            if "dag" in component:
                walk(component["dag"])
            base = task_name.rsplit("-", 1)[0] if task_name.rsplit("-", 1)[-1].isdigit() else task_name
            if base in readers:
                seen.add(base)
                parameter = task["inputs"]["parameters"]["data_access"]
                assert parameter.get("componentInputParameter", "").startswith("pipelinechannel--data_access") \
                    or parameter.get("componentInputParameter") == "data_access", (task_name, parameter)

    walk(spec["root"]["dag"])
    assert seen, stage
    from flexi_jest.pipeline_support import with_data_access
    assert with_data_access({"steps": 3}, "{}") == {"steps": 3}
    assert with_data_access({}, json.dumps({"allow_http": True})) == {"data_access": {"allow_http": True}}
