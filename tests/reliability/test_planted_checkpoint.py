"""Fault: someone who can write to a run's out_dir (or its S3 prefix) plants a checkpoint, or a latest.json
naming a file outside checkpoints/. Resuming must refuse both and run nothing; real checkpoints still resume."""

import io
import json
import random

import numpy as np
import pytest
import torch

from conftest import TEST_MODEL
from flexi_jest import storage
from flexi_jest.checkpoint import load_latest_checkpoint, restore_rng_states, rng_states
from flexi_jest.config import TrainReferenceConfig
from flexi_jest.train import train_reference


class CreatesAFile:
    """A pickle payload: unpickling it calls open(path, "w"), creating the file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def plant(out_dir, payload, name: str = "step-00000002.pt") -> None:
    checkpoints = out_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    (checkpoints / name).write_bytes(buffer.getvalue())
    (checkpoints / "latest.json").write_text(json.dumps({"step": 2, "file": name}))


def reference_config(shapes_data, out_dir, **overrides) -> TrainReferenceConfig:
    values = dict(data=shapes_data.splits["curated"].path, out_dir=str(out_dir), model=TEST_MODEL, steps=2,
                  batch_size=16, progress=False, checkpoint_every=1)
    return TrainReferenceConfig(**{**values, **overrides})


def test_the_planted_payload_is_live(tmp_path):
    """The payload really creates its file when unpickled without weights_only: the tests below can fail."""
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"model": CreatesAFile(str(marker))}, buffer)
    torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)  # deliberately unsafe, on our own payload
    assert marker.exists()


def test_planted_pickle_is_refused_and_creates_nothing(tmp_path):
    marker = tmp_path / "pwned"
    plant(tmp_path / "run", {"model": CreatesAFile(str(marker)), "step": 2})
    with pytest.raises(ValueError, match="not a weights-only flexi-jest checkpoint") as error:
        load_latest_checkpoint(str(tmp_path / "run"))
    assert "step-00000002.pt" in str(error.value)
    assert not marker.exists()


def test_training_does_not_resume_from_a_planted_pickle(shapes_data, tmp_path):
    marker = tmp_path / "pwned"
    plant(tmp_path / "run", {"model": CreatesAFile(str(marker)), "step": 2})
    with pytest.raises(ValueError, match="weights-only"):
        train_reference(reference_config(shapes_data, tmp_path / "run"))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../../x/payload.bin", "../step-00000002.pt", "/tmp/x/payload.bin",
                                  "s3://elsewhere/payload.bin", "file:///tmp/x/payload.bin", "sub/../../payload.bin",
                                  "..", "", "C:\\x\\payload.bin"])
def test_latest_naming_a_file_outside_checkpoints_is_refused(tmp_path, name):
    """The named file exists and is a harmless weights-only checkpoint: only the confinement refuses it."""
    run = tmp_path / "a" / "b" / "run"
    outside = tmp_path / "a" / "x"
    outside.mkdir(parents=True)
    buffer = io.BytesIO()
    torch.save({"step": 2}, buffer)
    (outside / "payload.bin").write_bytes(buffer.getvalue())
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "file": name}))
    with pytest.raises(storage.UnsafeNameError) as error:
        load_latest_checkpoint(str(run))
    assert "latest.json" in str(error.value) and repr(name) in str(error.value)


def test_traversal_on_s3_is_refused_before_any_request():
    """An S3 key escaping the run's prefix is refused by its name alone (no endpoint is configured here)."""
    with pytest.raises(storage.UnsafeNameError, match="payload.bin"):
        storage.confined("s3://bucket/runs/a/checkpoints", "../../b/payload.bin", "s3://bucket/runs/a/checkpoints/latest.json")
    assert storage.confined("s3://bucket/runs/a/checkpoints", "step-00000002.pt", "latest.json") == \
        "s3://bucket/runs/a/checkpoints/step-00000002.pt"


def test_a_corrupt_latest_json_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest.json").write_text('{"step": 2, "fi')
    with pytest.raises(ValueError, match="latest.json is not a checkpoint pointer"):
        load_latest_checkpoint(str(tmp_path))


def test_real_checkpoints_load_weights_only_with_every_rng_state(shapes_data, tmp_path):
    train_reference(reference_config(shapes_data, tmp_path))
    checkpoint = load_latest_checkpoint(str(tmp_path))  # weights_only=True inside
    assert checkpoint["step"] == 2 and set(checkpoint["rng"]) >= {"generator", "torch", "cuda", "python", "numpy"}
    assert checkpoint["data"] and isinstance(checkpoint["rng"]["numpy"]["keys"], torch.Tensor)  # the stream position


def test_rng_states_round_trip_through_a_weights_only_file():
    generator = torch.Generator().manual_seed(3)
    random.seed(1), np.random.seed(2), torch.manual_seed(4)
    buffer = io.BytesIO()
    torch.save(rng_states(generator), buffer)
    expected = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=generator))
    restore_rng_states(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True), generator)
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2]) and torch.equal(torch.rand(1, generator=generator), expected[3])
