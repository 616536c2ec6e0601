"""Fault: an eval split with a missing, truncated or random shard, or an undecodable image.

Expected: evaluation fails naming the split and the read stats (eval metrics feed promotion, so a score
on part of the data must not pass as the score); with allow_partial: true it scores the readable part and
the result carries the read stats and the shortfall, which log_result turns into MLflow metrics.
"""

import pytest
import torch
from faults import colour_samples, random_bytes, record, truncate, write_raw_split

from conftest import TEST_MODEL
from flexi_jest.checkpoint import save_model
from flexi_jest.config import EvaluateConfig
from flexi_jest.data.shards import PartialReadError, write_split
from flexi_jest.evaluate import evaluate
from flexi_jest.models import DualEncoder
from flexi_jest.tracking import numeric_metrics


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(DualEncoder(TEST_MODEL), str(path))
    return str(path)


def missing(split):
    (split / "shard-000001.tar").unlink()


def truncated(split):
    truncate(split / "shard-000001.tar", 0.5)


def random_shard(split):
    random_bytes(split / "shard-000001.tar")


DAMAGE = {"missing_shard": missing, "truncated_shard": truncated, "random_shard": random_shard}


def eval_split(tmp_path):
    split = tmp_path / "eval"
    write_split(colour_samples(30), str(split), samples_per_shard=10, info={"dataset": "toy"})
    return split


@pytest.mark.parametrize("fault", sorted(DAMAGE))
def test_damaged_eval_shard_fails_the_evaluation(tmp_path, model_file, fault):
    split = eval_split(tmp_path)
    DAMAGE[fault](split)
    with pytest.raises(PartialReadError, match=f"eval split {split} is not wholly readable.*allow_partial"):
        evaluate(EvaluateConfig(model=model_file, eval_data=[str(split)], device="cpu"))


@pytest.mark.parametrize("fault", sorted(DAMAGE))
def test_allow_partial_scores_the_rest_and_reports_the_shortfall(tmp_path, model_file, fault):
    split = eval_split(tmp_path)
    DAMAGE[fault](split)
    result = evaluate(EvaluateConfig(model=model_file, eval_data=[str(split)], device="cpu", allow_partial=True))
    metrics = result.splits["toy"]
    assert metrics.expected_samples == 30
    assert metrics.num_samples == metrics.read_stats.samples < 30
    assert metrics.shortfall == 30 - metrics.num_samples
    assert metrics.read_stats.skipped  # by reason
    logged = numeric_metrics(result.model_dump())  # what tracking.log_result sends to MLflow
    assert logged["splits.toy.shortfall"] == metrics.shortfall
    assert logged["splits.toy.read_stats.samples"] == metrics.num_samples
    assert any(key.startswith("splits.toy.read_stats.skipped.") for key in logged)


def test_undecodable_eval_image_fails_unless_allowed(tmp_path, model_file):
    records = [record(f"k{i:02d}", caption=f"caption {i}".encode()) for i in range(12)]
    records[5]["png"] = b"not an image"
    write_raw_split(str(tmp_path / "eval"), records, per_shard=6)
    with pytest.raises(PartialReadError, match="1 bad_image"):
        evaluate(EvaluateConfig(model=model_file, eval_data=[str(tmp_path / "eval")], device="cpu"))
    result = evaluate(EvaluateConfig(model=model_file, eval_data=[str(tmp_path / "eval")], device="cpu",
                                     allow_partial=True))
    assert result.splits["toy"].shortfall == 1 and result.splits["toy"].read_stats.skipped == {"bad_image": 1}


def test_whole_eval_split_carries_its_read_stats(tmp_path, model_file):
    split = eval_split(tmp_path)
    metrics = evaluate(EvaluateConfig(model=model_file, eval_data=[str(split)], device="cpu")).splits["toy"]
    assert metrics.num_samples == metrics.read_stats.samples == metrics.expected_samples == 30
    assert metrics.shortfall == 0 and metrics.read_stats.skipped == {}
    capped = evaluate(EvaluateConfig(model=model_file, eval_data=[str(split)], device="cpu", max_samples=7))
    assert capped.splits["toy"].num_samples == capped.splits["toy"].read_stats.samples == 7  # none read unscored
    assert capped.splits["toy"].expected_samples == 7 and capped.splits["toy"].shortfall == 0


def test_partial_eval_is_logged_to_mlflow(tmp_path, model_file, monkeypatch):
    """The evaluate stage under MLflow: the shortfall and read stats are the run's metrics."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    from flexi_jest import tracking
    from flexi_jest.stages import evaluate_stage
    split = eval_split(tmp_path)
    missing(split)
    result, run_id = evaluate_stage({"model": model_file, "eval_data": [str(split)], "device": "cpu",
                                     "allow_partial": True}, "tiny", "uniform")
    run = tracking.mlflow_client().get_run(run_id)
    assert run.data.metrics["splits.toy.shortfall"] == 10
    assert run.data.metrics["splits.toy.read_stats.skipped.missing_shard"] == 1
    assert run.data.metrics["splits.toy.read_stats.samples"] == 20
