"""Fault: a split whose writing was interrupted: its shards (shard-NNNNNN.tar, as write_split names them)
are there but not its manifest, which write_split writes last.

Expected: every reader refuses it as incomplete, saying so and how to fix it; a plain directory of
external tars (other names) without a manifest is still read.
"""

import pytest
from faults import colour_samples

from conftest import TEST_MODEL
from flexi_jest.data.loader import StreamLoader
from flexi_jest.data.manifest import IncompleteSplitError
from flexi_jest.data.shards import iter_split, shard_names, write_split


def interrupted_split(path) -> str:
    write_split(colour_samples(25), str(path), samples_per_shard=10)
    (path / "manifest.json").unlink()  # as if killed after the shards, before the manifest
    return str(path)


@pytest.mark.parametrize("reader", [
    lambda split: shard_names(split),
    lambda split: list(iter_split(split)),
    lambda split: StreamLoader(split, 1),
])
def test_split_without_its_manifest_is_refused(tmp_path, reader):
    split = interrupted_split(tmp_path / "split")
    with pytest.raises(IncompleteSplitError, match="no manifest.json.*write was interrupted.*Re-run"):
        reader(split)


def test_evaluation_and_training_refuse_an_interrupted_split(tmp_path):
    from flexi_jest.config import TrainReferenceConfig
    from flexi_jest.evaluate import evaluate_model
    from flexi_jest.models import DualEncoder
    from flexi_jest.train import train_reference
    split = interrupted_split(tmp_path / "split")
    with pytest.raises(IncompleteSplitError):
        evaluate_model(DualEncoder(TEST_MODEL), [split], allow_partial=True)  # not even a partial score
    with pytest.raises(IncompleteSplitError):
        train_reference(TrainReferenceConfig(data=split, out_dir=str(tmp_path / "run"), model=TEST_MODEL, steps=1,
                                             batch_size=4, progress=False, processes=1, device="cpu"))


def test_external_tars_without_a_manifest_are_still_read(tmp_path):
    split = interrupted_split(tmp_path / "split")
    for i, shard in enumerate(sorted((tmp_path / "split").glob("shard-*.tar"))):
        shard.rename(tmp_path / "split" / f"laion-part-{i:05d}.tar")
    assert shard_names(split) == ["laion-part-00000.tar", "laion-part-00001.tar", "laion-part-00002.tar"]
    assert len(list(iter_split(split))) == 25
