"""Fault: shard bytes that are random, truncated, bit-flipped, spliced or compressed garbage.

Expected (the reader's contract, shards.iter_shard / iter_split): no hang (each input within a deadline
and a SIGALRM watchdog), no exception at all from a shard's bytes (damage is counted in ReadStats), and
nothing counted as read that was not: stats.samples == the samples yielded, each a decoded uint8 image
[3, H, W] with a non-blank caption; an undamaged shard beside the damaged one is read whole.

Default: FUZZ_EXAMPLES (60) inputs per test, the same ones every run; a long run:
FLEXI_JEST_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest tests/reliability -k fuzz --hypothesis-show-statistics
"""

import gzip

import torch
from faults import fuzz_settings, no_hang, png_bytes, record, tar_bytes
from hypothesis import given
from hypothesis import strategies as st

from flexi_jest import storage
from flexi_jest.data.shards import ReadStats, decode_sample, iter_shard, iter_split

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


def check_samples(samples, stats: ReadStats) -> None:
    assert stats.samples == len(samples)
    for sample in samples:
        assert sample["image"].dtype == torch.uint8 and sample["image"].ndim == 3 and sample["image"].shape[0] == 3
        assert sample["caption"].strip()


@fuzz_settings()
@given(data=damaged_shards())
def test_fuzz_iter_shard_never_raises_and_counts_only_what_it_yields(tmp_path_factory, data):
    split = tmp_path_factory.mktemp("split")
    (split / "a.tar").write_bytes(data)
    stats = ReadStats()
    with no_hang():
        raws = list(iter_shard(str(split), "a.tar", stats, {"num_samples": 4, "sha256": storage.sha256_bytes(VALID)}))
        samples = [s for s in (decode_sample(raw, 8, stats) for raw in raws) if s is not None]
    check_samples(samples, stats)
    if data != VALID:
        assert not stats.complete  # the manifest's sha256 catches any change
    assert len(raws) <= 4 or stats.skipped  # more raw samples than written only with damage recorded


@fuzz_settings()
@given(data=damaged_shards(), first=st.booleans())
def test_fuzz_iter_split_reads_the_undamaged_shard_whole(tmp_path_factory, data, first):
    split = tmp_path_factory.mktemp("split")
    good = tar_bytes([record(f"good{i}", image=png_bytes(), caption=b"good caption") for i in range(3)])
    (split / ("a.tar" if first else "b.tar")).write_bytes(data)
    (split / ("b.tar" if first else "a.tar")).write_bytes(good)
    stats = ReadStats()
    with no_hang():
        samples = list(iter_split(str(split), 8, stats))
    check_samples(samples, stats)
    keys = [s["key"] for s in samples]
    assert {f"good{i}" for i in range(3)} <= set(keys)


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
    check_samples(samples, stream.stats)
