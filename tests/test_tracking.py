"""MLflow tracking and promotion against a local SQLite store."""

import pytest

from conftest import TEST_MODEL
from flexi_jest import tracking
from flexi_jest.model import DualEncoder


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
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
    tracking._mlflow()
    first = register_version("promo-test")
    decision = tracking.promote("promo-test", first, "shapes.top1", 0.40)
    assert decision.promoted and decision.alias == "champion" and decision.champion_version is None

    worse = register_version("promo-test")
    decision = tracking.promote("promo-test", worse, "shapes.top1", 0.30)
    assert not decision.promoted and decision.alias == "challenger"
    assert decision.champion_version == str(first) and decision.champion_value == pytest.approx(0.40)

    better = register_version("promo-test")
    decision = tracking.promote("promo-test", better, "shapes.top1", 0.55)
    assert decision.promoted and decision.alias == "champion"

    import mlflow
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("promo-test", "champion").version) == str(better)
    assert str(client.get_model_version_by_alias("promo-test", "challenger").version) == str(worse)
    loaded = mlflow.pytorch.load_model("models:/promo-test@champion")
    assert isinstance(loaded, DualEncoder)


def test_stage_runs_nest_under_the_pipeline_run(mlflow_store):
    from flexi_jest.config import EvaluateConfig
    parent = tracking.start_pipeline_run("pp-test-run", {"steps": 3})
    with tracking.stage_run("pp-test-run", "evaluate", EvaluateConfig()) as run:
        child = run.info.run_id
    import mlflow
    client = mlflow.MlflowClient()
    assert client.get_run(child).data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(child).data.params["batch_size"] == "256"
    assert tracking.finish_pipeline_run_named("pp-test-run")
    assert client.get_run(parent).info.status == "FINISHED"
    with pytest.raises(LookupError, match="no MLflow pipeline run named 'missing'"):
        with tracking.stage_run("missing", "evaluate", EvaluateConfig()):
            pass


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
