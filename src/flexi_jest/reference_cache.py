"""Reference-score caching: what the frozen reference computes on the pool, stored once, keyed by sample.

Layout (a directory of its own: beside the pool for data this project generated, else beside the reference's
model file, in the run's storage; never inside a user's dataset):

    refcache-<sha12>/shard-000000.npz   keys [N] (str), image_emb [N, d] fp16, text_emb [N, d] fp16,
                                        content_sha256 [N, 32] uint8 (each sample's caption and image bytes)
    refcache-<sha12>/manifest.json      reference sha256, logit scale/bias, per-shard (by shard URL) counts and
                                        sha256, and manifest_sha256: the digest of every other field

Rows are looked up by sample key (webdataset's __key__; img2dataset's shards use their `key` for it).

With cached embeddings the reference's [B, B] pair-loss matrix of any super-batch is one matmul
(losses.sigmoid_pair_losses), so learner training runs no reference forward pass, and the offline filter's
per-sample image-text cosine over the whole pool is one pass over the sidecars (OfflineFilter).

A cache cannot be silently wrong: an edited manifest fails its digest, a sidecar its sha256, finite values
and shapes are checked on load, keys are unique across the pool, and every sample joined at training time
must have the caption and image bytes it had when it was cached (content_sha256), with or without a
pool manifest. Every failure is a CacheError naming the cache (and the shard, key or file).
"""

import hashlib
import io
import json
import time
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from flexi_jest import storage
from flexi_jest.checkpoint import load_model
from flexi_jest.config import CacheReferenceConfig, CacheReferenceResult
from flexi_jest.data.manifest import read_manifest
from flexi_jest.data.shards import IMAGE_EXTENSIONS, ReadStats, decode_sample, iter_tar
from flexi_jest.data.specs import DatasetSpec, resolve
from flexi_jest.device import resolve_device, to_model_input
from flexi_jest.errors import BadInput
from flexi_jest.flops import offline_filter_flops, pair_forward_flops
from flexi_jest.models import Tokenizer
from flexi_jest.selection import offline_keep_mask, pair_cosines

CACHE_MANIFEST = "manifest.json"
CACHE_FORMAT = "flexi-jest-refcache/2"
MANIFEST_DIGEST = "manifest_sha256"


class CacheError(RuntimeError, BadInput):
    """The reference cache is missing, stale, corrupt or does not cover a sample."""


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of a cache manifest's fields (all but the digest itself), as canonical JSON."""
    fields = {key: value for key, value in manifest.items() if key != MANIFEST_DIGEST}
    return storage.sha256_bytes(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())


def sample_fingerprint(raw: dict[str, Any]) -> bytes:
    """sha256 (32 bytes) of a raw sample's caption and image bytes: what its cached embeddings were computed from."""
    digest = hashlib.sha256()
    image = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), b"")
    for part in (raw.get("txt", b""), image):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.digest()


def is_generated(pool: str) -> bool:
    """Whether pool is one directory of shards this project wrote (make-data's manifest), not a user's dataset."""
    if "::" in pool or "{" in pool or pool.startswith(("pipe:", "http://", "https://")):
        return False
    try:
        manifest = read_manifest(pool)
    except (ValueError, storage.StorageError):
        return False
    return bool(manifest) and str(manifest.get("format", "")).startswith("flexi-jest-shards")


def default_cache_dir(pool: str, reference_sha256: str, reference_uri: str | None = None) -> str:
    """pool/refcache-<sha12> for generated data; for any other dataset refcache-<sha12> beside the reference's
    model file (the run's storage), so that a user's read-only data is never written to."""
    name = f"refcache-{reference_sha256[:12]}"
    if is_generated(pool):
        return storage.join(pool, name)
    if reference_uri:
        return storage.join(reference_uri.rsplit("/", 1)[0] if "/" in reference_uri else ".", name)
    raise CacheError(f"pool {pool!r} is not data this project generated: give cache-reference an out_dir "
                     "(the cache is never written into a user's dataset)")


def _pool_fingerprint(pool: DatasetSpec) -> dict[str, str]:
    """Each shard's sha256 by URL, where the pool's manifest (or shard list) gives one."""
    return {s.url: s.sha256 for s in pool.shards if s.sha256}


