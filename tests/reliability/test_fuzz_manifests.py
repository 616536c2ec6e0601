"""Fault: a split manifest (manifest.json) that is random bytes, truncated, bit-flipped, not JSON, or JSON
of the wrong shape (fields missing, of the wrong type, negative counts, nested junk).

Expected (the contract of manifest.read_manifest and every reader built on it): a valid manifest is
returned, anything else is a ShardError (a ValueError) naming the manifest, and specs.resolve, which every reader
calls, refuses the split with it; reading the split through a damaged manifest by the readers production uses (the
training stream, one epoch; the evaluation reader; the reference's caching pass) raises only ShardError or
storage.StorageError (evaluation: its EvalSetError naming the set; caching: CacheError for a key read twice),
never hangs, and counts only the samples it yields. The reference-cache manifest parser: test_fuzz_cache_manifest.
"""

import pytest
from faults import colour_samples, fuzz_settings, no_hang
from fuzz_inputs import damaged_manifests
from hypothesis import given

from flexi_jest import storage
from flexi_jest.data.eval_sets import EvalSetError
from flexi_jest.data.manifest import ShardError, read_manifest
from flexi_jest.data.shards import write_split
from flexi_jest.data.specs import resolve
from flexi_jest.reference_cache import CacheError
from readers import cache_pass, cached_keys, eval_read, stream_epoch


def valid_manifest(tmp_path_factory) -> tuple[str, dict]:
    split = tmp_path_factory.mktemp("split")
    manifest = write_split(colour_samples(6), str(split), samples_per_shard=3, info={"dataset": "toy"})
    return str(split), manifest


@fuzz_settings()
@given(data=damaged_manifests())
def test_fuzz_read_manifest_returns_a_valid_manifest_or_a_shard_error(tmp_path_factory, data):
    split = tmp_path_factory.mktemp("split")
    (split / "manifest.json").write_bytes(data)
    with no_hang():
        try:
            manifest = read_manifest(str(split))
        except ShardError as exc:
            assert "manifest.json" in str(exc)
            with pytest.raises(ShardError, match="manifest.json"):  # the dataset spec every reader resolves
                resolve(str(split))
            return
        assert isinstance(manifest["shards"], list)
        for entry in manifest["shards"]:
            assert isinstance(entry["name"], str) and isinstance(entry["num_samples"], int)
        entries = {entry["name"]: entry for entry in manifest["shards"]}
        try:
            shards = resolve(str(split)).shards
        except ShardError as exc:  # no shards listed, or a name outside the split
            assert "manifest.json" in str(exc) and (not entries or "names" in str(exc))
            return
    assert [shard.url for shard in shards] == [storage.join(str(split), name) for name in entries]
    assert [shard.num_samples for shard in shards] == [entry["num_samples"] for entry in entries.values()]


def read_by(reader: str, split: str, tmp_path_factory) -> tuple[int, int, int]:
    """(samples read, samples counted as read, duplicate keys) of a split by the production reader named."""
    if reader == "stream":  # the training stream, one epoch
        samples, loader = stream_epoch(split, 8)
        return len(samples), loader.stats.samples - 1, loader.stats.duplicate_keys  # - 1: stream_epoch's next one
    if reader == "eval":
        samples, stats = eval_read(split, 8)
        return len(samples), stats.samples, stats.duplicate_keys
    cache_dir = str(tmp_path_factory.mktemp("cache"))
    manifest = cache_pass(split, cache_dir)
    cached = sum(len(keys) for keys in cached_keys(cache_dir).values())
    return cached, manifest["read_stats"]["samples"], manifest["read_stats"]["duplicate_keys"]


ALLOWED = {"stream": (ShardError, storage.StorageError), "eval": (ShardError, storage.StorageError, EvalSetError),
           "cache": (ShardError, storage.StorageError)}


@pytest.mark.parametrize("reader", ["stream", "eval", "cache"])
@fuzz_settings()
@given(data=damaged_manifests())
def test_fuzz_split_with_damaged_manifest_reads_or_fails_clearly(tmp_path_factory, reader, data):
    split, _ = valid_manifest(tmp_path_factory)
    storage.write_bytes(storage.join(split, "manifest.json"), data)
    read = counted = duplicates = 0
    with no_hang():
        try:
            read, counted, duplicates = read_by(reader, split, tmp_path_factory)
        except ALLOWED[reader]:
            pass
        except CacheError as exc:  # a cache is keyed by sample: a key read twice is refused
            assert reader == "cache" and "is in shard" in str(exc), exc
    assert counted == read <= 6 + duplicates
