"""Webdataset tar shards: writing splits, reading them robustly, and a resumable shuffled stream.

A split directory holds `shard-000000.tar`, ... (members `key.png|jpg`, `key.txt`, `key.json`) and
`manifest.json`, written last, with per-shard sample counts and sha256 checksums. A directory of
tars without a manifest (external webdataset data) is read too.

Reading never crashes on bad data and never drops it silently: a corrupt or truncated shard, an
image that fails to decode, an empty caption are skipped and counted in ReadStats, and a shard that
yields fewer samples than its manifest says is reported.
"""

import io
import json
import random
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from webdataset import TarWriter
from webdataset.tariterators import group_by_keys, tar_file_iterator

from flexi_jest import storage
from flexi_jest.data.sample import Sample

MANIFEST = "manifest.json"
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


# ---- writing --------------------------------------------------------------------------------------


def _encode_image(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG" if image_format == "png" else "JPEG", quality=95)
    return buffer.getvalue()


def write_split(
    samples: Iterable[Sample],
    split_dir: str,
    samples_per_shard: int = 1000,
    image_format: str = "png",
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write samples as tar shards under split_dir, then the manifest. Returns the manifest.

    info: extra JSON-serialisable fields for the manifest (dataset, split, licence, classes, ...).
    """
    storage.makedirs(split_dir)
    shards: list[dict[str, Any]] = []
    noise_counts: Counter[str] = Counter()
    writer, buffer, count = None, None, 0

    def close_shard() -> None:
        nonlocal writer, buffer
        if writer is None:
            return
        writer.close()
        name = f"shard-{len(shards):06d}.tar"
        data = buffer.getvalue()
        storage.write_bytes(storage.join(split_dir, name), data)
        shards.append({"name": name, "num_samples": count, "sha256": storage.sha256_bytes(data), "bytes": len(data)})
        writer = buffer = None

    for sample in samples:
        if writer is None:
            buffer, count = io.BytesIO(), 0
            writer = TarWriter(buffer)
        meta = dict(sample.meta)
        writer.write({
            "__key__": sample.key,
            image_format: _encode_image(sample.image, image_format),
            "txt": sample.caption.encode("utf-8"),
            "json": json.dumps(meta).encode("utf-8"),
        })
        noise_counts[meta.get("noise", "clean")] += 1
        count += 1
        if count == samples_per_shard:
            close_shard()
    close_shard()
    manifest = {
        "format": "flexi-jest-shards/1",
        "num_samples": sum(s["num_samples"] for s in shards),
        "shards": shards,
        "noise_counts": dict(noise_counts),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(info or {}),
    }
    storage.write_bytes(storage.join(split_dir, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


# ---- reading ----------------------------------------------------------------------------------------


def read_manifest(split_dir: str) -> dict[str, Any] | None:
    """The split's manifest, or None for a plain directory of tars."""
    uri = storage.join(split_dir, MANIFEST)
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_bytes(uri))
    except json.JSONDecodeError as exc:
        raise ValueError(f"corrupt manifest {uri}: {exc}") from exc


def shard_names(split_dir: str) -> list[str]:
    """Shard file names of a split, from its manifest or, without one, every *.tar in the directory."""
    manifest = read_manifest(split_dir)
    names = [s["name"] for s in manifest["shards"]] if manifest else storage.list_names(split_dir, ".tar")
    if not names:
        raise ValueError(f"no shards in {split_dir}")
    return names


@dataclass
class ReadStats:
    """What reading skipped, by reason; `errors` keeps the first messages for the report."""

    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    def record(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        if len(self.errors) < 20:
            self.errors.append(f"{reason}: {message}")

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.samples} samples read, none skipped"
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return f"{self.samples} samples read; skipped: {parts}"


def shard_entries(split_dir: str) -> dict[str, dict[str, Any]]:
    """The manifest's record of each shard (num_samples, sha256), by name; empty without a manifest."""
    manifest = read_manifest(split_dir)
    return {s["name"]: s for s in manifest["shards"]} if manifest else {}


def iter_shard(split_dir: str, name: str, stats: ReadStats, expected: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples (dicts of member bytes, with __key__) of one shard, robust to corruption.

    The shard is fetched whole (local file or S3 object) and checked against the manifest's sha256.
    A truncated or corrupt tar yields what it holds up to the damage; the damage is recorded, and so
    is a checksum mismatch or a shard yielding fewer samples than the manifest says.
    """
    uri = storage.join(split_dir, name)
    yielded = 0

    def on_member_error(exc: Exception) -> bool:
        stats.record("corrupt_member", f"{uri}: {exc}")
        return True

    def members() -> Iterator[dict[str, Any]]:
        try:
            data = storage.read_bytes(uri)
        except storage.StorageError as exc:
            stats.record("missing_shard", str(exc))
            return
        if expected and "sha256" in expected and storage.sha256_bytes(data) != expected["sha256"]:
            stats.record("checksum_mismatch", f"{uri}: contents differ from the manifest's sha256")
        try:
            for member in tar_file_iterator(io.BytesIO(data), handler=on_member_error):
                member["__url__"] = uri
                yield member
        except (tarfile.TarError, OSError, EOFError) as exc:
            stats.record("corrupt_shard", f"{uri}: {exc}")

    for raw in group_by_keys(members(), handler=on_member_error):
        raw["__shard__"] = name
        yielded += 1
        yield raw
    if expected and yielded < expected["num_samples"]:
        stats.record("short_shard", f"{uri}: {yielded} of {expected['num_samples']} samples readable")


def decode_sample(raw: dict[str, Any], image_size: int | None, stats: ReadStats) -> dict[str, Any] | None:
    """Raw member bytes -> {key, image: uint8 [3, H, W], caption, meta, shard}, or None (counted) if unusable."""
    key = raw["__key__"]
    image_bytes = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if image_bytes is None:
        stats.record("missing_image", key)
        return None
    caption = raw.get("txt", b"").decode("utf-8", errors="replace").strip()
    if not caption:
        stats.record("empty_caption", key)
        return None
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            image = image.convert("RGB")
            if image_size is not None and image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.BICUBIC)
            pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    except Exception as exc:  # PIL raises many types for bad data
        stats.record("bad_image", f"{key}: {exc}")
        return None
    try:
        meta = json.loads(raw["json"]) if "json" in raw else {}
    except json.JSONDecodeError:
        meta = {}
    stats.samples += 1
    decoded = {"key": key, "image": pixels, "caption": caption, "meta": meta, "shard": raw["__shard__"]}
    for extra in ("ref_image_emb", "ref_text_emb"):
        if extra in raw:
            decoded[extra] = raw[extra]
    return decoded


def iter_split(split_dir: str, image_size: int | None = None, stats: ReadStats | None = None) -> Iterator[dict[str, Any]]:
    """Every usable sample of a split once, in shard order (for caching and evaluation)."""
    stats = stats if stats is not None else ReadStats()
    entries = shard_entries(split_dir)
    for name in shard_names(split_dir):
        for raw in iter_shard(split_dir, name, stats, entries.get(name)):
            sample = decode_sample(raw, image_size, stats)
            if sample is not None:
                yield sample


# ---- the training stream --------------------------------------------------------------------------------


class SampleStream:
    """An endless, shuffled, resumable stream of decoded samples over a split.

    Each epoch visits the shards in an order drawn from (seed, epoch) and mixes samples through a
    shuffle buffer drawn from the same RNG, so the stream is a pure function of (seed, epoch,
    position). `state_dict()` records (epoch, position); loading it re-reads the epoch's raw members
    and skips `position` of them without decoding, which reproduces the stream exactly.

    attach: optional callable(shard_name, raw_samples_of_shard) -> raw_samples, used to join the
    reference cache onto samples by key as each shard is read.
    """

    def __init__(self, split_dir: str, image_size: int | None, seed: int = 0, shuffle_buffer: int = 2000, attach=None):
        self.split_dir = split_dir
        self.image_size = image_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.attach = attach
        self.names = shard_names(split_dir)
        self.entries = shard_entries(split_dir)
        self.stats = ReadStats()
        self.epoch = 0
        self.position = 0  # raw samples emitted in this epoch
        self._iterator: Iterator[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._iterator = None

    def _epoch_raw(self, epoch: int) -> Iterator[dict[str, Any]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        names = list(self.names)
        rng.shuffle(names)
        buffer: list[dict[str, Any]] = []
        for name in names:
            raws: Iterable[dict[str, Any]] = iter_shard(self.split_dir, name, self.stats, self.entries.get(name))
            if self.attach is not None:
                raws = self.attach(name, raws)
            for raw in raws:
                buffer.append(raw)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
        while buffer:
            yield buffer.pop(rng.randrange(len(buffer)))

    def _raw(self) -> Iterator[dict[str, Any]]:
        while True:
            skip, emitted = self.position, 0
            for raw in self._epoch_raw(self.epoch):
                emitted += 1
                if skip:
                    skip -= 1
                    continue
                self.position += 1
                yield raw
            if emitted == 0:
                raise RuntimeError(f"no readable samples in {self.split_dir}: {self.stats.summary()}")
            self.epoch, self.position = self.epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iterator is None:
            self._iterator = self._raw()
        while True:
            sample = decode_sample(next(self._iterator), self.image_size, self.stats)
            if sample is not None:
                return sample

    def take(self, n: int) -> list[dict[str, Any]]:
        return [next(self) for _ in range(n)]
