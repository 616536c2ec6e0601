"""Fault: a config that would run, but not as meant (a silent clamp, a boolean read as 1, NaN, a typo in
the device), or a config file with a key twice.

Expected: rejected at validation, before any work, with the field named; the CLI's --set and YAML/JSON
config files still give ints and floats as before.
"""

import json

import pytest

from flexi_jest.cli import build_config, load_config_file, main, parse_overrides
from flexi_jest.config import ConfigError, validated_stage_config

LEARNER = {"reference_cache": "cache"}


@pytest.mark.parametrize("stage, values, field", [
    # n_chunks larger than the sub-batch: joint selection silently used fewer chunks (chunk_sizes drops empty ones)
    ("train-learner", {**LEARNER, "super_batch_size": 40, "filter_ratio": 0.8, "n_chunks": 16}, "n_chunks"),
    # a sub-batch of 1 (round(5 * 0.2)) or 0: sub_batch_size clamped it to 1
    ("train-learner", {**LEARNER, "super_batch_size": 5, "filter_ratio": 0.8, "n_chunks": 1}, "super_batch_size"),
    ("train-learner", {**LEARNER, "super_batch_size": 10, "filter_ratio": 0.99, "n_chunks": 1}, "super_batch_size"),
    # evaluations asked for, nothing to evaluate on
    ("train-reference", {"eval_every": 10}, "eval_every"),
    ("train-learner", {**LEARNER, "eval_every": 5, "eval_data": []}, "eval_every"),
    # non-finite learning rates and other floats
    ("train-reference", {"optim": {"lr": float("nan")}}, "optim.lr"),
    ("train-reference", {"optim": {"lr": float("inf")}}, "optim.lr"),
    ("train-reference", {"optim": {"weight_decay": float("inf")}}, "optim.weight_decay"),
    ("train-learner", {**LEARNER, "filter_ratio": float("nan")}, "filter_ratio"),
    # betas outside [0, 1)
    ("train-reference", {"optim": {"betas": [0.9, 1.0]}}, "optim.betas.1"),
    ("train-reference", {"optim": {"betas": [-0.1, 0.95]}}, "optim.betas.0"),
    # unknown device strings
    ("train-reference", {"device": "gpu"}, "device"),
    ("cache-reference", {"device": "cuda:x"}, "device"),
    ("evaluate", {"device": "CUDA"}, "device"),
    # booleans (and floats) where integers are expected: steps=true trained one step
    ("train-reference", {"steps": True}, "steps"),
    ("train-reference", {"steps": 2.5}, "steps"),
    ("train-reference", {"batch_size": False}, "batch_size"),
    ("train-reference", {"model": {"image_size": True}}, "model.image_size"),
    ("train-reference", {"train_patch_sizes": [8, True]}, "train_patch_sizes.1"),
    ("train-learner", {**LEARNER, "n_chunks": True}, "n_chunks"),
    ("evaluate", {"max_samples": True}, "max_samples"),
    ("make-data", {"pool_size": True}, "pool_size"),
    ("train-reference", {"optim": {"lr": True}}, "optim.lr"),
])
def test_bad_config_is_rejected_naming_the_field(stage, values, field):
    with pytest.raises(ConfigError) as error:
        validated_stage_config(stage, "tiny", values)
    assert f"  {field}:" in str(error.value), str(error.value)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_known_devices_are_accepted(device):
    assert validated_stage_config("evaluate", "tiny", {"device": device}).device == device


def test_valid_configs_still_validate():
    learner = validated_stage_config("train-learner", "tiny", {**LEARNER, "super_batch_size": 40, "n_chunks": 8,
                                                               "eval_every": 5, "eval_data": ["e"]})
    assert learner.sub_batch_size == 8 and learner.n_chunks == 8
    # n_chunks only matters to joint selection
    assert validated_stage_config("train-learner", "tiny", {"method": "uniform", "super_batch_size": 40}).n_chunks == 16
    assert validated_stage_config("train-learner", "paper", LEARNER).sub_batch_size == 32768
    assert validated_stage_config("train-reference", "tiny",
                                  {"optim": {"betas": [0.0, 0.999], "lr": 1}}).optim.lr == 1.0


def test_cli_set_values_still_parse_to_ints_and_floats():
    args = type("Args", (), {"config": None, "profile": "tiny",
                             "set": ["steps=7", "optim.lr=1e-3", "optim.betas=[0.8, 0.9]", "train_patch_sizes=[8,16]"]})
    cfg = build_config("train-reference", args)
    assert cfg.steps == 7 and cfg.optim.lr == 1e-3 and cfg.optim.betas == (
        0.8, 0.9) and cfg.train_patch_sizes == [8, 16]


def test_cli_rejects_steps_true_with_the_field_named(capsys):
    assert main(["train-reference", "--set", "steps=true", "--print-config"]) == 2
    assert "steps:" in capsys.readouterr().err


def test_duplicate_yaml_keys_are_an_error(tmp_path, capsys):
    path = tmp_path / "learner.yaml"
    path.write_text("steps: 100\noptim:\n  lr: 0.001\n  lr: 0.1\n")
    with pytest.raises(Exception, match="duplicate key 'lr'"):
        load_config_file(str(path))
    assert main(["train-reference", "--config", str(path), "--print-config"]) == 2
    assert "duplicate key 'lr'" in capsys.readouterr().err
    path.write_text("steps: 100\nsteps: 200\n")
    with pytest.raises(Exception, match="duplicate key 'steps'.*line 1"):
        load_config_file(str(path))


def test_duplicate_json_keys_and_set_mappings_are_errors(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"steps": 1, "steps": 2}')
    with pytest.raises(ValueError, match="duplicate keys \\['steps'\\]"):
        load_config_file(str(path))
    with pytest.raises(Exception, match="duplicate key 'lr'"):
        parse_overrides(["optim={lr: 1, lr: 2}"])


def test_yaml_tags_are_still_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("steps: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(Exception, match="could not determine a constructor"):
        load_config_file(str(path))


def test_a_unique_yaml_config_loads(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("steps: 100\noptim:\n  lr: 0.001\n  betas: [0.9, 0.95]\n")
    assert load_config_file(str(path)) == {"steps": 100, "optim": {"lr": 0.001, "betas": [0.9, 0.95]}}
    json_path = tmp_path / "ok.json"
    json_path.write_text(json.dumps({"steps": 3}))
    assert load_config_file(str(json_path)) == {"steps": 3}
