"""Fault: a run diverges (optim.lr=1e30) or a model file holds NaN weights. Before, training exited 0 with weights of
1e30 (the loss is checked before each update, so the last one went unchecked), and evaluating an all-NaN model
gave top-1 0.021 (top-k over NaN logits still ranks something). Now training refuses to write a diverged model and
evaluation refuses to score one, each in one line naming the run or the model file and the eval set."""

import json

import pytest
import torch

from conftest import TEST_MODEL
from flexi_jest import storage
from flexi_jest.checkpoint import save_model
from flexi_jest.cli import main
from flexi_jest.config import EvaluateConfig, TrainLearnerConfig, TrainReferenceConfig
from flexi_jest.evaluate import evaluate
from flexi_jest.finite import NonFiniteError, check_model_finite
from flexi_jest.models import DualEncoder
from flexi_jest.train import train_learner, train_reference


def test_a_model_with_huge_but_finite_weights_is_caught_by_its_embeddings():
    model = DualEncoder(TEST_MODEL)
    check_model_finite(model, "fresh")  # a fresh model passes
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(1e30)  # finite weights, as one AdamW step at lr 1e30 leaves them
    with pytest.raises(NonFiniteError, match="its weights are finite .* but its embeddings"):
        check_model_finite(model, "huge")
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="weight tensors hold NaN"):
        check_model_finite(model, "nan")


def test_reference_diverging_on_its_last_update_writes_no_model(shapes_data, tmp_path):
    out = tmp_path / "reference"
    cfg = TrainReferenceConfig(data=shapes_data.splits["curated"].path, out_dir=str(out), model=TEST_MODEL, steps=1,
                               batch_size=16, progress=False, optim={"lr": 1e30})
    with pytest.raises(NonFiniteError, match=f"reference in {out} after step 1: .*lower optim.lr"):
        train_reference(cfg)
    assert not (out / "model.pt").exists() and not (out / "result.json").exists()


def test_learner_diverging_on_its_last_update_writes_no_model(shapes_data, tmp_path):
    out = tmp_path / "learner"
    cfg = TrainLearnerConfig(pool=shapes_data.splits["pool"].path, out_dir=str(out), model=TEST_MODEL, method="uniform",
                             steps=1, super_batch_size=40, progress=False, optim={"lr": 1e30})
    with pytest.raises(NonFiniteError, match=r"learner\[uniform\] in .* after step 1"):
        train_learner(cfg)
    assert not (out / "model.pt").exists() and not (out / "result.json").exists()


def test_cli_train_reference_at_lr_1e30_exits_non_zero_in_one_line(shapes_data, tmp_path, capsys):
    config = tmp_path / "reference.json"
    config.write_text(json.dumps({"model": TEST_MODEL.model_dump(mode="json"), "batch_size": 16, "progress": False}))
    status = main(["train-reference", "--config", str(config), "--set", f"data={shapes_data.splits['curated'].path}",
                   "--set", f"out_dir={tmp_path / 'out'}", "--set", "steps=1", "--set", "optim.lr=1e30"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert err[0].startswith("train-reference: reference in ") and "lower optim.lr" in err[0]


def nan_model_file(path) -> str:
    model = DualEncoder(TEST_MODEL)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    save_model(model, str(path))
    return str(path)


def test_evaluating_an_all_nan_model_is_refused_naming_the_model_and_the_set(shapes_data, tmp_path, capsys):
    model = nan_model_file(tmp_path / "nan-model.pt")
    eval_split = shapes_data.splits["eval"].path
    with pytest.raises(NonFiniteError, match=rf"model {model} on eval set 'shapes' \({eval_split}\), image embeddings"):
        evaluate(EvaluateConfig(model=model, eval_data=[eval_split], out_path=str(tmp_path / "eval.json")))
    assert not storage.exists(str(tmp_path / "eval.json"))  # no metrics for promotion to read
    assert main(["evaluate", "--set", f"model={model}", "--set", f"eval_data=[{eval_split}]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"evaluate: model {model} on eval set 'shapes'")
