"""The make-data stage's `register` source: a team's own curated / pool / eval data, checked and recorded.

Each split is a dataset spec (specs.py: a directory, a brace pattern, s3://, http(s)://, pipe:, ...). For each one
registration resolves the spec (a missing shard or an unreachable URL fails here, naming the spec), reads a few
shards through (the first, the last and some between), decodes some images, and counts the samples where that is
cheap (counts from a manifest or img2dataset's `*_stats.json`, else by reading a split of few shards). It writes
its own manifest, `out_dir/registration.json`, and nothing anywhere else: the user's data is only read (out_dir
is compared with the data as resolved paths: `DATA/./pool`, `file://DATA/pool` and a symlink to it are the data).

Empty shards (img2dataset writes one when every URL of a shard failed: `successes: 0`) are reported by name, in
the result's checks, registration.json and on stdout; training never draws them (loader.py). A split with no
readable sample is refused, naming it, and so is a shard whose count says 0 but which holds samples (training
would never read them).

Leakage: the keys and image bytes (sha256) of the samples read are compared across splits. Eval sharing an image
with curated or pool is refused unless `allow_eval_overlap` is set: evaluating on training data inflates the metric
promotion compares. Shared keys alone, and curated sharing images with pool, are warnings (img2dataset's keys
restart at 000000000 in every download, so equal keys are no evidence by themselves). Only the shards read are
compared: the first, the last and some between of a large split.

Each spec is resolved once. The training splits' shards, as resolved here, go to `out_dir/curated.shardlist.json`
and `out_dir/pool.shardlist.json` (specs.write_shard_list), and the result's splits carry those lists as their paths
(the spec itself as `spec`): the reference, the caching pass and the learner read the same shards in the same order
without listing the data again, and a shard removed since is a SpecError naming it. The eval split keeps its spec
as its path: evaluation opens it as an eval set (eval_sets.py), whose layout, class names and name are found from
where the data is, which a list of tars would hide.
"""

import hashlib
import json
import os
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from flexi_jest import storage
from flexi_jest.config import MakeDataConfig, MakeDataResult, SplitInfo
from flexi_jest.data.shards import IMAGE_EXTENSIONS, ReadStats, decode_sample, iter_tar
from flexi_jest.data.specs import SHARD_LIST_SUFFIX, DatasetSpec, SpecError, resolve, write_shard_list

REGISTRATION = "registration.json"
SPLITS = ("curated", "pool", "eval")
LISTED = ("curated", "pool")  # the splits later stages read as a shard list (the eval split: see the docstring)
FATAL = ("missing_shard", "corrupt_shard")  # a sampled shard that cannot be read at all fails registration


def registered_path(out_dir: str, name: str, spec: str) -> str:
    """What later stages read for split name registered from spec: out_dir/<name>.shardlist.json for a training
    split (LISTED), the spec itself for the eval split."""
    return storage.join(out_dir, f"{name}{SHARD_LIST_SUFFIX}") if name in LISTED else spec


def sample_shards(n: int, k: int) -> list[int]:
    """k shard indices out of n spread over the spec: the first, the last and evenly between."""
    if k >= n:
        return list(range(n))
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


@dataclass
class Seen:
    """What the shards read of one split hold, for the leakage check: sample key -> shard url, image sha256 -> key."""

    keys: dict[str, str] = field(default_factory=dict)
    images: dict[bytes, str] = field(default_factory=dict)

    def add(self, raw: dict[str, Any]) -> None:
        self.keys.setdefault(raw["__key__"], raw["__shard__"])
        image = next((raw[ext] for ext in IMAGE_EXTENSIONS if isinstance(raw.get(ext), bytes)), None)
        if image is not None:
            self.images.setdefault(hashlib.sha256(image).digest(), raw["__key__"])


