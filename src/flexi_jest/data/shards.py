"""Webdataset tar shards: writing splits, and the primitives that read a shard robustly (iter_tar, decode_sample),
which every reader shares: the training stream (loader.py), evaluation (eval_sets.py), the reference's caching pass
(reference_cache.py) and registration (register.py). Which shards a dataset is: specs.py (resolve).

A split directory holds `shard-000000.tar`, ... (members `key.png|jpg`, `key.txt`, `key.json`) and
`manifest.json`, written last, with per-shard sample counts and sha256 checksums. A directory of
external tars without a manifest is read too; shards named `shard-NNNNNN.tar` without a manifest are
an interrupted write, refused by specs.resolve (IncompleteSplitError). The manifest and its checks: manifest.py.

Reading never crashes on bad bytes and never drops data silently: a missing, corrupt or truncated
shard, an image that fails to decode, a blank or non-UTF-8 caption (or one holding NUL bytes), unparsable
JSON metadata are skipped and counted by reason in ReadStats, a shard yielding fewer samples than its manifest says is
reported, and duplicate keys are counted. Every stage's result carries these counts (ReadStatsSummary);
evaluation refuses a split with any of them unless allowed; a stream with no usable sample fails.

Decompression bombs: a member larger than its kind's cap (MEMBER_CAPS: image, caption, JSON, class label) is
never read into memory (the tar stream skips over it) and its sample is skipped as oversized_member; a compressed
shard (tarfile's `r|*` un-gzips) whose members add up to more than MAX_EXPANSION times its own bytes is cut there,
counted as oversized_shard.
"""

import io
import json
import re
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterable, Iterator

from PIL import Image
from webdataset import TarWriter
from webdataset.tariterators import base_plus_ext, group_by_keys

from flexi_jest import storage
from flexi_jest.config import ReadStatsSummary
from flexi_jest.data.manifest import FORMAT, MANIFEST, ShardError
from flexi_jest.data.sample import Sample
from flexi_jest.data.specs import Shard, open_shard
from flexi_jest.data.transforms import ImageTransform, decode_image

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
MiB = 1 << 20
# the largest member read, by its extension (the last one: key.cls, key.json, ...); anything else: "other".
# A 100 Mpx PNG is about 40 MiB; a caption, a sample's JSON and a class index are far smaller than their caps.
MEMBER_CAPS = {**{ext: 64 * MiB for ext in IMAGE_EXTENSIONS}, "txt": 1 * MiB, "json": 1 * MiB, "cls": 1024,
               "other": 64 * MiB}
