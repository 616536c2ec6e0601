"""The fuzz tests' inputs (hypothesis strategies): damaged shard bytes and damaged split manifests. Imports nothing of
flexi_jest beyond what faults.py does, so that count_contract_violations.py can draw them for an older checkout."""

import gzip
import json

from faults import draw_damaged_bytes, png_bytes, record, tar_bytes
from hypothesis import strategies as st

VALID = tar_bytes([record(f"k{i}", image=png_bytes((i, 2 * i, 3 * i), 8), caption=f"caption {i}".encode(),
                          meta=b'{"i": 1}') for i in range(4)])


@st.composite
def damaged_shards(draw) -> bytes:
    """A valid 4-sample shard damaged one or more ways, or bytes with no relation to a tar."""
    kind = draw(st.sampled_from(["random", "truncated", "bit_flips", "splice", "gzip", "mixed"]))
    if kind == "random":
        return draw(st.binary(max_size=8192))
    data = VALID
    if kind in ("truncated", "mixed"):
        data = data[: draw(st.integers(0, len(data)))]
    if kind in ("bit_flips", "mixed", "gzip"):
        mutated = bytearray(data)
        for position in draw(st.lists(st.integers(0, max(0, 8 * len(data) - 1)), max_size=24)):
            if mutated:
                mutated[position // 8] ^= 1 << (position % 8)
        data = bytes(mutated)
    if kind in ("splice", "mixed"):
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(max_size=600)) + data[at + draw(st.integers(0, 600)):]
    if kind == "gzip":  # the reader opens "r|*": compressed tars go through gzip/bz2/xz decoders
        data = gzip.compress(data)
        data = data[: draw(st.integers(0, len(data)))]
    return data


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)


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
