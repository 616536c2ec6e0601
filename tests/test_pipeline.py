"""The KFP pipeline: compiled IR, each component alone and the whole DAG under KFP local execution."""

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import BOTH_S3

SMALL = {
    "data_config": json.dumps({"curated_size": 200, "pool_size": 600, "eval_size": 100, "samples_per_shard": 200}),
    "reference_config": json.dumps({"steps": 4, "batch_size": 32, "progress": False}),
    "learner_config": json.dumps({"super_batch_size": 80, "progress": False, "scoring_patch_size": 16,
                                  "train_patch_sizes": [8, 16]}),
    "baseline_config": json.dumps({"super_batch_size": 80, "progress": False}),
    "steps": 3,
}


def test_compile_produces_ir_that_kfp_loads_back(tmp_path):
    from kfp import components

    from pipelines.cli import main
    out = tmp_path / "pp.yaml"
    assert main(["compile", "--out", str(out)]) == 0
    loaded = components.load_component_from_file(str(out))
    assert loaded.name == "flexi-jest-pp"
    documents = list(yaml.safe_load_all(out.read_text()))
    spec, platform = documents[0], documents[1]
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    for name in ("dataset", "profile", "method", "filter_ratio", "n_chunks", "steps", "baseline_methods",
                 "baseline_budget", "eval_sets", "champion_metric", "accelerator_type", "accelerator_count"):
        assert name in inputs
    executors = spec["deploymentSpec"]["executors"]
    trainer = executors["exec-train-learner"]["container"]
    assert "accelerator" in trainer["resources"]
    kubernetes = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train-learner"]
    assert kubernetes["nodeSelector"]["labels"] == {"flexi-jest/node-pool": "gpu"}
    assert kubernetes["tolerations"][0]["key"] == "nvidia.com/gpu"
    evaluation = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-evaluate"]
    assert "nodeSelector" not in evaluation and "tolerations" not in evaluation  # only the S3 secret (test_k8s.py)
    # the image, part of every cached stage's key, is tagged with the package version unless FLEXI_JEST_IMAGE says
    from importlib.metadata import version

    from flexi_jest import __version__
    assert __version__ == version("flexi-jest"), "pyproject.toml and flexi_jest.__version__ name one version"
    if "FLEXI_JEST_IMAGE" not in os.environ:
        assert trainer["image"].endswith(f"/flexi-jest:{__version__}")


def test_the_knobs_of_a_rerun_are_typed_pipeline_parameters(tmp_path):
    """The knobs a rerun changes are typed parameters (what the KFP UI shows and edits), their defaults the
    learner's Pydantic config's; a typed knob overrides the stage's JSON config, 0 / "" keep its value."""
    from flexi_jest.config import ConfigError, TrainLearnerConfig
    from flexi_jest.pipeline_support import with_knobs
    from pipelines.cli import main

    expected = {"learning_rate": "NUMBER_DOUBLE", "steps": "NUMBER_INTEGER", "batch_size": "NUMBER_INTEGER",
                "super_batch_size": "NUMBER_INTEGER", "filter_ratio": "NUMBER_DOUBLE", "n_chunks": "NUMBER_INTEGER",
                "method": "STRING", "score": "STRING", "model_name": "STRING", "init_checkpoint": "STRING"}
    for stage, knobs in (("make_data", expected),
                         ("train_learner", {k: v for k,
                                            v in expected.items() if k not in ("batch_size", "init_checkpoint")})):
        out = tmp_path / f"{stage}.yaml"
        main(["compile", "--from-stage", stage, "--out", str(out)])
        inputs = next(yaml.safe_load_all(out.read_text()))["root"]["inputDefinitions"]["parameters"]
        assert {name: inputs[name]["parameterType"] for name in knobs} == knobs
        for name in ("method", "score", "filter_ratio", "n_chunks"):
            assert inputs[name]["defaultValue"] == TrainLearnerConfig.model_fields[name].default
        assert "learner_config" in inputs  # the JSON config stays for everything else
    values = with_knobs({"optim": {"lr": 1.0, "warmup_steps": 3}, "steps": 7}, learning_rate=0.01, steps=0,
                        super_batch_size=64, model_name="small")
    assert values["optim"] == {"lr": 0.01, "warmup_steps": 3} and values["steps"] == 7
    assert values["super_batch_size"] == 64 and values["model"]["image_size"] == 64
    with pytest.raises(ConfigError, match="model_name 'huge' is no model preset"):
        with_knobs({}, model_name="huge")


