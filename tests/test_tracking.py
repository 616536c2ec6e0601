"""MLflow tracking and promotion against a local SQLite store."""

import os
import subprocess
import sys

import pytest

from conftest import TEST_MODEL, bare_version
from flexi_jest import registry, tracking
from flexi_jest.models import DualEncoder


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    import mlflow
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    # MLflow remembers the active experiment per process: a fresh store starts without one (and forgets its own)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    monkeypatch.chdir(tmp_path)  # artifacts (./mlruns) stay in the test's folder
    return tmp_path


def test_flatten_and_metrics():
    assert tracking.flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": 1, "a.c": "[1, 2]", "d": "x"}
    assert tracking.numeric_metrics({"a": {"b": 1.5, "s": "text"}, "flag": True, "nan": float("nan")}) == {"a.b": 1.5}


def register_version(name: str) -> str:
    import mlflow
    with mlflow.start_run():
        tracking.log_model(DualEncoder(TEST_MODEL))
        run_id = mlflow.active_run().info.run_id
    return mlflow.register_model(f"runs:/{run_id}/model", name).version


def test_promotion_moves_champion_only_to_a_better_model(mlflow_store):
    tracking.connect()
    first = register_version("promo-test")
    decision = registry.promote("promo-test", first, {"shapes.top1": 0.40})
    assert decision.promoted and decision.alias == "champion" and decision.champion_version is None

    worse = register_version("promo-test")
    decision = registry.promote("promo-test", worse, {"shapes.top1": 0.30})
    assert not decision.promoted and decision.alias == "challenger"
    assert decision.champion_version == str(first) and decision.champion_value == pytest.approx(0.40)

    better = register_version("promo-test")
    decision = registry.promote("promo-test", better, {"shapes.top1": 0.55})
    assert decision.promoted and decision.alias == "champion"

    import mlflow
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("promo-test", "champion").version) == str(better)
    assert str(client.get_model_version_by_alias("promo-test", "previous-champion").version) == str(first)
    assert client.get_model_version("promo-test", first).tags["previous-champion"] == f"until version {better}"
    assert str(client.get_model_version_by_alias("promo-test", "challenger").version) == str(worse)
    assert mlflow.pyfunc.load_model(
        "models:/promo-test@champion").metadata.get_input_schema().input_names() == ["image", "text"]



def test_promotion_reads_but_no_longer_writes_the_legacy_metric_tag(mlflow_store):
    """A champion promoted before the per-metric tags carries only `eval_metric` ("<metric>=<value>"): it is still
    compared with, or it could never be replaced; promotion itself writes the per-metric tags only."""
    import mlflow
    tracking.connect()
    client = mlflow.MlflowClient()
    old = register_version("legacy-test")
    client.set_model_version_tag("legacy-test", old, "eval_metric", "shapes.top1=0.5")  # as older promotions wrote it
    client.set_registered_model_alias("legacy-test", "champion", old)
    new = register_version("legacy-test")
    decision = registry.promote("legacy-test", new, {"shapes.top1": 0.45})
    assert not decision.promoted and decision.champion_value == pytest.approx(0.5)
    tags = client.get_model_version("legacy-test", new).tags
    assert "eval_metric" not in tags and tags["flexi_jest.metric.shapes.top1"] == "0.45"

# Run in a fresh interpreter that imports no flexi_jest: the registered model needs open_clip, not this project.
FRESH_PROCESS = """
import json, sys
import mlflow
model = mlflow.pyfunc.load_model("models:/fresh-test@champion")
both = model.predict({"image": [sys.argv[1], None], "text": ["a red square", "two blue dots"]})
texts = model.predict({"text": ["a red square"]})
print(json.dumps({"flexi_jest_imported": any(m.startswith("flexi_jest") for m in sys.modules),
                  "image": [v is not None and len(v) for v in both["image_embedding"]],
                  "text": [len(v) for v in both["text_embedding"]], "same_text": texts["text_embedding"][0]}))
print(json.dumps(both["text_embedding"][0]))
"""


