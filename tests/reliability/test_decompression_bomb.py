"""Fault: a decompression bomb. A small gzip-compressed shard holds a huge member (NUL bytes compress a thousand to
one); tars are opened with `r|*`, which silently un-gzips. Before, every member was read whole into memory (a
1.46 MB shard with a 1.5 GB member raised peak memory to 3.9 GB) and the run of NUL bytes was accepted as a caption.

Expected, in the readers production uses (the training stream, the evaluation reader and, for a member over its cap,
the reference's caching pass): a member over its kind's cap (shards.MEMBER_CAPS) is skipped unread, its sample
counted as oversized_member; a caption holding NUL bytes is bad_caption; a shard expanding past MAX_EXPANSION times
its size is cut (oversized_shard); the good samples around them are read; peak memory stays far below the member's
size.
"""

import tarfile
import tracemalloc
import zlib

import pytest
from faults import png_bytes

from flexi_jest.data import shards
from flexi_jest.data.shards import ReadStats
from readers import cache_pass, cached_keys, eval_read, stream_batch


def gzip_tar(path, members: list[tuple[str, bytes | int]]) -> None:
    """A gzip-compressed tar of (name, bytes) members, or (name, size) for `size` NUL bytes, compressed as they are
    written (a huge member is never held in memory), in tar's own format (tarfile's headers and padding)."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: the gzip container
    chunk = bytes(1 << 20)
    with open(path, "wb") as out:
        def write(data: bytes) -> None:
            out.write(compressor.compress(data))

        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = content if isinstance(content, int) else len(content)
            write(info.tobuf())
            if isinstance(content, int):
                for start in range(0, content, len(chunk)):
                    write(chunk[: min(len(chunk), content - start)])
            else:
                write(content)
            write(bytes(-info.size % tarfile.BLOCKSIZE))
        write(bytes(2 * tarfile.BLOCKSIZE))  # the end-of-archive blocks
        out.write(compressor.flush())


OVER_CAP = {"bomb.png": (64 << 20) + 1, "bomb.txt": (1 << 20) + 1, "bomb.json": (1 << 20) + 1, "bomb.cls": 1025}


def bomb_shard(path, member: str = "bomb.txt", size: int | None = None) -> None:
    """A .tar.gz (named .tar: `r|*` un-gzips whatever it is given) of a good sample, a sample whose `member` is
    `size` NUL bytes (default: one byte over its cap) beside a good image (or caption), a sample whose caption is
    a short NUL run, and another good sample."""
    size = OVER_CAP[member] if size is None else size
    partner = ("bomb.txt", b"an image bomb") if member == "bomb.png" else ("bomb.png", png_bytes())
    gzip_tar(path, [("good1.png", png_bytes()), ("good1.txt", b"a red square"), partner, (member, size),
                    ("nul.png", png_bytes()), ("nul.txt", bytes(4096)),
                    ("good2.png", png_bytes((200, 10, 10))), ("good2.txt", b"another square")])


def read_by(reader: str, spec: str, usable: int, tmp_path) -> tuple[list[str], ReadStats]:
    """(keys read, read stats) of a spec by the production reader named; usable: the samples it holds that are.

    stream: the training stream's first batch of `usable` samples, within the first epoch (readers.stream_batch: each
    of these shards, of a few samples, is decoded whole), keys sorted (a visit's order is shuffled); eval: every
    sample evaluation reads, in order; cache: the caching pass, the keys its cache holds and its read stats."""
    if reader == "stream":
        batch, stats = stream_batch(spec, usable)
        return sorted(sample["key"] for sample in batch), stats
    if reader == "eval":
        samples, stats = eval_read(spec)
        return [sample.key for sample in samples], stats
    cache_dir = str(tmp_path / "cache")
    summary = cache_pass(spec, cache_dir)["read_stats"]
    stats = ReadStats(samples=summary["samples"], errors=summary["errors"])
    stats.skipped.update(summary["skipped"])
    return [key for keys in cached_keys(cache_dir).values() for key in keys], stats


@pytest.mark.parametrize("reader", ["stream", "eval", "cache"])
@pytest.mark.parametrize("member", ["bomb.txt", "bomb.json", "bomb.png", "bomb.cls"])
def test_an_oversized_member_is_skipped_unread_and_counted(tmp_path, member, reader):
    bomb_shard(tmp_path / "00000.tar", member)
    size = OVER_CAP[member]
    keys, stats = read_by(reader, str(tmp_path / "00000.tar"), 2, tmp_path)
    assert keys == ["good1", "good2"], stats.summary()
    assert shards.MEMBER_CAPS[member.rsplit(".", 1)[1]] == size - 1
    assert stats.skipped["oversized_member"] == 1 and stats.skipped["bad_caption"] == 1, stats.summary()
    assert any(
        f"{member}: {size} bytes, over the {size - 1} bytes read" in error for error in stats.errors), stats.errors
    assert "oversized_member" in shards.SAMPLE_REASONS and stats.lost_samples() == 2


@pytest.mark.parametrize("reader", ["stream", "eval", "cache"])
def test_a_shard_expanding_past_its_limit_is_cut(tmp_path, monkeypatch, reader):
    """Many members, each under its cap, that together un-gzip to far more than the shard's bytes."""
    path = tmp_path / "00000.tar"
    padding = [(f"k{i:03d}.{ext}",
                1 << 20 if ext == "png" else b"padding") for i in range(40) for ext in ("png", "txt")]
    gzip_tar(path, [("good.png", png_bytes()), ("good.txt", b"a square"), *padding])
    monkeypatch.setattr(shards, "MIN_EXPANDED_BYTES", 8 << 20, raising=False)
    keys, stats = read_by(reader, str(path), 1, tmp_path)
    assert keys == ["good"]
    assert stats.skipped["oversized_shard"] == 1 and "the rest of the shard is not read" in " ".join(stats.errors)


@pytest.mark.parametrize("reader", ["stream", "eval"])
def test_reading_a_bomb_keeps_memory_low(tmp_path, reader):
    """Peak Python memory (tracemalloc: every bytes object the reader makes) while reading a shard of about 2 MB
    holding a 512 MiB member: far below the member's size. The shard expands past MAX_EXPANSION times its bytes at
    that member's header, so it is cut there, unread: the sample is left without its caption, which the training
    stream skips (empty_caption) and evaluation keeps, captionless, as it keeps any image of a set of plain tars
    (a classification sample; evaluation then refuses the set for its oversized_shard unless allow_partial)."""
    bomb_shard(tmp_path / "00000.tar", "bomb.txt", size=512 << 20)
    tracemalloc.start()
    try:
        keys, stats = read_by(reader, str(tmp_path / "00000.tar"), 1, tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    expected = ({"oversized_shard": 1, "empty_caption": 1}, ["good1"]) if reader == "stream" else (
        {"oversized_shard": 1}, ["good1", "bomb"])
    assert (dict(stats.skipped), keys) == expected, stats.summary()
    assert peak < 64 << 20, f"peak {peak / 2**20:.0f} MiB"  # the member alone is 512 MiB
