"""Fault: data dropped or altered without a word: skipped samples, non-UTF-8 captions, duplicate keys,
unparsable metadata.

Expected: every result (training, caching, evaluation) carries its read stats (samples read, skipped
by reason, duplicate keys); a non-UTF-8 caption is skipped and counted (non_utf8_caption), not replaced
with U+FFFD; unparsable JSON metadata is skipped and counted (bad_meta); a key read again in the same
pass is kept and counted (duplicate_keys).
"""

import pytest
from faults import record, write_raw_split

from conftest import TEST_MODEL
from flexi_jest.config import CacheReferenceConfig, TrainReferenceConfig
from flexi_jest.data.loader import StreamLoader
from flexi_jest.reference_cache import cache_reference
from flexi_jest.tracking import numeric_metrics
from flexi_jest.train import train_reference
from readers import eval_read, stream_batch


def mixed_split(path, duplicates: bool = True) -> str:
    """12 samples over 2 shards: 1 non-UTF-8 caption, 1 bad JSON, 1 bad image, (2 keys repeated across shards)."""
    records = [record(f"k{i:02d}", caption=f"caption {i}".encode(), meta=b'{"i": 1}') for i in range(12)]
    records[1]["txt"] = "caf\u00e9 in latin-1".encode("latin-1")
    records[2]["json"] = b"{not json"
    records[3]["png"] = b"not an image"
    if duplicates:
        records[7]["__key__"], records[8]["__key__"] = "k00", "k04"  # in the second shard, again
    write_raw_split(str(path), records, per_shard=6)
    return str(path)


@pytest.mark.parametrize("reader", ["stream", "eval"])
def test_non_utf8_caption_bad_meta_and_duplicates_are_counted(tmp_path, reader):
    """By the training stream (its first epoch: one batch of the 9 usable samples; each 6-sample shard is decoded
    whole) and by the evaluation reader; the caching pass: test_training_and_caching_results_carry_read_stats."""
    if reader == "stream":
        samples, stats = stream_batch(mixed_split(tmp_path), 9, 16)
        captions = [s["caption"] for s in samples]
    else:
        samples, stats = eval_read(mixed_split(tmp_path), 16)
        captions = [caption for s in samples for caption in s.captions]
    assert stats.skipped == {"non_utf8_caption": 1, "bad_meta": 1, "bad_image": 1}
    assert stats.duplicate_keys == 2
    assert stats.samples == len(samples) == 9
    assert len(captions) == 9 and all("\ufffd" not in caption for caption in captions)
    assert "duplicate keys" in stats.summary() and "non_utf8_caption" in stats.summary()


def test_stream_counts_duplicates_once_per_epoch(tmp_path):
    stream = StreamLoader(mixed_split(tmp_path), 9, streams=1, mode="epoch", image_size=16)
    assert len(stream.next_batch() + stream.next_batch()) == 18  # two epochs of 9 usable samples
    assert stream.stats.duplicate_keys == 4 and stream.stats.samples == 18


def test_training_and_caching_results_carry_read_stats(tmp_path):
    split = mixed_split(tmp_path / "data", duplicates=False)  # a reference cache refuses duplicate keys
    trained = train_reference(TrainReferenceConfig(data=split, out_dir=str(tmp_path / "run"), model=TEST_MODEL,
                                                   steps=2, batch_size=4, progress=False, processes=1, device="cpu"))
    assert trained.read_stats.samples >= 8 and trained.read_stats.skipped["non_utf8_caption"] >= 1
    logged = numeric_metrics(trained.model_dump())  # tracking.log_result's metrics
    assert logged["read_stats.samples"] == trained.read_stats.samples
    assert logged["read_stats.skipped.bad_meta"] >= 1
    cached = cache_reference(CacheReferenceConfig(reference=trained.checkpoint, pool=split, device="cpu",
                                                  out_dir=str(tmp_path / "cache")))
    assert cached.read_stats.samples == cached.num_samples == 9
    assert cached.read_stats.skipped == {"non_utf8_caption": 1, "bad_meta": 1, "bad_image": 1}
    assert cached.read_stats.duplicate_keys == 0
