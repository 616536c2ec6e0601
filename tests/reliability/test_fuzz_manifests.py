"""Fault: a split manifest (manifest.json) that is random bytes, truncated, bit-flipped, not JSON, or JSON
of the wrong shape (fields missing, of the wrong type, negative counts, nested junk).

Expected (the contract of shards.read_manifest and every reader built on it): a valid manifest is
returned, anything else is a ShardError (a ValueError) naming the manifest; reading a split through a
damaged manifest raises only ShardError or storage.StorageError, never hangs, and counts only the
samples it yields. The reference-cache manifest parser: see test_fuzz_cache_manifest below.
"""

import json

from faults import colour_samples, draw_damaged_bytes, fuzz_settings, no_hang
from hypothesis import given
from hypothesis import strategies as st

from flexi_jest import storage
from flexi_jest.data.shards import ReadStats, ShardError, iter_split, read_manifest, write_split

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)


def valid_manifest(tmp_path_factory) -> tuple[str, dict]:
    split = tmp_path_factory.mktemp("split")
    manifest = write_split(colour_samples(6), str(split), samples_per_shard=3, info={"dataset": "toy"})
    return str(split), manifest


@st.composite
def damaged_manifests(draw) -> bytes:
    """Bytes of a manifest.json: a valid one mutated in its structure or its bytes, or unrelated bytes/JSON."""
    base = {"format": "flexi-jest-shards/1", "num_samples": 6, "shards": [
        {"name": "shard-000000.tar", "num_samples": 3, "sha256": "0" * 64},
        {"name": "shard-000001.tar", "num_samples": 3, "sha256": "0" * 64}]}
    kind = draw(st.sampled_from(["random", "json", "field", "shard_field", "bytes"]))
    if kind == "random":
        return draw(st.binary(max_size=2048))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "field":
        base[draw(st.sampled_from(["shards", "num_samples", "format"]))] = draw(json_values)
    if kind == "shard_field":
        entry = base["shards"][draw(st.integers(0, 1))]
        field = draw(st.sampled_from(["name", "num_samples", "sha256"]))
        if draw(st.booleans()):
            entry[field] = draw(json_values)
        else:
            del entry[field]
    data = json.dumps(base).encode()
    if kind == "bytes":
        data = draw_damaged_bytes(draw, data)
    return data


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
            return
    assert isinstance(manifest["shards"], list)
    for entry in manifest["shards"]:
        assert isinstance(entry["name"], str) and isinstance(entry["num_samples"], int)


@fuzz_settings()
@given(data=damaged_manifests())
def test_fuzz_split_with_damaged_manifest_reads_or_fails_clearly(tmp_path_factory, data):
    split, _ = valid_manifest(tmp_path_factory)
    storage.write_bytes(storage.join(split, "manifest.json"), data)
    stats = ReadStats()
    samples = []
    with no_hang():
        try:
            samples = list(iter_split(split, 8, stats))
        except (ShardError, storage.StorageError):
            pass
    assert stats.samples == len(samples) <= 6 + stats.duplicate_keys