def check_split(name: str, spec: DatasetSpec, cfg: MakeDataConfig, seen: Seen | None = None) -> dict[str, Any]:
    """Check one resolved split; returns what was checked (empty_shards: the URLs of the shards with no sample).
    Raises SpecError naming the spec if it holds no sample, a sampled shard cannot be read, a shard counted 0 holds
    samples, or no sampled image decodes. seen: filled with the keys and image hashes of the samples read."""
    spec_text = spec.spec
    where = f"dataset spec {spec_text!r} ({name})"
    counted_empty = [i for i, shard in enumerate(spec.shards) if shard.num_samples == 0]
    if len(counted_empty) == len(spec.shards):
        raise SpecError(f"{where} holds no sample: every shard is empty by its counts (manifest or *_stats.json), "
                        f"e.g. {spec.shards[0].url}")
    live = [i for i in range(len(spec.shards)) if i not in set(counted_empty)]
    stats = ReadStats()
    picked = [live[j] for j in sample_shards(len(live), cfg.check_shards)]
    read, decoded, sizes = {}, 0, set()
    counted = spec.num_samples is None and len(spec.shards) <= cfg.count_max_shards
    to_read = range(len(spec.shards)) if counted else sorted(set(picked) | set(counted_empty))  # empties are cheap
    for index in to_read:
        shard = spec.shards[index]
        before, first_error = sum(stats.skipped[reason] for reason in FATAL), len(stats.errors)
        raws = 0
        for raw in iter_tar(shard, stats):
            raws += 1
            if seen is not None:
                seen.add(raw)
            if decoded < cfg.check_images and index in picked:
                sample = decode_sample(raw, None, stats)
                if sample is not None:
                    decoded += 1
                    sizes.add(tuple(sample["image"].shape[1:]))
        if sum(stats.skipped[reason] for reason in FATAL) > before:
            why = stats.errors[first_error] if len(stats.errors) > first_error else "unreadable"
            raise SpecError(f"{where}: cannot read shard {shard.url}: {why}")
        if shard.num_samples == 0 and raws:
            raise SpecError(f"{where}: shard {shard.url} holds {raws} samples but its count (manifest or *_stats.json) "
                            "says 0, so training would never read it: correct or remove the count")
        read[shard.url] = raws
    empty = [spec.shards[i].url for i in counted_empty] + [
        url for url, n in read.items() if n == 0 and url not in {spec.shards[i].url for i in counted_empty}]
    if decoded == 0:
        if all(n == 0 for n in read.values()):
            raise SpecError(f"{where} holds no readable sample: each of the {len(read)} shards read is empty "
                            f"({', '.join(list(read)[:3])}{', ...' if len(read) > 3 else ''})")
        raise SpecError(f"{where}: none of the sampled images decodes: {stats.summary()}")
    num_samples = spec.num_samples if spec.num_samples is not None else (sum(read.values()) if counted else None)
    check = {"spec": spec_text, "num_shards": len(spec.shards), "num_samples": num_samples,
             "counted_by_reading": counted, "shards_read": len(read), "images_decoded": decoded,
             # a list, not a dict by URL: MLflow logs the result's numbers by their keys, and a URL is no metric name
             "samples_in_shards_read": [{"url": url, "samples": n} for url, n in read.items()],
             "num_empty_shards": len(empty), "empty_shards": empty,
             "image_sizes": sorted(list(size) for size in sizes)[:20], "skipped": dict(stats.skipped),
             "errors": stats.errors[:5]}
    return check


def overlaps(seen: dict[str, Seen]) -> dict[str, dict[str, Any]]:
    """Per pair of splits ('curated_and_pool', ...): the keys and the images (identical bytes) both hold, in the
    shards read, with a few examples."""
    out = {}
    for i, first in enumerate(SPLITS):
        for second in SPLITS[i + 1:]:
            keys = sorted(seen[first].keys.keys() & seen[second].keys.keys())
            images = seen[first].images.keys() & seen[second].images.keys()
            out[f"{first}_and_{second}"] = {
                "shared_keys": len(keys), "shared_images": len(images), "example_keys": keys[:3],
                "example_images": sorted(f"{seen[first].images[h]} = {seen[second].images[h]}" for h in images)[:3]}
    return out


