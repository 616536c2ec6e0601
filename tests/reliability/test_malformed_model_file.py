"""Fault: a model.pt that torch loads weights-only but that is not a flexi-jest model file: a list, a dict without
model_config or state_dict, fields of the wrong type, weights that do not fit the config. Before, these gave a bare
TypeError or KeyError; now each is the ModelFileError "<file> is not a readable flexi-jest model file: <why>", and
one line at the CLI."""

import io

import pytest
import torch

from conftest import TEST_MODEL
from flexi_jest.checkpoint import ModelFileError, load_model, model_state
from flexi_jest.cli import main
from flexi_jest.models import DualEncoder

GOOD = model_state(DualEncoder(TEST_MODEL))
CONFIG = GOOD["model_config"]

PAYLOADS = {
    "a list": ([1, 2, 3], "holds a list"),
    "a tensor": (torch.zeros(3), "holds a Tensor"),
    "no model_config": ({"state_dict": GOOD["state_dict"]}, "no model_config"),
    "no state_dict": ({"model_config": CONFIG}, "no state_dict"),
    "neither": ({"weights": 1}, "no model_config and no state_dict"),
    "model_config a string": ({"model_config": "ViT", "state_dict": GOOD["state_dict"]}, "model_config is a str"),
    "state_dict a list": ({"model_config": CONFIG, "state_dict": [1.0]}, "state_dict is not a dict"),
    "state_dict of numbers": ({"model_config": CONFIG, "state_dict": {"w": 1.0}}, "state_dict is not a dict"),
    "model_config invalid": ({"model_config": {**CONFIG, "embed_dim": -1}, "state_dict": GOOD["state_dict"]},
                             "model_config is not a valid model"),
    "weights of another shape": ({"model_config": {**CONFIG, "embed_dim": 16}, "state_dict": GOOD["state_dict"]},
                                 "state_dict does not fit its model_config"),
    "a checkpoint whose model is a list": ({"model": [1], "step": 3}, "holds a list"),
}


def write(path, payload) -> str:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path.write_bytes(buffer.getvalue())
    return str(path)


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_a_malformed_model_file_is_refused_naming_the_file(kind, tmp_path):
    payload, why = PAYLOADS[kind]
    path = write(tmp_path / "model.pt", payload)
    with pytest.raises(ModelFileError) as error:
        load_model(path)
    message = str(error.value)
    assert message.startswith(f"{path} is not a readable flexi-jest model file: ") and why in message
    assert "\n" not in message


def test_the_good_payload_still_loads(tmp_path):
    model, _ = load_model(write(tmp_path / "model.pt", GOOD))
    assert model.cfg == TEST_MODEL


@pytest.mark.parametrize("kind", ["a list", "no model_config"])
def test_the_cli_says_it_in_one_line(kind, tmp_path, capsys, shapes_data):
    path = write(tmp_path / "model.pt", PAYLOADS[kind][0])
    assert main(["evaluate", "--set", f"model={path}", "--set", f"eval_data=[{shapes_data.splits['eval'].path}]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"evaluate: {path} is not a readable flexi-jest model file")
