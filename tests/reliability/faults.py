"""Fault injection helpers: small real splits whose bytes are damaged the way a disk, a network or a
hostile writer damages them. Every helper writes real tar shards (and a real manifest where asked)."""

import io
import json
import os
import random
import signal
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from PIL import Image
from webdataset import TarWriter

from flexi_jest import storage
from flexi_jest.data.sample import Sample


def colour_samples(n: int, prefix: str = "s"):
    """n distinct solid-colour 16 px samples with distinct captions."""
    for i in range(n):
        image = Image.new("RGB", (16, 16), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256))
        yield Sample(key=f"{prefix}-{i:05d}", image=image, caption=f"colour number {i}", meta={"index": i})


def png_bytes(colour=(10, 20, 30), size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def record(key: str, image: bytes | None = None, caption: bytes = b"a caption", meta: bytes | None = None) -> dict:
    """One raw webdataset sample: {__key__, png, txt[, json]}."""
    out = {"__key__": key, "png": png_bytes() if image is None else image, "txt": caption}
    if meta is not None:
        out["json"] = meta
    return out


def tar_bytes(records: list[dict]) -> bytes:
    buffer = io.BytesIO()
    with TarWriter(buffer) as writer:
        for item in records:
            writer.write(item)
    return buffer.getvalue()


def write_raw_split(split_dir: str, records: list[dict], per_shard: int = 10, manifest: bool = True) -> dict:
    """Write raw records as shard-NNNNNN.tar shards (as write_split names them) and, if asked, their manifest."""
    storage.makedirs(split_dir)
    shards = []
    for start in range(0, len(records), per_shard):
        data = tar_bytes(records[start:start + per_shard])
        name = f"shard-{len(shards):06d}.tar"
        storage.write_bytes(storage.join(split_dir, name), data)
        shards.append({"name": name, "num_samples": len(records[start:start + per_shard]),
                       "sha256": storage.sha256_bytes(data), "bytes": len(data)})
    document = {"format": "flexi-jest-shards/1", "num_samples": len(records), "shards": shards, "dataset": "toy"}
    if manifest:
        storage.write_bytes(storage.join(split_dir, "manifest.json"), json.dumps(document).encode())
    return document


def truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def random_bytes(path: Path, n: int = 4096, seed: int = 0) -> None:
    path.write_bytes(random.Random(seed).randbytes(n))


def flip_bits(data: bytes, positions: list[int]) -> bytes:
    mutated = bytearray(data)
    for position in positions:
        mutated[position % len(mutated)] ^= 1 << (position % 8)
    return bytes(mutated)


# ---- fuzzing --------------------------------------------------------------------------------------------


def draw_damaged_bytes(draw, data: bytes) -> bytes:
    """A hypothesis draw of data cut at a random length with up to 8 bits flipped (a torn or corrupted file)."""
    from hypothesis import strategies as st
    mutated = bytearray(data[: draw(st.integers(0, len(data)))])
    for position in draw(st.lists(st.integers(0, max(0, 8 * len(mutated) - 1)), max_size=8)):
        if mutated:
            mutated[position // 8] ^= 1 << (position % 8)
    return bytes(mutated)

# Inputs per fuzz test: a short run in the default suite; FLEXI_JEST_FUZZ_EXAMPLES=2000 for the long run.
FUZZ_EXAMPLES = int(os.environ.get("FLEXI_JEST_FUZZ_EXAMPLES", "60"))
HANG_SECONDS = 30  # one input taking this long is a hang (an input takes milliseconds)


def fuzz_settings(**overrides):
    """Hypothesis settings of the fuzz tests: FUZZ_EXAMPLES inputs, a per-input deadline, derandomized in the
    default suite (the same inputs every run) and random in a long run (new inputs each time)."""
    from hypothesis import HealthCheck, settings
    values = dict(max_examples=FUZZ_EXAMPLES, deadline=timedelta(seconds=10), derandomize=FUZZ_EXAMPLES <= 100,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                         HealthCheck.data_too_large])
    values.update(overrides)
    return settings(**values)


@contextmanager
def no_hang(seconds: int = HANG_SECONDS):
    """Fail (TimeoutError) instead of hanging when the body runs longer than `seconds` (SIGALRM, main thread)."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