def leakage_warnings(found: dict[str, dict[str, Any]], allow_eval_overlap: bool) -> list[str]:
    """Warnings about shared keys / images; raises SpecError when eval shares images with a training split (unless
    allowed), naming every such pair."""
    warnings, refusals = [], []
    for pair, info in found.items():
        first, second = pair.split("_and_")
        if info["shared_images"]:
            what = (f"{first} and {second} share {info['shared_images']} images (identical bytes) in the shards read, "
                    f"e.g. {', '.join(info['example_images'])}")
            (refusals if second == "eval" and not allow_eval_overlap else warnings).append(what)
        elif info["shared_keys"]:
            warnings.append(f"{first} and {second} share {info['shared_keys']} sample keys (e.g. "
                            f"{', '.join(info['example_keys'])}) but no image in the shards read: separate img2dataset "
                            "downloads reuse keys, so this alone is not leakage")
    if refusals:
        raise SpecError(f"{'; '.join(refusals)}: evaluating on training data inflates the metric promotion compares; "
                        "give disjoint splits, or set allow_eval_overlap: true to register them anyway")
    return warnings


def location(uri: str) -> str | None:
    """A local path or S3 URI in one normal form, to compare locations (None for http(s):// and pipe:): local paths
    and file:// URIs resolved (`.`, `..`, symlinks), S3 keys normalised."""
    if uri.startswith(("pipe:", "http://", "https://")):
        return None
    if storage.is_s3(uri):
        parsed = urlparse(uri)
        return f"s3://{parsed.netloc}{posixpath.normpath('/' + parsed.path.lstrip('/'))}".rstrip("/")
    path = urlparse(uri).path if uri.startswith("file://") else uri
    return os.path.realpath(path)


def _inside(path: str, directory: str) -> bool:
    path, directory = location(path), location(directory)
    if path is None or directory is None:
        return False
    path, directory = path.rstrip("/"), directory.rstrip("/")
    return path == directory or path.startswith(directory + "/")


def register_data(cfg: MakeDataConfig) -> MakeDataResult:
    """Check the three specs of cfg (source 'register') and write out_dir/registration.json."""
    started = time.perf_counter()
    resolved = {name: resolve(getattr(cfg, name), cfg.num_samples.get(name)) for name in SPLITS}  # once per split
    for name in SPLITS:
        for url in resolved[name].urls:
            if _inside(cfg.out_dir, url.rsplit("/", 1)[0]):
                raise SpecError(f"out_dir {cfg.out_dir!r} is inside the registered {name} data ({url}): registration "
                                "writes only its own files; choose an out_dir outside the user's data")
    splits: dict[str, SplitInfo] = {}
    checks: dict[str, dict[str, Any]] = {}
    registration: dict[str, Any] = {"format": "flexi-jest-registration/1", "splits": {}}
    seen = {name: Seen() for name in SPLITS}
    for name in SPLITS:
        spec = resolved[name]
        check = check_split(name, spec, cfg, seen[name])
        splits[name] = SplitInfo(path=registered_path(cfg.out_dir, name, spec.spec), spec=spec.spec,
                                 num_samples=check["num_samples"], num_shards=len(spec.shards))
        checks[name] = check
        registration["splits"][name] = {**check, "shards": [
            {"url": s.url, "num_samples": s.num_samples, "sha256": s.sha256} for s in spec.shards]}
    found = overlaps(seen)
    warnings = leakage_warnings(found, cfg.allow_eval_overlap)
    for name in SPLITS:
        if checks[name]["empty_shards"]:
            empty = checks[name]["empty_shards"]
            warnings.append(f"{name}: {len(empty)} empty shard{'s' if len(empty) > 1 else ''} (no sample; training "
                            f"never draws {'them' if len(empty) > 1 else 'it'}): {', '.join(empty[:10])}"
                            f"{', ...' if len(empty) > 10 else ''}")
    checks["overlap"] = found
    registration["overlap"], registration["warnings"] = found, warnings
    for warning in warnings:
        print(f"[make-data] warning: {warning}", flush=True)
    registration["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for name in LISTED:  # after every check has passed: a refused registration writes nothing
        write_shard_list(splits[name].path, resolved[name])
    storage.write_bytes(storage.join(cfg.out_dir, REGISTRATION), json.dumps(registration, indent=1).encode())
    result = MakeDataResult(dataset="registered", out_dir=cfg.out_dir, splits=splits, noise_counts={},
                            seconds=time.perf_counter() - started, checks=checks)
    storage.write_bytes(storage.join(cfg.out_dir, "result.json"), result.model_dump_json(indent=1).encode())
    return result
