"""Fault: shard bytes that are random, truncated, bit-flipped, spliced or compressed garbage.

Expected (the reader's contract): no hang (each input within a deadline and a SIGALRM watchdog), no exception at all
from a shard's bytes (damage is counted in ReadStats), and nothing counted as read that was not: the samples counted
are the samples handed on, each a decoded uint8 image [3, H, W] with non-blank captions. The shared primitive
(shards.iter_tar, decode_sample, on a shard as specs.resolve gives it) catches any change with the manifest's sha256;
the readers production uses, the training stream (one epoch), the evaluation reader and the reference's caching
pass, read an undamaged shard beside the damaged one whole, and count the damage where a manifest says what the
shard held; the resampled training stream yields or fails with UnreadableSplitError.

Default: FUZZ_EXAMPLES (60) inputs per test, the same ones every run; a long run:
FLEXI_JEST_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest tests/reliability -k fuzz --hypothesis-show-statistics
"""

import json

import pytest
import torch
from faults import fuzz_settings, no_hang, png_bytes, record, tar_bytes
from fuzz_inputs import VALID, damaged_shards
from hypothesis import given
from hypothesis import strategies as st

from flexi_jest import storage
from flexi_jest.data.manifest import FORMAT
from flexi_jest.data.shards import ReadStats, decode_sample, iter_tar
from flexi_jest.data.specs import resolve
from flexi_jest.reference_cache import CacheError
from readers import cache_pass, cached_keys, eval_read, stream_epoch

GOOD = tar_bytes([record(f"good{i}", image=png_bytes(), caption=b"good caption") for i in range(3)])
GOOD_KEYS = [f"good{i}" for i in range(3)]


def check_image(image) -> None:
    assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3


def check_samples(samples, counted: int) -> None:
    """Samples as the training stream and the caching pass decode them; counted: the samples their stats count."""
    assert counted == len(samples)
    for sample in samples:
        check_image(sample["image"])
        assert sample["caption"].strip()


def write_manifest(split, shards: list[tuple[str, int, bytes]]) -> None:
    """A split manifest for (name, num_samples, the bytes written as that shard); its sha256s are of those bytes."""
    entries = [{"name": name, "num_samples": n, "sha256": storage.sha256_bytes(data)} for name, n, data in shards]
    (split / "manifest.json").write_text(json.dumps(
        {"format": FORMAT, "num_samples": sum(n for _, n, _ in shards), "shards": entries}))


@fuzz_settings()
@given(data=damaged_shards())
def test_fuzz_iter_tar_never_raises_and_counts_only_what_it_yields(tmp_path_factory, data):
    """The primitive every reader shares, on the shard as specs.resolve gives it (the manifest's count and sha256)."""
    split = tmp_path_factory.mktemp("split")
    (split / "a.tar").write_bytes(data)
    write_manifest(split, [("a.tar", 4, VALID)])
    (shard,) = resolve(str(split)).shards
    stats = ReadStats()
    with no_hang():
        raws = list(iter_tar(shard, stats))
        samples = [s for s in (decode_sample(raw, 8, stats) for raw in raws) if s is not None]
    check_samples(samples, stats.samples)
    if data != VALID:
        assert not stats.complete  # the manifest's sha256 catches any change
    assert len(raws) <= 4 or stats.skipped  # more raw samples than written only with damage recorded


def read_by(reader: str, split, good: str, tmp_path_factory) -> tuple[list[str], ReadStats]:
    """(keys read, read stats) of a split by the production reader named (good: the undamaged shard), with that
    reader's checks of what it hands on: its samples counted, decoded images, non-blank captions."""
    spec = str(split)
    if reader == "stream":  # the training stream, one epoch: every shard visited once
        samples, loader = stream_epoch(spec, 8)
        check_samples(samples, loader.stats.samples - 1)  # - 1: the next epoch's first sample (stream_epoch)
        return [s["key"] for s in samples], loader.stats
    if reader == "eval":
        samples, stats = eval_read(spec, 8)
        assert stats.samples == len(samples)
        for sample in samples:
            check_image(sample.image)
            assert all(caption.strip() for caption in sample.captions)
        return [s.key for s in samples], stats
    cache_dir = str(tmp_path_factory.mktemp("cache"))
    manifest = cache_pass(spec, cache_dir)  # the caching pass: embeds and stores every usable sample
    cached = cached_keys(cache_dir)
    assert manifest["read_stats"]["samples"] == manifest["num_samples"] == sum(len(k) for k in cached.values())
    assert cached[storage.join(spec, good)] == GOOD_KEYS  # the undamaged shard whole, in order
    stats = ReadStats(samples=manifest["num_samples"])
    stats.skipped.update(manifest["skipped"])
    return [key for keys in cached.values() for key in keys], stats


@pytest.mark.parametrize("reader", ["stream", "eval", "cache"])
@fuzz_settings()
@given(data=damaged_shards(), first=st.booleans(), manifest=st.booleans())
def test_fuzz_readers_read_the_undamaged_shard_whole(tmp_path_factory, reader, data, first, manifest):
    """A damaged shard beside an undamaged one, in a plain directory of tars or a split with a manifest (then the
    damage must be counted: the manifest's sha256 and count say what the shard held)."""
    split = tmp_path_factory.mktemp("split")
    damaged, good = ("a.tar", "b.tar") if first else ("b.tar", "a.tar")
    (split / damaged).write_bytes(data)
    (split / good).write_bytes(GOOD)
    if manifest:
        write_manifest(split, sorted([(damaged, 4, VALID), (good, 3, GOOD)]))
    with no_hang():
        try:
            keys, stats = read_by(reader, split, good, tmp_path_factory)
        except CacheError as exc:  # the damage made a key repeat: a cache is keyed by sample, so it refuses
            assert reader == "cache" and "is in shard" in str(exc), exc
            return
    assert set(GOOD_KEYS) <= set(keys)
    if manifest and data != VALID:
        assert not stats.complete


@fuzz_settings()
@given(data=damaged_shards())
def test_fuzz_stream_fails_or_yields_never_hangs(tmp_path_factory, data):
    """The training stream over one damaged shard: usable samples, or UnreadableSplitError, within the watchdog."""
    from flexi_jest.data.loader import StreamLoader
    from flexi_jest.data.shards import UnreadableSplitError
    split = tmp_path_factory.mktemp("split")
    (split / "a.tar").write_bytes(data)
    stream = StreamLoader(str(split), 6, streams=1, image_size=8, max_consecutive_bad=50)
    with no_hang():
        try:
            samples = stream.next_batch()  # more than one pass of a 4-sample shard
        except UnreadableSplitError:
            assert stream.stats.samples == 0 or stream.stats.skipped
            return
    check_samples(samples, stream.stats.samples)