def register_a_model(mlflow_store):
    """A DualEncoder logged, registered, tagged and promoted as the learner stage does: (the model, its
    version, its run id, the version's tags)."""
    import mlflow
    import torch

    tracking.connect()
    torch.manual_seed(0)
    model = DualEncoder(TEST_MODEL).eval()
    with mlflow.start_run():
        tracking.log_model(model, {"reference_sha256": "ab" * 32, "selection": {"method": "joint"}},
                           {"pool": str(mlflow_store / "pool")})
        run_id = mlflow.active_run().info.run_id
    version = mlflow.register_model(f"runs:/{run_id}/model", "fresh-test").version
    tags = registry.tag_version("fresh-test", str(version), run_id, {"shapes.top1": 0.5})
    registry.promote("fresh-test", str(version), {"shapes.top1": 0.5})
    return model, version, run_id, tags


def test_the_registered_model_carries_its_lineage_signature_and_example(mlflow_store):
    import json

    import mlflow

    _, version, run_id, tags = register_a_model(mlflow_store)
    assert tags["lineage.reference_sha256"] == "ab" * 32 and tags["eval.shapes.top1"] == "0.5"
    assert json.loads(tags["lineage.selection"]) == {"method": "joint"}
    assert tags["lineage.pool_uri"] == str(mlflow_store / "pool")
    run = mlflow.MlflowClient().get_run(run_id)
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["pool"]
    info = mlflow.models.get_model_info(f"models:/fresh-test/{version}")
    assert info.signature.inputs.input_names() == ["image", "text"]
    assert info.saved_input_example_info is not None


@pytest.mark.slow  # reason: a fresh interpreter loading the model through mlflow.pyfunc and open_clip (24 s on 2
# cores); the registration, its tags and signature are checked in the default suite, just above
def test_the_registered_model_embeds_in_a_fresh_process_without_flexi_jest(mlflow_store):
    import json

    import torch

    model, _, _, _ = register_a_model(mlflow_store)  # promoted: FRESH_PROCESS loads models:/fresh-test@champion
    image = tracking.example_image_base64(TEST_MODEL.image_size)
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, image], capture_output=True, text=True, env=env,
                          cwd=mlflow_store, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    summary, text_embedding = json.loads(lines[-2]), json.loads(lines[-1])
    assert not summary["flexi_jest_imported"]
    assert summary["image"] == [TEST_MODEL.embed_dim, False] and summary["text"] == [TEST_MODEL.embed_dim] * 2
    from flexi_jest.models import Tokenizer
    with torch.no_grad():
        ours = model.encode_text(Tokenizer(TEST_MODEL)(["a red square"]))[0]
    assert torch.allclose(torch.tensor(text_embedding), ours, atol=1e-6)
    # a text embeds alike alone and in a batch; float results of two calls (two batch shapes) may differ in the
    # last bits, so they are compared with a tolerance, not bit for bit
    assert torch.allclose(torch.tensor(summary["same_text"]), torch.tensor(text_embedding), rtol=0, atol=1e-6)


