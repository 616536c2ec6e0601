"""Fault: a split whose writing was interrupted: its shards (shard-NNNNNN.tar, as write_split names them)
are there but not its manifest, which write_split writes last.

Expected: every reader refuses it as incomplete, saying so and how to fix it: specs.resolve, which each of them
calls, and the entry points production reads through (the training stream, the evaluation reader, the reference's
caching pass, registration); a plain directory of external tars (other names) without a manifest is still read.
"""

import pytest
from faults import colour_samples

from conftest import TEST_MODEL
from flexi_jest.config import EvalSet, MakeDataConfig
from flexi_jest.data.eval_sets import open_eval_set
from flexi_jest.data.loader import StreamLoader
from flexi_jest.data.manifest import IncompleteSplitError
from flexi_jest.data.register import register_data
from flexi_jest.data.shards import write_split
from flexi_jest.data.specs import resolve
from readers import cache_pass, eval_read, stream_batch


def interrupted_split(path) -> str:
    write_split(colour_samples(25), str(path), samples_per_shard=10)
    (path / "manifest.json").unlink()  # as if killed after the shards, before the manifest
    return str(path)


READERS = {
    "resolve": lambda split: resolve(split),
    "stream": lambda split: StreamLoader(split, 1),
    "eval": lambda split: open_eval_set(EvalSet(uri=split)),
    "cache": lambda split: cache_pass(split, split + "-cache"),
    "register": lambda split: register_data(MakeDataConfig(source="register", out_dir=split + "-registered",
                                                           curated=split, pool=split, eval=split)),
}


@pytest.mark.parametrize("reader", list(READERS))
def test_split_without_its_manifest_is_refused(tmp_path, reader):
    split = interrupted_split(tmp_path / "split")
    with pytest.raises(IncompleteSplitError, match="no manifest.json.*write was interrupted.*Re-run"):
        READERS[reader](split)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split"]  # nothing written beside it


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
    assert [shard.name for shard in resolve(split).shards] == [
        "laion-part-00000.tar", "laion-part-00001.tar", "laion-part-00002.tar"]
    keys = [f"s-{i:05d}" for i in range(25)]
    samples, stats = eval_read(split)
    assert [sample.key for sample in samples] == keys and stats.complete
    batch, stats = stream_batch(split, 25)  # the training stream's first epoch, in one batch
    assert sorted(sample["key"] for sample in batch) == keys and stats.complete