MAX_EXPANSION = 64  # a compressed shard may un-gzip to this many times its bytes (at least MIN_EXPANDED_BYTES)
MIN_EXPANDED_BYTES = 256 * MiB


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
        "format": FORMAT,
        "num_samples": sum(s["num_samples"] for s in shards),
        "shards": shards,
        "noise_counts": dict(noise_counts),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(info or {}),
    }
    storage.write_bytes(storage.join(split_dir, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


# ---- reading ----------------------------------------------------------------------------------------

class UnreadableSplitError(ShardError):
    """Reading a split yields no usable sample (every image bad, every caption blank, ...)."""


class PartialReadError(ShardError):
    """Some samples or shards of a split that must be read whole (evaluation) could not be read."""


# reasons that mean samples were lost (see config.ReadStatsSummary); the rest damage a whole shard
SAMPLE_REASONS = ("missing_image", "empty_caption", "non_utf8_caption", "bad_caption", "bad_image", "bad_meta",
                  "corrupt_member", "oversized_member",
                  "bad_label")  # bad_label: an eval sample's .cls that is not a class index (eval_sets.py)


@dataclass
class ReadStats:
    """What reading used and what it skipped, by reason; `errors` keeps the first messages for the report.

    samples counts samples decoded and handed on, nothing else. Keys are remembered to count duplicates
    (a key read again in the same pass: kept, counted); `new_pass()` forgets them (the stream's next epoch).
    """

    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    duplicate_keys: int = 0
    errors: list[str] = field(default_factory=list)
    seen_keys: set[str] = field(default_factory=set, repr=False)

    def record(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        if len(self.errors) < 20:
            self.errors.append(f"{reason}: {message}")

    def note_key(self, key: str, where: str) -> None:
        if key in self.seen_keys:
            self.duplicate_keys += 1
            if len(self.errors) < 20:
                self.errors.append(f"duplicate_key: {key} again in {where}")
        else:
            self.seen_keys.add(key)

    def new_pass(self) -> None:
        self.seen_keys.clear()

    @property
    def complete(self) -> bool:
        return not self.skipped

    def lost_samples(self) -> int:
        """Samples known to be skipped one by one (a damaged shard's loss is in short_shard, not here)."""
        return sum(self.skipped[reason] for reason in SAMPLE_REASONS)

    def summary(self) -> str:
        duplicates = f"; {self.duplicate_keys} duplicate keys (kept)" if self.duplicate_keys else ""
        if not self.skipped:
            return f"{self.samples} samples read, none skipped{duplicates}"
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return f"{self.samples} samples read; skipped: {parts}{duplicates}"

    def to_summary(self) -> ReadStatsSummary:
        return ReadStatsSummary(samples=self.samples, skipped=dict(self.skipped), duplicate_keys=self.duplicate_keys,
                                errors=list(self.errors))


def member_cap(name: str) -> int:
    """The largest size (bytes) read of a tar member named `name` (MEMBER_CAPS, by its last extension)."""
    extension = name.rsplit("/", 1)[-1].rsplit(".", 1)[-1].lower() if "." in name else ""
    return MEMBER_CAPS.get(extension, MEMBER_CAPS["other"])


def tar_members(fileobj: BinaryIO, uri: str, compressed_bytes: int, stats: ReadStats,
                oversized: dict[str, str]) -> Iterator[dict[str, Any]]:
    """{fname, data} of each regular member of a tar stream (gzip etc. undone by tarfile's `r|*`), in order, as
    webdataset's tar_file_iterator yields them, except that a member over its cap (member_cap) is skipped unread
    and noted in `oversized` (its sample's key -> why), and a shard that expands past MAX_EXPANSION times its
    compressed_bytes is cut (oversized_shard). Raises tarfile / OSError errors on damage (the caller counts them)."""
    limit = max(MAX_EXPANSION * compressed_bytes, MIN_EXPANDED_BYTES)
    expanded = 0
    with tarfile.open(fileobj=fileobj, mode="r|*") as stream:
        for info in stream:
            expanded += info.size
            if expanded > limit:
                stats.record("oversized_shard", f"{uri}: its members add up to more than {limit} bytes "
                             f"({MAX_EXPANSION}x its {compressed_bytes}): the rest of the shard is not read")
                return
            if not info.isreg() or re.match(r"__[^/]*__($|/)", info.name):
                continue
            cap = member_cap(info.name)
            if info.size > cap:
                key, _ = base_plus_ext(info.name)  # as group_by_keys groups members into samples
                if key is not None:
                    oversized.setdefault(key,
                                         f"{info.name}: {info.size} bytes, over the {cap} bytes read of such a member")
                continue
            yield {"fname": info.name, "data": stream.extractfile(info).read()}
            stream.members = []  # a stream read keeps no index of what it passed


def iter_tar(shard: Shard, stats: ReadStats) -> Iterator[dict[str, Any]]:
    """Raw samples (dicts of member bytes, with __key__, __url__, __shard__) of one shard, robust to corruption:
    never raises on its bytes.

    The shard is read whole (a file, an S3 object, an http(s) response or a pipe: command's output) and checked
    against the manifest's sha256 when it has one. A truncated or corrupt tar yields what it holds up to the
    damage; the damage is recorded, and so is a checksum mismatch or a shard yielding fewer samples than its
    count (the manifest's, or img2dataset's *_stats.json) says. A sample with a member over its cap
    (member_cap) carries `__oversized__` (why), and decoding skips it as oversized_member.
    """
    uri = shard.url
    yielded = 0
    oversized: dict[str, str] = {}

    def on_member_error(exc: Exception) -> bool:
        stats.record("corrupt_member", f"{uri}: {exc}")
        return True

    def members() -> Iterator[dict[str, Any]]:
        try:
            with open_shard(uri) as stream:
                data = stream.read()
        except (OSError, storage.StorageError) as exc:  # a missing file or object, an http error, a failing pipe:
            stats.record("missing_shard", str(exc))
            return
        if shard.sha256 and storage.sha256_bytes(data) != shard.sha256:
            stats.record("checksum_mismatch", f"{uri}: contents differ from the manifest's sha256")
        try:
            for member in tar_members(io.BytesIO(data), uri, len(data), stats, oversized):
                member["__url__"] = uri
                yield member
        except Exception as exc:  # noqa: BLE001 - any failure to parse bytes already in memory is damage
            stats.record("corrupt_shard", f"{uri}: {type(exc).__name__}: {exc}")

    for raw in group_by_keys(members(), handler=on_member_error):
        raw["__shard__"] = uri
        if raw["__key__"] in oversized:
            raw["__oversized__"] = oversized.pop(raw["__key__"])
        yielded += 1
        yield raw
    for key, why in oversized.items():  # every member of the sample over its cap: nothing else to group
        yielded += 1
        yield {"__key__": key, "__url__": uri, "__shard__": uri, "__oversized__": why}
    if shard.num_samples is not None and yielded < shard.num_samples:
        stats.record("short_shard", f"{uri}: {yielded} of {shard.num_samples} samples readable")


def unusable_raw(raw: dict[str, Any], stats: ReadStats) -> bool:
    """True (counted as oversized_member) when a member of the raw sample was over its cap and left unread."""
    if "__oversized__" in raw:
        stats.record("oversized_member", f"{raw.get('__url__', '')}: {raw['__key__']}: {raw['__oversized__']}")
        return True
    return False


def caption_text(data: bytes, key: str, stats: ReadStats) -> str | None:
    """A caption member's text, or None, counted: non_utf8_caption (not UTF-8: never guessed at with replacement
    characters) or bad_caption (NUL bytes: binary, not text; a run of them is what a bomb's padding reads as)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        stats.record("non_utf8_caption", f"{key}: {exc}")
        return None
    if "\x00" in text:
        stats.record("bad_caption", f"{key}: holds NUL bytes ({text[:20]!r}...)")
        return None
    return text


def decode_meta(raw: dict[str, Any], stats: ReadStats) -> dict[str, Any] | None:
    """A sample's JSON metadata ({} without one), or None, counted as bad_meta, unless it parses to an object."""
    try:
        meta = json.loads(raw["json"]) if "json" in raw else {}
        if not isinstance(meta, dict):
            raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        stats.record("bad_meta", f"{raw['__key__']}: {exc}")
        return None
    return meta


def decode_sample(raw: dict[str, Any], image_size: int | None, stats: ReadStats,
                  transform: ImageTransform | None = None) -> dict[str, Any] | None:
    """Raw member bytes -> {key, image: uint8 [3, H, W], caption, meta, shard}, or None (counted) if unusable.

    transform: the host preprocessing (transforms.py); default a resize of the shorter side to image_size and a
    centre crop, or the image at its own size when image_size is None.

    A caption must be UTF-8 text (a non-UTF-8 one is skipped as non_utf8_caption, not guessed at with
    replacement characters) and not blank; the JSON metadata, when present, must parse to an object."""
    key = raw["__key__"]
    if unusable_raw(raw, stats):
        return None
    image_bytes = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if not isinstance(image_bytes, bytes):
        stats.record("missing_image", key)
        return None
    caption = caption_text(raw.get("txt", b""), key, stats)
    if caption is None:
        return None
    caption = caption.strip()
    if not caption:
        stats.record("empty_caption", key)
        return None
    meta = decode_meta(raw, stats)
    if meta is None:
        return None
    if transform is None and image_size is not None:
        transform = ImageTransform(image_size)
    try:
        pixels = decode_image(image_bytes, transform, key)
    except Exception as exc:  # PIL raises many types for bad data
        stats.record("bad_image", f"{key}: {exc}")
        return None
    stats.samples += 1
    decoded = {"key": key, "image": pixels, "caption": caption, "meta": meta, "shard": raw["__shard__"]}
    for extra in ("ref_image_emb", "ref_text_emb"):
        if extra in raw:
            decoded[extra] = raw[extra]
    return decoded