def test_the_image_is_one_setting(monkeypatch, tmp_path):
    import importlib

    import components.image
    monkeypatch.setenv("FLEXI_JEST_IMAGE", "registry.example.com/team/flexi-jest:9.9")
    importlib.reload(components.image)
    assert components.image.IMAGE == components.image.GPU_IMAGE == "registry.example.com/team/flexi-jest:9.9"
    monkeypatch.delenv("FLEXI_JEST_IMAGE")
    importlib.reload(components.image)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback whose artifact store is S3 (moto's S3 server, as MinIO on a cluster)."""
    import subprocess
    import sys

    from moto.server import ThreadedMotoServer

    from conftest import free_port
    from postgres_mlflow import wait_for_health

    workdir = tmp_path_factory.mktemp("mlflow-server")
    s3_port, port = free_port(), free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    s3.start()
    env = dict(os.environ, MLFLOW_S3_ENDPOINT_URL=f"http://127.0.0.1:{s3_port}", AWS_ACCESS_KEY_ID="testing",
               AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", MLFLOW_DISABLE_TELEMETRY="true")
    import boto3
    boto3.client("s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"], region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket="mlflow")
    log = open(workdir / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--artifacts-destination", "s3://mlflow/artifacts",
         "--workers", "1"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    url = f"http://127.0.0.1:{port}"
    wait_for_health(url, server, workdir / "server.log")  # a loaded CI machine starts it slowly
    yield url, env
    server.terminate()
    server.wait(timeout=30)
    s3.stop()


def open_clip_reference_checkpoint(path: Path) -> Path:
    """The pipeline's reference starts from an open_clip checkpoint: a model open_clip builds itself (the tiny
    preset's architecture, registered with open_clip as flexi-jest-tiny), its state_dict saved as
    open_clip.create_model(name, pretrained=path) reads it."""
    import open_clip
    import torch

    import flexi_jest.models  # noqa: F401  (registers the presets with open_clip)
    torch.manual_seed(11)
    torch.save(open_clip.create_model("flexi-jest-tiny").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, mlflow_server):
    """The whole pipeline once, tracked on the real MLflow server (artifacts and models go to its S3 store)."""

    from pipelines.runner import run_local
    url, _ = mlflow_server
    workdir = tmp_path_factory.mktemp("pipeline")
    init = open_clip_reference_checkpoint(workdir / "open_clip_init.pt")
    reference_config = json.dumps({**json.loads(SMALL["reference_config"]), "model": "flexi-jest-tiny",
                                   "init_checkpoint": str(init)})
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = url
    try:
        params = dict(SMALL, run_name="pp-under-test", reference_config=reference_config)
        summary = run_local(str(workdir), params)
        summary["params"] = params  # what a rerun changes one knob of
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
    return workdir, summary


@pytest.mark.slow  # reason: on the whole pipeline run (pipeline_run: 226 s on 2 cores), see README "Tests"
def test_whole_pipeline_runs_locally_and_promotes(pipeline_run):
    import mlflow

    workdir, summary = pipeline_run
    assert sorted(row["method"] for row in summary["rows"]) == ["joint", "offline-filter", "reference", "uniform"]
    assert all(row["i2t_r1"] is not None and row["total_flops"] > 0 for row in summary["rows"])
    assert summary["decision"] == "champion" and summary["learner_version"] == "1"
    mlflow.set_tracking_uri(summary["tracking_uri"])
    client = mlflow.MlflowClient()
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["method"] == "joint"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    stages = [r.data.tags["flexi_jest.stage"] for r in children]
    assert sorted(stages) == sorted(["make-data", "train-reference", "cache-reference", "promote"]
                                    + ["train-learner"] * 3 + ["evaluate"] * 4)  # 3 learners; they and the reference
    assert str(client.get_model_version_by_alias("flexi-jest-learner", "champion").version) == "1"
    # the reference is registered once, from this pipeline's train-reference run, with that run's lineage
    reference_run, = [r for r in children if r.data.tags["flexi_jest.stage"] == "train-reference"]
    versions = client.search_model_versions("name = 'flexi-jest-reference'")
    assert [(v.version, v.run_id) for v in versions] == [("1", reference_run.info.run_id)]
    version_tags = client.get_model_version("flexi-jest-reference", "1").tags
    for key in ("lineage.model_sha256", "lineage.curated_uri"):
        assert version_tags[key] == reference_run.data.tags[key], key
    assert parent.data.tags["flexi_jest.output.reference_version"] == "1"
    assert list((workdir / "kfp").rglob("report")), "the eval report (HTML artifact) is written"


@pytest.mark.slow  # reason: on the whole pipeline run (pipeline_run: 226 s on 2 cores), see README "Tests"
def test_pipeline_compares_its_methods_on_accuracy_against_flops(pipeline_run):
    """compare: each learner's curve (evaluations during training + its zero-shot evaluation), FLOPs
    and steps to uniform's final metric and the ratios, the reference's own metric, the benchmark's plot on the
    MLflow parent run and an HTML report. The baselines train on the JEST learner's learner-FLOP budget."""
    import mlflow

    workdir, summary = pipeline_run
    comparison = summary["comparison"]
    assert comparison["metric"] == "shapes.top1" and comparison["baseline"] == "uniform"
    methods = comparison["methods"]
    assert sorted(methods) == ["joint", "offline-filter", "uniform"]
    rows = {row["method"]: row for row in summary["rows"]}
    assert len(methods["joint"]["mean_curve"]) == 3, "steps 3: an evaluation at every step, the last the eval stage's"
    for name, info in methods.items():
        curve = info["mean_curve"]
        assert [x for x, _ in curve] == sorted(x for x, _ in curve) and curve[-1][0] == rows[name]["total_flops"]
        assert curve[-1][1] == pytest.approx(rows[name]["top1"])
        # baseline_budget "learner-flops" (the default, the paper's count): each baseline spends the JEST learner's
        # own FLOPs, the reference's share left out, to within one of its steps
        assert rows[name]["learner_flops"] == pytest.approx(
            rows[name]["total_flops"] - info["reference_share_flops"])
        assert rows[name]["learner_flops"] == pytest.approx(rows["joint"]["learner_flops"], rel=0.2), name
    assert methods["uniform"]["steps_to_target"] is not None and methods["uniform"]["steps_ratio_vs_uniform"] == 1.0
    assert methods["uniform"]["steps"] > methods["joint"]["steps"] == 3, "uniform pays no scoring: more steps"
    assert methods["offline-filter"]["reference_share_flops"] > methods["joint"]["reference_share_flops"] > 0
    assert comparison["reference"]["final_metric"] == pytest.approx(rows["reference"]["top1"])
    assert comparison["target"] == pytest.approx(rows["uniform"]["top1"])
    assert methods["uniform"]["flops_ratio_vs_uniform"] == pytest.approx(1.0)
    joint = methods["joint"]
    assert joint["reference_share_flops"] > 0 and methods["uniform"]["reference_share_flops"] == 0
    if joint["flops_to_target"] is None:
        assert joint["flops_ratio_vs_uniform"] is None
    else:
        assert joint["flops_ratio_vs_uniform"] == pytest.approx(
            comparison["uniform_flops_to_target"] / joint["flops_to_target"])
    assert Path(summary["plot"]).stat().st_size > 0
    mlflow.set_tracking_uri(summary["tracking_uri"])
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(summary["parent_run_id"])}
    assert {"accuracy_vs_flops.png", "method_comparison.json"} <= artifacts
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.metrics["compare.uniform.flops_ratio_vs_uniform"] == pytest.approx(1.0)
    html = next(p for p in (workdir / "kfp").rglob("report") if p.parent.name == "compare").read_text()
    assert "<td>joint</td>" in html and "<td>uniform</td>" in html and "<td>offline-filter</td>" in html
    assert "the reference's own shapes.top1" in html and "base64," in html
    assert "compare.reference.final_metric" in parent.data.metrics


@pytest.mark.slow  # reason: on the whole pipeline run (pipeline_run: 226 s on 2 cores), see README "Tests"
def test_components_run_alone(pipeline_run, tmp_path, monkeypatch):
    """make_data alone; train_reference and cache_reference alone on imported artifacts."""
    from kfp import dsl, local
    from kfp.dsl import Dataset, Model

    from components.stages import cache_reference, make_data, train_reference

    workdir, _ = pipeline_run
    data_dir = next((workdir / "kfp").rglob("make-data/data"))
    reference_file = next((workdir / "kfp").rglob("train-reference/reference/model.pt"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    common = dict(profile="tiny", experiment="alone")

    data = make_data(config_json=json.dumps({"curated_size": 20, "pool_size": 30, "eval_size": 10}),
                     dataset="digits", storage_root="", **common)
    assert data.outputs["pool"].metadata["num_samples"] == 30
    assert data.outputs["eval_split"].metadata["dataset"] == "digits"

    @dsl.pipeline(name="reference-alone")
    def reference_alone():
        curated = dsl.importer(artifact_uri=str(data_dir / "curated"), artifact_class=Dataset,
                               metadata={"uri": str(data_dir / "curated")})
        train_reference(config_json=SMALL["reference_config"], storage_root="", curated=curated.output, **common)

    @dsl.pipeline(name="cache-alone")
    def cache_alone():
        pool = dsl.importer(artifact_uri=str(data_dir / "pool"), artifact_class=Dataset,
                            metadata={"uri": str(data_dir / "pool")})
        reference = dsl.importer(artifact_uri=str(reference_file), artifact_class=Model,
                                 metadata={"uri": str(reference_file)})
        cache_reference(config_json=json.dumps({"out_dir": str(tmp_path / "cache")}), reference=reference.output,
                        pool=pool.output, **common)

    reference_alone()
    assert next((tmp_path / "kfp").rglob("reference/model.pt")).stat().st_size > 0
    cache_alone()
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["num_samples"] == 600 and manifest["reference"] == str(reference_file)


def write_imagefolder(split_dir: Path, root: Path, count: int) -> Path:
    """The first `count` samples of a generated split as class folders of PNGs (torchvision's ImageFolder)."""
    from PIL import Image

    from readers import read_split

    for position, sample in enumerate(read_split(str(split_dir))):
        if position == count:
            break
        folder = root / sample["meta"]["label"]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sample["image"].permute(1, 2, 0).numpy()).save(folder / f"{sample['key']}.png")
    return root


def with_tracking_uri(uri: str):
    """MLFLOW_TRACKING_URI set for a block (run_local reads it), then as it was."""
    import contextlib

    @contextlib.contextmanager
    def scope():
        previous = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = uri
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = previous
    return scope()


def test_cached_stages_take_content_only(tmp_path):
    """In the compiled IR, no task KFP may cache takes the run's name, the KFP run ID or anything from the
    tracking tasks: those go to the tracking-only tasks, which are never cached."""
    from kfp import compiler

    from pipelines.flexi_jest_pp import cluster_pipeline

    tracking_tasks = {"open-tracking", "close-tracking", "track-stages", "promote", "compare", "resolve-run"}
    for stage in ("make_data", "train_learner"):
        out = tmp_path / f"{stage}.yaml"
        compiler.Compiler().compile(cluster_pipeline(stage), package_path=str(out))
        spec = next(yaml.safe_load_all(out.read_text()))
        seen = {"cached": set(), "uncached": set()}

        def walk(dag, channels_from_tracking):
            for name, task in dag["tasks"].items():
                component = spec["components"][task["componentRef"]["name"]]
                inputs = task.get("inputs", {}).get("parameters", {})
                sources = {key: value.get("componentInputParameter") or value.get("taskOutputParameter", {}).get(
                    "producerTask") or str(value.get("runtimeValue", {}).get("constant")) for key,
                    value in inputs.items()}
                if "dag" in component:
                    inner = {key for key, source in sources.items()
                             if source in channels_from_tracking or source == "open-tracking"}
                    walk(component["dag"], inner)
                    continue
                cached = task.get("cachingOptions", {}).get("enableCache", False)
                base = name.rstrip("-0123456789")
                seen["cached" if cached else "uncached"].add(base)
                if not cached:
                    assert base in tracking_tasks, f"{name} is not cached but is no tracking task"
                    continue
                assert base not in tracking_tasks, f"tracking task {name} is cached"
                for key, source in sources.items():
                    assert key not in ("run_name", "pipeline_run", "kfp_run_id", "parent_run_id"), (name, key)
                    assert source not in ("run_name", "pipelinechannel--run_name", "open-tracking", "resolve-run"), \
                        (name, key, source)
                    assert source not in channels_from_tracking, (name, key, source)
                    assert "pipeline_job" not in source, (name, key, source)

        walk(spec["root"]["dag"], set())
        assert {"train-learner", "evaluate"} <= seen["cached"]
        assert {"open-tracking", "close-tracking", "track-stages", "promote"} <= seen["uncached"]


@pytest.mark.slow  # a second pipeline run (about as long as the first, less the cached stages)
def test_rerun_with_one_learner_knob_changed_takes_upstream_stages_from_the_cache(pipeline_run, capsys):
    """run-local caches by default: the same pipeline with only filter_ratio changed reuses make_data,
    train_reference and cache_reference (their outputs untouched, their MLflow runs reused), and
    retrains the learners; both wall times are printed (the README's figure)."""
    import mlflow

    from pipelines.runner import run_local

    workdir, first = pipeline_run
    reference_file = next((workdir / "kfp").rglob("train-reference/reference/model.pt"))
    data_manifest = next((workdir / "kfp").rglob("make-data/data/pool/manifest.json"))
    before = reference_file.stat().st_mtime_ns, data_manifest.stat().st_mtime_ns
    with with_tracking_uri(first["tracking_uri"]):
        second = run_local(str(workdir), dict(first["params"], filter_ratio=0.5))
    with capsys.disabled():
        print(f"\npipeline wall time: first run {first['seconds']:.1f} s, rerun with filter_ratio changed "
              f"{second['seconds']:.1f} s (cached: {second['cached_stages']})")
    assert {"make-data", "train-reference", "cache-reference"} <= set(second["cached_stages"])
    assert not any(stage.startswith("train-learner") for stage in second["cached_stages"])
    assert (reference_file.stat().st_mtime_ns, data_manifest.stat().st_mtime_ns) == before
    assert second["parent_run_id"] != first["parent_run_id"], "same run name, yet a parent run of its own"
    mlflow.set_tracking_uri(first["tracking_uri"])
    client = mlflow.MlflowClient()
    parent = client.get_run(second["parent_run_id"])
    assert parent.data.params["filter_ratio"] == "0.5"
    first_parent = client.get_run(first["parent_run_id"]).data.tags
    for name in ("pool", "cache", "eval_split", "reference", "reference_sha256"):
        assert parent.data.tags[f"flexi_jest.output.{name}"] == first_parent[f"flexi_jest.output.{name}"]
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    reused = {r.data.tags["flexi_jest.stage"]: r.data.tags.get("flexi_jest.reused_run_id") for r in children
              if r.data.tags.get("flexi_jest.cached") == "true"}
    assert reused["train-reference"] == first_parent["flexi_jest.stage_run.train-reference"]
    trained = [r for r in children if r.data.tags["flexi_jest.stage"] == "train-learner"]
    assert sorted(r.data.params["filter_ratio"] for r in trained) == ["0.5"] * 3  # joint, uniform, offline-filter
    reference_versions = client.search_model_versions("name = 'flexi-jest-reference'")
    assert len(reference_versions) == 1, "the reference KFP took from its cache is registered once"
    assert first["kfp_run_id"] and second["kfp_run_id"] and first["kfp_run_id"] != second["kfp_run_id"]


@pytest.mark.slow  # reason: on the whole pipeline run (pipeline_run: 226 s on 2 cores), see README "Tests"
def test_rerun_of_the_learner_takes_one_argument_the_earlier_run(pipeline_run, tmp_path):
    """--from-run: the learner, its evaluation and promotion on an earlier run's pool, reference cache, eval
    split and registered reference, resolved from that run's MLflow parent run (given by its KFP run ID); it also
    evaluates on a named ImageFolder (eval_sets) whose top-1 is the champion metric: the evaluation reports it
    under its name and promotion compares it."""
    import mlflow

    from flexi_jest.pipeline_support import resolve_earlier_run
    from pipelines.runner import run_local

    workdir, first = pipeline_run
    data_dir = next((workdir / "kfp").rglob("make-data/data"))
    folder = write_imagefolder(data_dir / "eval", tmp_path / "folder", 60)
    with with_tracking_uri(first["tracking_uri"]):
        summary = run_local(str(workdir), {
            "from_run": first["kfp_run_id"], "steps": 2,
            "learner_config": json.dumps({"super_batch_size": 80, "progress": False}),
            "eval_sets": [f"held-out-folder={folder}"], "champion_metric": "held-out-folder.top1",
            "run_name": "from-run-under-test"}, from_stage="train_learner")
        with pytest.raises(LookupError, match="no MLflow pipeline run with KFP run ID or MLflow run id 'nope'"):
            resolve_earlier_run("nope")
    assert [row["method"] for row in summary["rows"]] == ["joint"]
    assert summary["decision"] in ("champion", "challenger") and summary["rows"][0]["total_flops"] > 0
    assert list(summary["comparison"]["methods"]) == ["joint"] and summary["comparison"]["target"] is None
    assert summary["comparison"]["metric"] == "shapes.top1"  # the methods are compared on the pipeline's eval split
    mlflow.set_tracking_uri(first["tracking_uri"])
    client = mlflow.MlflowClient()
    tags = client.get_run(summary["parent_run_id"]).data.tags
    earlier = client.get_run(first["parent_run_id"]).data.tags
    assert tags["flexi_jest.from_run"] == first["parent_run_id"]
    for name in ("pool", "cache", "eval_split", "reference", "reference_sha256", "reference_version"):
        assert tags[f"flexi_jest.output.{name}"] == earlier[f"flexi_jest.output.{name}"], name
    learner = client.get_run(tags["flexi_jest.stage_run.train-learner.joint"])
    assert learner.data.params["pool"] == earlier["flexi_jest.output.pool"] and learner.data.params["steps"] == "2"
    assert len(
        client.search_model_versions("name = 'flexi-jest-reference'")) == 1, "the reference is not registered again"

    runs = {r.data.tags["flexi_jest.stage"]: r for r in client.search_runs(
        [client.get_experiment_by_name("flexi-jest").experiment_id],
        f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")}
    evaluation = json.loads(Path(client.download_artifacts(runs["evaluate"].info.run_id, "result.json", str(tmp_path)))
                            .read_text())
    held_out = evaluation["splits"]["held-out-folder"]
    assert held_out["layout"] == "imagefolder" and held_out["num_samples"] == 60 and held_out["top1"] is not None
    assert held_out["retrieval_skipped"] == "an ImageFolder has no captions"
    assert evaluation["champion_metric"] == "held-out-folder.top1"
    decision = json.loads(Path(client.download_artifacts(runs["promote"].info.run_id, "decision.json", str(tmp_path)))
                          .read_text())
    assert decision["metric"] == "held-out-folder.top1" and decision["value"] == pytest.approx(held_out["top1"])


@pytest.mark.slow  # reason: on the whole pipeline run (pipeline_run: 226 s on 2 cores), see README "Tests"
def test_rerun_of_the_evaluation_resolves_the_earlier_runs_learner(pipeline_run, tmp_path):
    """--from-stage evaluate: the earlier run's main learner, evaluated again (here on one more eval set) and put
    through promotion, with nothing trained; the one argument is the earlier run's MLflow parent run id."""
    import mlflow

    from pipelines.runner import run_local

    workdir, first = pipeline_run
    data_dir = next((workdir / "kfp").rglob("make-data/data"))
    folder = write_imagefolder(data_dir / "eval", tmp_path / "folder", 40)
    with with_tracking_uri(first["tracking_uri"]):
        summary = run_local(str(workdir), {"from_run": first["parent_run_id"], "run_name": "evaluate-rerun",
                                           "eval_sets": [f"folder={folder}"]}, from_stage="evaluate")
    mlflow.set_tracking_uri(first["tracking_uri"])
    client = mlflow.MlflowClient()
    tags = client.get_run(summary["parent_run_id"]).data.tags
    earlier = client.get_run(first["parent_run_id"]).data.tags
    assert tags["flexi_jest.from_run"] == first["parent_run_id"] and tags["flexi_jest.from_stage"] == "evaluate"
    stages = sorted(r.data.tags["flexi_jest.stage"] for r in client.search_runs(
        [client.get_experiment_by_name("flexi-jest").experiment_id],
        f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'"))
    assert stages == ["evaluate", "promote"], "nothing is trained"
    evaluation = client.get_run(tags["flexi_jest.stage_run.evaluate.joint"])
    assert evaluation.data.params["model"] == earlier["flexi_jest.output.learner.joint"]
    assert "splits.folder.top1" in evaluation.data.metrics
    # the same learner (one registered version, promoted again), the same total FLOPs as its training
    assert len(client.search_model_versions("name = 'flexi-jest-learner'")) == len(
        {v.run_id for v in client.search_model_versions("name = 'flexi-jest-learner'")})
    first_joint = next(r for r in first["rows"] if r["method"] == "joint")
    assert summary["rows"][0]["total_flops"] == pytest.approx(first_joint["total_flops"])


@pytest.mark.slow  # reason: on the whole pipeline run (pipeline_run: 226 s on 2 cores), see README "Tests"
@pytest.mark.parametrize("stage", ["cache_reference", "train_reference"])
def test_rerun_from_the_reference_or_its_cache_resolves_the_data(pipeline_run, stage):
    """--from-stage cache_reference / train_reference: the earlier run's data (and reference) resolved from its
    KFP run ID; the stage runs again (the reference with another batch size), then its cache, the learner, its
    evaluation and promotion."""
    import mlflow

    from pipelines.runner import run_local

    workdir, first = pipeline_run
    with with_tracking_uri(first["tracking_uri"]):
        summary = run_local(str(workdir), {
            "from_run": first["kfp_run_id"], "run_name": f"{stage}-rerun", "steps": 2, "batch_size": 16,
            "reference_config": json.dumps({"steps": 2, "progress": False}),
            "learner_config": json.dumps({"super_batch_size": 80, "progress": False})}, from_stage=stage)
    mlflow.set_tracking_uri(first["tracking_uri"])
    client = mlflow.MlflowClient()
    tags = client.get_run(summary["parent_run_id"]).data.tags
    earlier = client.get_run(first["parent_run_id"]).data.tags
    assert tags["flexi_jest.from_stage"] == stage
    assert tags["flexi_jest.output.pool"] == earlier["flexi_jest.output.pool"]
    assert tags["flexi_jest.output.cache"] != earlier["flexi_jest.output.cache"], "the cache is made again"
    children = {r.data.tags["flexi_jest.stage"]: r for r in client.search_runs(
        [client.get_experiment_by_name("flexi-jest").experiment_id],
        f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")}
    assert {"cache-reference", "train-learner", "evaluate", "promote"} <= set(children)
    if stage == "train_reference":
        reference = children["train-reference"]
        assert reference.data.params["batch_size"] == "16" and reference.data.params["data"] == earlier[
            "flexi_jest.output.curated"]
        assert tags["flexi_jest.output.reference"] != earlier["flexi_jest.output.reference"]
    else:
        assert "train-reference" not in children or children["train-reference"].data.tags.get("flexi_jest.cached")
        assert children["cache-reference"].data.params["reference"] == earlier["flexi_jest.output.reference"]
    assert summary["rows"][0]["method"] == "joint" and summary["decision"] in ("champion", "challenger")


def test_a_bad_config_fails_the_component_with_the_field_named(tmp_path, monkeypatch, capfd):
    from kfp import local

    from components.stages import make_data

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    capfd.readouterr()
    with pytest.raises(RuntimeError):
        make_data(config_json='{"pool_size": "lots"}', dataset="shapes", storage_root="", profile="tiny",
                  experiment="bad")
    output = "".join(capfd.readouterr())
    assert "invalid config for make-data" in output and "pool_size" in output and "lots" in output


@pytest.mark.slow  # three KFP subprocesses: 377 s (moto) and 300 s (SeaweedFS) on 2 cores at load 12, 89 s CPU for both
@BOTH_S3
def test_stages_write_their_data_under_an_s3_storage_root(s3, tmp_path, monkeypatch):
    """The main job's storage_root=s3://... (a cluster run's): data, reference and cache components, run by KFP's
    local runner, write under storage_root/<run>/<task>/ on the S3 server and hand the s3:// URIs on."""
    from kfp import dsl, local

    from components.stages import cache_reference, make_data, train_reference
    from flexi_jest import storage

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    root, common = f"{s3}/runs", dict(profile="tiny", experiment="s3-root")

    @dsl.pipeline(name="on-s3")
    def on_s3() -> dsl.Dataset:
        data = make_data(config_json=json.dumps({"curated_size": 32, "pool_size": 40, "eval_size": 10}),
                         dataset="digits", storage_root=root, **common)
        reference = train_reference(config_json=json.dumps({"steps": 2, "batch_size": 16, "progress": False}),
                                    storage_root=root, curated=data.outputs["curated"], **common)
        return cache_reference(config_json="{}", reference=reference.outputs["model"],
                               pool=data.outputs["pool"], storage_root=root, **common).outputs["cache"]

    cache = on_s3().output
    assert cache.metadata["uri"].startswith(f"{root}/") and cache.metadata["num_samples"] == 40
    tree = storage.list_tree(root)
    for part in ("/data/pool/manifest.json", "/reference/model.pt", "/refcache/manifest.json"):
        assert any(path.endswith(part) for path in tree), (part, tree)
    assert not list(tmp_path.rglob("*.tar")) and not list(tmp_path.rglob("model.pt"))  # nothing beside the artifacts


# A fresh interpreter with no flexi_jest import in its code: the registered champion needs open_clip only.
EMBED_WITH_THE_CHAMPION = """
import json, sys
import mlflow
model = mlflow.pyfunc.load_model("models:/flexi-jest-learner@champion")
out = model.predict({"text": ["a red circle", "a blue square"]})
print(json.dumps({"flexi_jest": any(m.startswith("flexi_jest") for m in sys.modules),
                  "text": [len(v) for v in out["text_embedding"]]}))
"""


@pytest.mark.slow  # reason: on the whole pipeline run (pipeline_run: 226 s on 2 cores), see README "Tests"
def test_the_champion_from_the_registry_embeds_in_a_fresh_process(pipeline_run, mlflow_server):
    """Done-when of issue 11: the reference fine-tuned from an open_clip checkpoint, the pipeline run on it, the
    learner exported as an open_clip checkpoint that open_clip loads, and the registry's pyfunc embedding in a
    subprocess; the registered versions carry a signature and their lineage."""
    import subprocess
    import sys

    import mlflow
    import open_clip
    import torch

    workdir, summary = pipeline_run
    _, env = mlflow_server
    mlflow.set_tracking_uri(summary["tracking_uri"])
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("flexi-jest-learner", "champion")
    # this run's reference version, by the tag promote put on its parent run: not the latest version, which a
    # rerun on the same store (test_rerun_from_the_reference_..., a slow test like this one) may have added since
    version = client.get_run(summary["parent_run_id"]).data.tags["flexi_jest.output.reference_version"]
    reference_version = client.get_model_version("flexi-jest-reference", version)
    assert {"lineage.pool_uri", "lineage.reference_sha256", "lineage.selection", "lineage.flops"} <= set(champion.tags)
    assert any(key.startswith("eval.") and key.endswith(".top1") for key in champion.tags)
    assert reference_version.tags["lineage.init_checkpoint"] == str(workdir / "open_clip_init.pt")
    assert "lineage.curated_uri" in reference_version.tags
    assert mlflow.models.get_model_info("models:/flexi-jest-learner@champion").signature is not None

    result_json = Path(mlflow.artifacts.download_artifacts(run_id=champion.run_id, artifact_path="result.json",
                                                           dst_path=str(workdir / "champion")))
    learner_dir = Path(json.loads(result_json.read_text())["open_clip_dir"])
    theirs = open_clip.create_model(f"local-dir:{learner_dir}").eval()
    from flexi_jest.checkpoint import load_model
    ours, _ = load_model(str(learner_dir.parent / "model.pt"))
    tokens = open_clip.get_tokenizer(f"local-dir:{learner_dir}")(["a red circle"])
    with torch.no_grad():
        assert torch.equal(theirs.encode_text(tokens, normalize=True), ours.eval().encode_text(tokens))

    done = subprocess.run([sys.executable, "-c", EMBED_WITH_THE_CHAMPION], capture_output=True, text=True, timeout=300,
                          env={**env, "MLFLOW_TRACKING_URI": summary["tracking_uri"], "PYTHONPATH": ""}, cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"flexi_jest": False, "text": [ours.cfg.embed_dim] * 2}


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow  # reason: on the whole pipeline run (pipeline_run: 226 s on 2 cores), see README "Tests"
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it: apt-get install chromium)")
def test_mlflow_ui_shows_the_champion_in_a_real_browser(pipeline_run, tmp_path):
    import subprocess

    _, summary = pipeline_run
    url = f"{summary['tracking_uri']}/#/models/flexi-jest-learner"
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120).stdout
    assert "flexi-jest-learner" in dom
    assert "champion" in dom


def test_submit_sends_the_compiled_pipeline_to_the_given_host(monkeypatch, capsys):
    import kfp

    from pipelines import cli as module
    calls = {}

    class FakeClient:
        def __init__(self, host):
            calls["host"] = host

        def create_run_from_pipeline_func(self, pipeline, arguments, experiment_name, service_account=None):
            calls.update(pipeline=pipeline.name, arguments=arguments, experiment=experiment_name)
            if service_account:
                calls["service_account"] = service_account
            return type("Run", (), {"run_id": "run-123"})()

    monkeypatch.setattr(kfp, "Client", FakeClient)
    assert module.main(["submit", "--host", "https://kfp.example", "--experiment", "exp",
                        "--param", "steps=50", "--param", 'baseline_methods=["uniform", "independent"]',
                        "--param", 'learner_config={"n_chunks": 4}']) == 0
    assert calls == {"host": "https://kfp.example", "pipeline": "flexi-jest-pp", "experiment": "exp",
                     "arguments": {"steps": 50, "baseline_methods": ["uniform", "independent"],
                                   "learner_config": '{"n_chunks": 4}'}}
    assert "submitted run run-123" in capsys.readouterr().out
    calls.clear()
    assert module.main(["submit", "--host", "h", "--learner-nodes", "2", "--service-account",
                        "flexi-jest-pipeline-runner"]) == 0
    assert calls["service_account"] == "flexi-jest-pipeline-runner" and calls["pipeline"] == "flexi-jest-pp"
    with pytest.raises(SystemExit, match="unknown pipeline parameter"):
        module.main(["submit", "--host", "h", "--param", "no_such=1"])


@pytest.mark.slow  # a whole pipeline per case (minutes each on 2 cores), on a pool img2dataset wrote (a minute)
@pytest.mark.parametrize("s3_backend, pool", [("moto", "{laion}/{{00002..00004}}.tar"),
                                              ("seaweedfs", "{laion}/00002.tar::{laion}/00004.tar")],
                         ids=["moto-brace", "seaweedfs-join"])  # each server, each pool form, once (not 4 runs)
def test_whole_pipeline_on_registered_img2dataset_data(mlflow_server, img2dataset_dir, s3, tmp_path, monkeypatch, pool):
    """source 'register': the pool on S3 (moto, SeaweedFS) as img2dataset wrote it, its last shard empty
    (`successes: 0`), given as a brace pattern and as a `::` join; curated and eval single tars (eval local).
    Registration resolves each spec once and every later stage reads its shard lists, nothing is written into the
    data, every learner trains and the learner is promoted.
    Before, every learner failed ('no usable sample in a whole pass', 3 shard visits) on the brace pattern, and
    the join at once."""
    from flexi_jest import storage
    from pipelines.runner import run_local
    url, _ = mlflow_server
    for path in img2dataset_dir.iterdir():
        storage.upload_file(path, f"{s3}/laion/{path.name}")
    before = sorted(storage.list_names(f"{s3}/laion"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    summary = run_local(str(tmp_path), {
        **SMALL, "data_config": "{}", "run_name": "pp-registered", "data_source": "register",
        "curated_uri": f"{s3}/laion/00000.tar", "pool_uri": pool.format(laion=f"{s3}/laion"),
        "eval_uri": str(img2dataset_dir / "00001.tar"), "steps": 2})
    assert sorted(row["method"] for row in summary["rows"]) == ["joint", "offline-filter", "reference", "uniform"]
    assert all(row["i2t_r1"] is not None for row in summary["rows"])  # an image-caption set: retrieval
    assert summary["decision"] in ("champion", "challenger") and summary["learner_version"]
    assert sorted(storage.list_names(f"{s3}/laion")) == before  # nothing written into the team's data
    registrations = list(tmp_path.rglob("registration.json"))
    assert len(registrations) == 1
    registered = json.loads(registrations[0].read_text())["splits"]["pool"]
    # the brace pattern holds 00002-00004 (20 + 20 + 0 samples), the join 00002 and 00004 (20 + 0)
    assert registered["num_samples"] == (20 if "::" in pool else 40)
    assert registered["empty_shards"] == [f"{s3}/laion/00004.tar"]
    listed = json.loads((registrations[0].parent / "pool.shardlist.json").read_text())  # what the later stages read
    assert [s["url"] for s in listed["shards"]] == [s["url"] for s in registered["shards"]]


def test_run_local_keeps_one_cache_per_code_digest(tmp_path):
    """KFP's cache key holds a component's own source, not the library it calls: run-local's cache is per
    digest of src/flexi_jest and components/, so a library change never reuses a stage computed by older code."""
    from pipelines.runner import code_digest
    for part in ("src/flexi_jest/data", "components"):
        (tmp_path / part).mkdir(parents=True)
    (tmp_path / "src/flexi_jest/losses.py").write_text("SCALE = 10\n")
    (tmp_path / "src/flexi_jest/data/loader.py").write_text("WORKERS = 0\n")
    (tmp_path / "components/stages.py").write_text("IMAGE = 'x'\n")
    first = code_digest(tmp_path)
    assert code_digest(tmp_path) == first
    (tmp_path / "src/flexi_jest/data/loader.py").write_text("WORKERS = 2\n")
    assert code_digest(tmp_path) != first
    (tmp_path / "src/flexi_jest/data/loader.py").write_text("WORKERS = 0\n")
    assert code_digest(tmp_path) == first
    (tmp_path / "components/stages.py").write_text("IMAGE = 'y'\n")
    assert code_digest(tmp_path) != first