@torch.no_grad()
def write_cache(
    model,
    tokenizer,
    pool_dir: str,
    cache_dir: str,
    reference_sha256: str,
    patch_size: int | None,
    batch_size: int,
    device: torch.device,
    to_model_input,
    reference_uri: str | None = None,
) -> dict[str, Any]:
    """Embed every readable pool sample with the frozen reference; write one sidecar per shard, then the manifest.

    to_model_input: uint8 images [B, 3, H, W] -> the model's float input on `device`.
    Returns the manifest. Samples the reader skips (corrupt, empty caption) are counted, not cached.
    """
    model.eval()
    stats = ReadStats()
    shards: dict[str, dict[str, Any]] = {}
    image_size = model.cfg.image_size
    dim = model.cfg.embed_dim
    owner: dict[str, str] = {}  # key -> the shard it was read from: keys must be unique across the pool
    pool = resolve(pool_dir)  # once: the shards read and the fingerprint recorded are the same list
    for index, shard in enumerate(pool.shards):
        keys: list[str] = []
        image_embs: list[np.ndarray] = []
        text_embs: list[np.ndarray] = []
        fingerprints: list[bytes] = []
        skipped_keys: list[str] = []

        def decoded() -> Iterator[dict[str, Any]]:
            for raw in iter_tar(shard, stats):
                key = raw["__key__"]
                if key in owner:
                    raise CacheError(f"key {key!r} is in shard {owner[key]} and in shard {shard.url} of {pool_dir}: a "
                                     f"reference cache is keyed by sample, so the cache {cache_dir} is not written")
                owner[key] = shard.url
                sample = decode_sample(raw, image_size, stats)
                if sample is None:
                    skipped_keys.append(key)
                else:
                    sample["fingerprint"] = sample_fingerprint(raw)
                    yield sample

        for batch in _batches(decoded(), batch_size):
            images = to_model_input(torch.stack([s["image"] for s in batch]))
            tokens = tokenizer([s["caption"] for s in batch]).to(device)
            image_emb, text_emb = model(images, tokens, patch_size)
            image_half = image_emb.float().cpu().numpy().astype(np.float16)
            text_half = text_emb.float().cpu().numpy().astype(np.float16)
            finite = np.isfinite(image_half).all(axis=1) & np.isfinite(text_half).all(axis=1)
            if not finite.all():
                bad = [s["key"] for s, ok in zip(batch, finite) if not ok]
                raise CacheError(f"the reference gives non-finite (NaN/inf) fp16 embeddings for {len(bad)} samples of "
                                 f"shard {shard.url} ({bad[:5]}): the cache {cache_dir} is not written")
            keys += [s["key"] for s in batch]
            fingerprints += [s["fingerprint"] for s in batch]
            image_embs.append(image_half)
            text_embs.append(text_half)
        buffer = io.BytesIO()
        content = np.frombuffer(b"".join(fingerprints), np.uint8).reshape(len(fingerprints), 32)
        np.savez(
            buffer,
            keys=np.array(keys, dtype=str),
            image_emb=np.concatenate(image_embs) if image_embs else np.zeros((0, dim), np.float16),
            text_emb=np.concatenate(text_embs) if text_embs else np.zeros((0, dim), np.float16),
            content_sha256=content,
        )
        data = buffer.getvalue()
        sidecar = f"shard-{index:06d}.npz"
        storage.write_bytes(storage.join(cache_dir, sidecar), data)
        shards[shard.url] = {
            "file": sidecar, "num_samples": len(keys), "sha256": storage.sha256_bytes(data),
            "skipped_keys": skipped_keys,
            "content_sha256": storage.sha256_bytes(content.tobytes()),  # the shard's fingerprint, pool manifest or not
        }
    manifest = {
        "format": CACHE_FORMAT,
        "reference_sha256": reference_sha256,
        "logit_scale": float(model.logit_scale),
        "logit_bias": float(model.logit_bias),
        "embed_dim": model.cfg.embed_dim,
        "patch_size": patch_size or model.cfg.patch_size,
        "pool": pool_dir,
        "reference": reference_uri,
        "flops": float(sum(s["num_samples"] for s in shards.values()) * pair_forward_flops(model.cfg, patch_size)),
        "pool_shards": _pool_fingerprint(pool),
        "num_samples": sum(s["num_samples"] for s in shards.values()),
        "shards": shards,
        "skipped": dict(stats.skipped),
        "read_stats": stats.to_summary().model_dump(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
    storage.write_bytes(storage.join(cache_dir, CACHE_MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _check_structure(cache_dir: str, uri: str, manifest: dict[str, Any]) -> None:
    """A CacheError naming the cache and the field unless the manifest has the fields and types readers use
    (a consistent digest proves who wrote a manifest, not that its writer wrote it right)."""
    def bad(where: str, problem: str) -> CacheError:
        return CacheError(f"reference cache {cache_dir}: {uri}: {where} {problem}; re-run cache-reference")

    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(manifest.get("reference_sha256"), str):
        raise bad("reference_sha256", "must be a string")
    if not count(manifest.get("embed_dim")) or manifest["embed_dim"] == 0:
        raise bad("embed_dim", f"must be a positive integer, got {manifest.get('embed_dim')!r}")
    if not count(manifest.get("num_samples")):
        raise bad("num_samples", f"must be an integer >= 0, got {manifest.get('num_samples')!r}")
    flops = manifest.get("flops", 0.0)
    if isinstance(flops, bool) or not isinstance(flops, (int, float)):
        raise bad("flops", f"must be a number, got {flops!r}")
    if not isinstance(manifest.get("reference"), (str, type(None))):
        raise bad("reference", "must be a string or null")
    pool_shards = manifest.get("pool_shards")
    if not isinstance(pool_shards, dict) or not all(isinstance(v, str) for v in pool_shards.values()):
        raise bad("pool_shards", "must map shard names to sha256 strings")
    shards = manifest.get("shards")
    if not isinstance(shards, dict):
        raise bad("shards", "must map shard names to {file, num_samples, sha256, skipped_keys, content_sha256}")
    for name, entry in shards.items():
        if not isinstance(entry, dict):
            raise bad(f"shards[{name!r}]", "must be an object")
        for field in ("file", "sha256", "content_sha256"):
            if not isinstance(entry.get(field), str):
                raise bad(f"shards[{name!r}].{field}", "must be a string")
        if not count(entry.get("num_samples")):
            raise bad(f"shards[{name!r}].num_samples", f"must be an integer >= 0, got {entry.get('num_samples')!r}")
        skipped = entry.get("skipped_keys", [])
        if not isinstance(skipped, list) or not all(isinstance(key, str) for key in skipped):
            raise bad(f"shards[{name!r}].skipped_keys", "must be a list of keys")


class ReferenceCache:
    """Read side of the cache: validates the manifest, then joins embeddings onto raw samples by key."""

    def __init__(self, cache_dir: str, pool: "str | DatasetSpec | None" = None,
                 expected_reference_sha256: str | None = None):
        """pool: the pool the cache must have been made for (a spec, or one resolved already: the learner's stream
        reads the same DatasetSpec), checked against the sha256s the cache recorded."""
        uri = storage.join(cache_dir, CACHE_MANIFEST)
        if not storage.exists(uri):
            raise CacheError(f"no reference cache at {cache_dir} (missing {CACHE_MANIFEST}); run cache-reference first")
        self.cache_dir = cache_dir
        self.manifest = self._read_manifest(uri)
        sha = self.manifest["reference_sha256"]
        if expected_reference_sha256 and sha != expected_reference_sha256:
            raise CacheError(
                f"reference cache {cache_dir} was made by reference {sha}, not the expected "
                f"{expected_reference_sha256}: re-run cache-reference with the current reference"
            )
        if pool is not None:
            resolved = pool if isinstance(pool, DatasetSpec) else resolve(pool, check=False, counts=False)
            current = _pool_fingerprint(resolved)
            if current and current != self.manifest["pool_shards"]:
                raise CacheError(f"reference cache {cache_dir} was made for different shards than {resolved.spec}: "
                                 "re-run cache-reference")
        self.logit_scale = torch.tensor(self.manifest["logit_scale"])
        self.logit_bias = torch.tensor(self.manifest["logit_bias"])
        self._key_shard: dict[str, str] = {}  # key -> shard, over the sidecars loaded so far

    def _read_manifest(self, uri: str) -> dict[str, Any]:
        """The manifest, checked: readable JSON, this format, its digest, finite scale/bias, names inside the cache."""
        try:
            manifest = json.loads(storage.read_bytes(uri))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CacheError(f"reference cache {self.cache_dir}: {uri} is not valid JSON (truncated or corrupt: "
                             f"{exc}); re-run cache-reference") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise CacheError(f"reference cache {self.cache_dir}: {uri} has format {found!r}, not {CACHE_FORMAT!r} "
                             "(an older or foreign cache); re-run cache-reference")
        if manifest.get(MANIFEST_DIGEST) != manifest_digest(manifest):
            raise CacheError(f"reference cache {self.cache_dir}: {uri} fails its digest ({MANIFEST_DIGEST}): a field "
                             "(logit_scale, logit_bias, reference_sha256, shards, ...) was changed after caching; "
                             "re-run cache-reference")
        _check_structure(self.cache_dir, uri, manifest)
        for field in ("logit_scale", "logit_bias"):
            value = manifest.get(field)
            if not isinstance(value, (int, float)) or not np.isfinite(value):
                raise CacheError(
                    f"reference cache {self.cache_dir}: {uri} has {field} = {value!r}, not a finite number")
        for entry in manifest["shards"].values():
            try:
                storage.confined(self.cache_dir, entry["file"], uri)
            except storage.UnsafeNameError as exc:
                raise CacheError(f"reference cache {self.cache_dir}: {exc}") from exc
        return manifest

    def load_shard(self, shard_name: str) -> tuple[dict[str, int], np.ndarray, np.ndarray, np.ndarray]:
        """(key -> row, image_emb [N, d] fp16, text_emb [N, d] fp16, content_sha256 [N, 32] uint8) of one shard's
        sidecar (by the shard's URL, as the pool's spec resolves it); checksum, shapes, finiteness and key
        uniqueness verified."""
        entry = self.manifest["shards"].get(shard_name)
        if entry is None:
            raise CacheError(f"reference cache {self.cache_dir} has no entry for shard {shard_name}")
        uri = storage.confined(self.cache_dir, entry["file"], storage.join(self.cache_dir, CACHE_MANIFEST))
        data = storage.read_bytes(uri)
        if storage.sha256_bytes(data) != entry["sha256"]:
            raise CacheError(f"reference cache file {uri} fails its checksum: it is corrupt, re-run cache-reference")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                keys, image_emb, text_emb, content = (arrays[name] for name in
                                                      ("keys", "image_emb", "text_emb", "content_sha256"))
        except Exception as exc:  # a bad zip, a missing array, a pickled array: numpy raises several types
            raise CacheError(f"reference cache {self.cache_dir}: {uri} is not a readable sidecar (keys, image_emb, "
                             f"text_emb, content_sha256): {exc!r}") from exc
        n, dim = entry["num_samples"], self.manifest["embed_dim"]
        expected = {"keys": (n,), "image_emb": (n, dim), "text_emb": (n, dim), "content_sha256": (n, 32)}
        for name, array in (("keys", keys), ("image_emb", image_emb), ("text_emb", text_emb),
                            ("content_sha256", content)):
            if array.shape != expected[name]:
                raise CacheError(f"reference cache {self.cache_dir}: {uri} has {name} of shape {array.shape}, the "
                                 f"manifest says {expected[name]} (num_samples {n}, embed_dim {dim})")
        if not (np.isfinite(image_emb).all() and np.isfinite(text_emb).all()):
            bad = [str(k) for k, ok in zip(keys,
                                           np.isfinite(image_emb).all(1) & np.isfinite(text_emb).all(1)) if not ok]
            raise CacheError(f"reference cache {self.cache_dir}: shard {shard_name} ({uri}) holds non-finite (NaN/inf) "
                             f"embeddings for {len(bad)} samples ({bad[:5]}); re-run cache-reference")
        index: dict[str, int] = {}
        for row, key in enumerate(map(str, keys)):
            other = shard_name if key in index else self._key_shard.get(key, shard_name)
            if other != shard_name or key in index:
                raise CacheError(f"reference cache {self.cache_dir}: key {key!r} is in shard {other} and in shard "
                                 f"{shard_name}; keys must be unique, re-run cache-reference on a pool with unique "
                                 "keys")
            index[key] = row
            self._key_shard[key] = shard_name
        return index, image_emb, text_emb, content

    def attach(self, shard_name: str, raws: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Add ref_image_emb / ref_text_emb (fp16 [d]) to each raw sample of shard_name; a missing key, or a sample
        whose caption or image bytes changed since caching, is a CacheError.

        Samples the cache pass skipped as unreadable pass through without embeddings (the reader skips them again).
        """
        index, image_emb, text_emb, content = self.load_shard(shard_name)
        unreadable = set(self.manifest["shards"][shard_name].get("skipped_keys", []))
        for raw in raws:
            row = index.get(raw["__key__"])
            if row is None and raw["__key__"] in unreadable:
                yield raw
                continue
            if row is None:
                raise CacheError(
                    f"sample {raw['__key__']} of shard {shard_name} is not in the reference cache {self.cache_dir}: "
                    "the pool changed after caching; re-run cache-reference"
                )
            if sample_fingerprint(raw) != content[row].tobytes():
                raise CacheError(
                    f"sample {raw['__key__']} of shard {shard_name} has another caption or image than when the "
                    f"reference cache {self.cache_dir} was made: the pool changed after caching; re-run cache-reference"
                )
            raw["ref_image_emb"] = torch.from_numpy(image_emb[row])
            raw["ref_text_emb"] = torch.from_numpy(text_emb[row])
            yield raw


    def pool_cosines(self) -> tuple[list[str], Tensor]:
        """Every cached sample's key and the reference's image-text cosine similarity, in shard order:
        ([N], [N] fp32)."""
        keys: list[str] = []
        cosines: list[Tensor] = []
        for shard_name in self.manifest["shards"]:
            index, image_emb, text_emb, _ = self.load_shard(shard_name)
            keys += sorted(index, key=index.get)
            cosines.append(pair_cosines(torch.from_numpy(image_emb), torch.from_numpy(text_emb)))
        if not keys:
            raise CacheError(f"reference cache {self.cache_dir} holds no samples: nothing to filter")
        return keys, torch.cat(cosines)


class OfflineFilter:
    """The offline filter's side of the training stream: keep the top keep_ratio of the pool by the reference's
    cached image-text cosine, drop (and count) the rest as shards are read.

    Use as StreamLoader's `attach` hook (data/loader.py): filter(shard_name, raw_samples) yields the kept raw
    samples. The decision is a fixed function of the sample's key, so a resumed stream drops the same samples.
    Fields: threshold (the lowest kept cosine, the (1 - keep_ratio) quantile of the pool's), pool_size, kept,
    dropped (samples dropped so far by the stream, all epochs), flops (the cosines: 6 d FLOPs a sample)."""

    def __init__(self, cache: ReferenceCache, keep_ratio: float):
        keys, cosines = cache.pool_cosines()
        keep, self.threshold = offline_keep_mask(cosines, keep_ratio)
        self.keep_ratio = keep_ratio
        self.pool_size = len(keys)
        self.kept_keys = {key for key, kept in zip(keys, keep.tolist()) if kept}
        self.kept = len(self.kept_keys)
        self.dropped = 0
        self.flops = float(offline_filter_flops(self.pool_size, cache.manifest["embed_dim"]))

    def __call__(self, shard_name: str, raws: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for raw in raws:
            if raw["__key__"] in self.kept_keys:
                yield raw
            else:
                self.dropped += 1


def cache_reference(cfg: CacheReferenceConfig) -> CacheReferenceResult:
    """The cache-reference stage: embed the pool once with the frozen reference (config: CacheReferenceConfig)."""
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    model, sha = load_model(cfg.reference, device)
    cache_dir = cfg.out_dir or default_cache_dir(cfg.pool, sha, cfg.reference)
    manifest = write_cache(
        model, Tokenizer(model.cfg), cfg.pool, cache_dir, sha, cfg.patch_size, cfg.batch_size,
        device, lambda images: to_model_input(images, device, model.cfg.mean, model.cfg.std), cfg.reference,
    )
    return CacheReferenceResult(
        cache_dir=cache_dir, reference_sha256=sha, num_samples=manifest["num_samples"],
        num_shards=len(manifest["shards"]), skipped=manifest["skipped"], seconds=time.perf_counter() - started,
        flops=manifest["flops"], read_stats=manifest["read_stats"],
    )


def reference_share(cache_dir: str, reference_sha256: str) -> dict[str, Any]:
    """What a learner run needs to know of the reference behind a cache: the sha256 of the reference it was
    given (a pipeline: the reference stage's output, never the cache's own record), checked against the cache
    (a CacheError naming both when they differ), and the reference's FLOPs (training, from the result.json
    beside its model file when there is one, and the caching pass), counted once."""
    if not reference_sha256:
        raise ValueError(
            f"reference_share({cache_dir!r}): the reference's sha256 is required, to check the cache against")
    manifest = ReferenceCache(cache_dir, expected_reference_sha256=reference_sha256).manifest
    training_flops = 0.0
    reference = manifest.get("reference")
    if reference:
        result_uri = storage.join(reference.rsplit("/", 1)[0], "result.json")
        if storage.exists(result_uri):
            training_flops = float(json.loads(storage.read_bytes(result_uri))["flops"]["reference_training"])
    return {"reference_sha256": reference_sha256, "reference_training_flops": training_flops,
            "reference_caching_flops": float(manifest.get("flops", 0.0))}