def test_promote_refuses_in_one_line_when_the_server_is_unreachable(monkeypatch, capsys):
    from flexi_jest.cli import main
    from test_storage import free_port
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    for argv in (["promote", "--version", "1"], ["rollback"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is unreachable" in err, err


def test_stage_runs_nest_under_the_pipeline_run_found_by_its_kfp_run_id(mlflow_store):
    """Two pipeline runs with one name stay apart: a run is found by its KFP run ID or MLflow id, never by name."""
    from flexi_jest.config import EvaluateConfig
    parent = tracking.start_pipeline_run("pp-test-run", {"steps": 3}, kfp_run_id="kfp-1")
    other = tracking.start_pipeline_run("pp-test-run", {"steps": 3}, kfp_run_id="kfp-2")
    with tracking.stage_run("kfp-1", "evaluate", EvaluateConfig()) as run:
        child = run.info.run_id
    with tracking.stage_run(other, "evaluate", EvaluateConfig()) as run:
        other_child = run.info.run_id
    import mlflow
    client = mlflow.MlflowClient()
    assert client.get_run(child).data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(other_child).data.tags["mlflow.parentRunId"] == other
    assert client.get_run(child).data.params["batch_size"] == "256"
    assert tracking.finish_pipeline_run_of("kfp-1")
    assert client.get_run(parent).info.status == "FINISHED" and client.get_run(other).info.status == "RUNNING"
    assert not tracking.finish_pipeline_run_of("kfp-unknown")
    with pytest.raises(LookupError, match="no MLflow pipeline run with KFP run ID or MLflow run id 'missing'"):
        with tracking.stage_run("missing", "evaluate", EvaluateConfig()):
            pass
    with pytest.raises(LookupError, match="'pp-test-run'"):  # a name is no id
        tracking.parent_tags("pp-test-run")


def test_a_cached_stage_is_recorded_on_the_next_pipeline_run_without_moving(mlflow_store):
    """record_stage: a stage computed for this run is nested under it; one reused from KFP's cache stays under
    the run that computed it, and the new parent gets a `<stage> (cached)` child and the outputs' URIs."""
    import mlflow

    from flexi_jest.config import EvaluateConfig
    first = tracking.start_pipeline_run("a", {}, kfp_run_id="kfp-a")
    second = tracking.start_pipeline_run("b", {}, kfp_run_id="kfp-b")
    with tracking.stage_run(None, "make-data", EvaluateConfig()) as run:
        stage = run.info.run_id
    client = mlflow.MlflowClient()
    assert "mlflow.parentRunId" not in client.get_run(stage).data.tags
    assert tracking.record_stage(first, "make-data", stage, {"pool": "s3://b/pool"}) is False
    assert client.get_run(stage).data.tags["mlflow.parentRunId"] == first
    assert tracking.record_stage("kfp-b", "make-data", stage, {"pool": "s3://b/pool"}) is True
    assert client.get_run(stage).data.tags["mlflow.parentRunId"] == first
    children = client.search_runs([client.get_run(second).info.experiment_id], f"tags.mlflow.parentRunId = '{second}'")
    assert [(c.info.run_name,
             c.data.tags["flexi_jest.reused_run_id"]) for c in children] == [("make-data (cached)", stage)]
    outputs = tracking.recorded_outputs("kfp-b")
    assert outputs["pool"] == "s3://b/pool" and outputs["make-data.mlflow_run_id"] == stage
    assert outputs["parent_run_id"] == second and tracking.recorded_outputs(second) == outputs


def test_a_rerun_resolves_the_earlier_runs_main_learner_and_records_its_inputs(mlflow_store):
    """resolve_earlier_run: the earlier run's main learner is the one of its `method` parameter (its baselines are
    recorded beside it); what a rerun from a stage needs but the run never recorded is named; the inputs resolved
    are tagged on the rerun's own parent run."""
    import mlflow

    from flexi_jest.pipeline_support import resolve_earlier_run
    earlier = tracking.start_pipeline_run("earlier", {"method": "flexi-jest"}, kfp_run_id="kfp-earlier")
    outputs = {"eval_split": "s3://b/eval", "reference": "s3://b/ref/model.pt", "reference_sha256": "ab" * 32,
               "learner.flexi-jest": "s3://b/flexi/model.pt", "learner.uniform": "s3://b/uniform/model.pt"}
    for name, value in outputs.items():
        mlflow.MlflowClient().set_tag(earlier, f"{tracking.OUTPUT_TAG}{name}", value)
    resolved = resolve_earlier_run("kfp-earlier", stage="evaluate")
    assert resolved["learner"] == "s3://b/flexi/model.pt" and resolved["parent_run_id"] == earlier
    with pytest.raises(LookupError, match=r"recorded no pool, cache, which a rerun from train_learner needs"):
        resolve_earlier_run(earlier, stage="train_learner")
    rerun = tracking.start_pipeline_run("rerun", {}, kfp_run_id="kfp-rerun")
    resolve_earlier_run("kfp-earlier", parent_run_id="kfp-rerun", stage="evaluate")
    tags = mlflow.MlflowClient().get_run(rerun).data.tags
    assert tags["flexi_jest.from_run"] == earlier and tags["flexi_jest.from_stage"] == "evaluate"
    assert tags[f"{tracking.OUTPUT_TAG}eval_split"] == "s3://b/eval"


@pytest.mark.parametrize("stage,values,field", [
    ("make-data", {"pool_size": -1}, "pool_size"),
    ("train-reference", {"steps": "many"}, "steps"),
    ("cache-reference", {"batch_size": 0}, "batch_size"),
    ("train-learner", {"filter_ratio": 2, "reference_cache": "x"}, "filter_ratio"),
    ("evaluate", {"unknown_field": 1}, "unknown_field"),
])
def test_every_stage_rejects_a_bad_config_naming_the_field(stage, values, field, mlflow_store):
    from flexi_jest import stages
    from flexi_jest.config import ConfigError
    runner = {"make-data": stages.make_data_stage, "train-reference": stages.train_reference_stage,
              "cache-reference": stages.cache_reference_stage, "train-learner": stages.train_learner_stage}
    with pytest.raises(ConfigError, match=field):
        if stage == "evaluate":
            stages.evaluate_stage(values, "tiny", "joint")
        else:
            runner[stage](values, "tiny")


def test_pipeline_learners_evaluate_during_training():
    from flexi_jest.pipeline_support import with_eval_points
    values = with_eval_points("train-learner", {"steps": 50, "reference_cache": "c"}, "tiny", "s3://b/eval")
    assert values["eval_data"] == ["s3://b/eval"] and values["eval_every"] == 10
    assert with_eval_points("train-learner", {"steps": 3, "reference_cache": "c"}, "tiny", "e")["eval_every"] == 1
    kept = with_eval_points("train-learner", {"eval_every": 7, "eval_data": ["mine"], "reference_cache": "c"}, "tiny",
                            "e")
    assert kept["eval_every"] == 7 and kept["eval_data"] == ["mine"]  # the user's own settings win


def test_comparison_is_logged_on_the_pipeline_run(mlflow_store):
    import json

    import mlflow

    from flexi_jest.config import EvaluateResult, SplitMetrics
    from flexi_jest.stages import compare_stage
    parent = tracking.start_pipeline_run("cmp-run", {})

    def evaluation(method, top1, history, share=0.0):
        path = mlflow_store / f"{method}.jsonl"
        path.write_text("".join(json.dumps({"step": i, "total_flops": x, "eval": {"shapes.top1": y}}) + "\n"
                                for i, (x, y) in enumerate(history)))
        split = SplitMetrics(num_samples=10, num_classes=5, top1=top1, top5=1.0, image_to_text_r1=0.1,
                             image_to_text_r5=0.5, image_to_text_r10=1.0, text_to_image_r1=0.1, text_to_image_r5=0.5,
                             text_to_image_r10=1.0)
        return {"method": method, "total_flops": history[-1][0], "metrics_path": str(path), "reference_share": share,
                "steps": len(history) - 1,
                "result": EvaluateResult(model="m.pt", splits={"shapes": split}).model_dump()}

    summary = compare_stage([evaluation("joint", 0.6, [(10.0, 0.3), (20.0, 0.55)], share=4.0),
                             evaluation("uniform", 0.4, [(5.0, 0.1), (10.0, 0.2), (15.0, 0.3), (20.0, 0.38)])],
                            parent, report_path=str(mlflow_store / "report.html"),
                            reference=evaluation("reference", 0.5, [(4.0, 0.5)]))
    # the zero-shot eval replaces training's (capped) last evaluation
    assert summary["methods"]["joint"]["mean_curve"] == [(10.0, 0.3), (20.0, 0.6)]
    assert summary["target"] == 0.4 and summary["uniform_flops_to_target"] == 20.0
    assert summary["methods"]["joint"]["flops_to_target"] == pytest.approx(10.0 + 10.0 * (0.1 / 0.3))
    # iterations: uniform reaches its final 0.4 at its last step (3), joint a third of the way into its step 1
    assert summary["methods"]["uniform"]["steps_to_target"] == 3.0
    assert summary["methods"]["joint"]["steps_to_target"] == pytest.approx(1 / 3)
    assert summary["methods"]["joint"]["steps_ratio_vs_uniform"] == pytest.approx(9.0)
    # the reference share left out (amortised): joint's 4 of its FLOPs do not count
    assert summary["methods"]["joint"]["flops_ratio_vs_uniform_learner_only"] == pytest.approx(
        20.0 / (summary["methods"]["joint"]["flops_to_target"] - 4.0))
    assert summary["reference"]["final_metric"] == 0.5 and "reference" not in summary["methods"]
    client = mlflow.MlflowClient()
    assert {a.path for a in client.list_artifacts(parent)} == {"accuracy_vs_flops.png", "method_comparison.json"}
    metrics = client.get_run(parent).data.metrics
    assert metrics["compare.uniform.flops_ratio_vs_uniform"] == 1.0 and metrics["compare.joint.final_metric"] == 0.6
    assert metrics["compare.joint.steps_ratio_vs_uniform"] == pytest.approx(9.0)
    assert metrics["compare.reference.final_metric"] == 0.5
    report = (mlflow_store / "report.html").read_text()
    assert "<td>joint</td><td>0.600</td>" in report and "the reference's own shapes.top1: 0.500" in report
    with pytest.raises(ValueError, match="no evaluations"):
        compare_stage([], parent)
    with pytest.raises(LookupError, match="no MLflow pipeline run with KFP run ID or MLflow run id 'absent'"):
        compare_stage([evaluation("joint", 0.6, [(1.0, 0.6)])], "absent")


def test_a_non_finite_metric_is_refused_and_a_non_finite_champion_is_replaced(mlflow_store):
    """A NaN metric (a diverged model) crowned nobody before only when a champion existed: with none it became
    champion, and a NaN champion could never be beaten (nan > margin is False). Now a NaN or infinite candidate
    gets no alias, and any finite metric replaces a champion whose metric is not finite, the reason tagged."""
    client = tracking.mlflow_client()
    nan_first = bare_version(client, "nan-test")
    decision = registry.promote("nan-test", nan_first, {"shapes.top1": float("nan")})
    assert not decision.promoted and decision.alias == "" and "not a finite number" in decision.reason
    assert registry.alias_holder(client, "nan-test", "champion") is None
    assert registry.alias_holder(client, "nan-test", "challenger") is None
    assert "refused" in client.get_model_version("nan-test", nan_first).tags[registry.PROMOTION_TAG]

    finite = bare_version(client, "nan-test")
    assert registry.promote("nan-test", finite, {"shapes.top1": 0.3}).promoted
    infinite = bare_version(client, "nan-test")
    assert registry.promote("nan-test", infinite, {"shapes.top1": float("inf")}).alias == ""
    assert str(registry.alias_holder(client, "nan-test", "champion").version) == finite

    registry.promote_by_hand("nan-test", nan_first)  # a person crowned the NaN version (or an older release did)
    challenger = bare_version(client, "nan-test")
    decision = registry.promote("nan-test", challenger, {"shapes.top1": 0.1})
    assert decision.promoted and decision.champion_version == nan_first
    assert str(registry.alias_holder(client, "nan-test", "champion").version) == challenger
    reason = client.get_model_version("nan-test", challenger).tags[registry.PROMOTION_TAG]
    assert reason.startswith(f"crowned: champion version {nan_first}'s shapes.top1 is nan, not a finite number")


def test_a_tracking_uri_a_test_sets_is_gone_after_it_for_this_process_and_its_children():
    """mlflow.set_tracking_uri writes MLFLOW_TRACKING_URI into os.environ, so that subprocesses inherit it. In CI a
    slow test's URI (a server it then stopped) reached a later test's training subprocesses, which retried it for
    210 s and failed: conftest.keep_mlflow_process_state, run around every test, undoes it."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    from conftest import keep_mlflow_process_state

    before_env, before_uri = os.environ.get("MLFLOW_TRACKING_URI"), utils._tracking_uri
    with pytest.MonkeyPatch.context() as monkeypatch:
        keep_mlflow_process_state(monkeypatch)
        mlflow.set_tracking_uri("http://192.0.2.1:5000")  # TEST-NET-1: nothing answers there
        assert os.environ["MLFLOW_TRACKING_URI"] == "http://192.0.2.1:5000"  # what leaked, before the fix
    assert os.environ.get("MLFLOW_TRACKING_URI") == before_env and utils._tracking_uri == before_uri
    child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('MLFLOW_TRACKING_URI'))"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == str(before_env)
