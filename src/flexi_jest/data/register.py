"""The make-data stage's `register` source: a team's own curated / pool / eval data, checked and recorded.

Each split is a dataset spec (specs.py: a directory, a brace pattern, s3://, http(s)://, pipe:, ...). For each one
registration resolves the spec (a missing shard or an unreachable URL fails here, naming the spec), reads a few
shards through (the first, the last and some between), decodes some images, and counts the samples where that is
cheap (counts from a manifest or img2dataset's `*_stats.json`, else by reading a split of few shards). It writes
its own manifest, `out_dir/registration.json`, and nothing anywhere else: the user's data is only read.

Later stages read the specs themselves; the result's splits carry them as their paths.
"""

import json
import time
from typing import Any

from flexi_jest import storage
from flexi_jest.config import MakeDataConfig, MakeDataResult, SplitInfo
from flexi_jest.data.shards import ReadStats, decode_sample, iter_tar
from flexi_jest.data.specs import DatasetSpec, SpecError, resolve

REGISTRATION = "registration.json"
SPLITS = ("curated", "pool", "eval")
FATAL = ("missing_shard", "corrupt_shard")  # a sampled shard that cannot be read at all fails registration


def sample_shards(n: int, k: int) -> list[int]:
    """k shard indices out of n spread over the spec: the first, the last and evenly between."""
    if k >= n:
        return list(range(n))
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def check_split(name: str, spec_text: str, cfg: MakeDataConfig) -> tuple[DatasetSpec, dict[str, Any]]:
    """Resolve and check one split; returns the spec (with counts) and what was checked. Raises SpecError naming
    the spec if it names nothing, a sampled shard cannot be read, or no sampled image decodes."""
    spec = resolve(spec_text, cfg.num_samples.get(name))
    stats = ReadStats()
    picked = sample_shards(len(spec.shards), cfg.check_shards)
    read, decoded, sizes = {}, 0, set()
    counted = spec.num_samples is None and len(spec.shards) <= cfg.count_max_shards
    to_read = range(len(spec.shards)) if counted else picked
    for index in to_read:
        shard = spec.shards[index]
        before, first_error = sum(stats.skipped[reason] for reason in FATAL), len(stats.errors)
        raws = 0
        for raw in iter_tar(shard, stats):
            raws += 1
            if decoded < cfg.check_images and index in picked:
                sample = decode_sample(raw, None, stats)
                if sample is not None:
                    decoded += 1
                    sizes.add(tuple(sample["image"].shape[1:]))
        if sum(stats.skipped[reason] for reason in FATAL) > before:
            why = stats.errors[first_error] if len(stats.errors) > first_error else "unreadable"
            raise SpecError(f"dataset spec {spec_text!r} ({name}): cannot read shard {shard.url}: {why}")
        read[shard.url] = raws
    if decoded == 0:
        raise SpecError(f"dataset spec {spec_text!r} ({name}): none of the sampled images decodes: {stats.summary()}")
    num_samples = spec.num_samples if spec.num_samples is not None else (sum(read.values()) if counted else None)
    check = {"spec": spec_text, "num_shards": len(spec.shards), "num_samples": num_samples,
             "counted_by_reading": counted, "shards_read": len(read), "images_decoded": decoded,
             # a list, not a dict by URL: MLflow logs the result's numbers by their keys, and a URL is no metric name
             "samples_in_shards_read": [{"url": url, "samples": n} for url, n in read.items()],
             "image_sizes": sorted(list(size) for size in sizes)[:20], "skipped": dict(stats.skipped),
             "errors": stats.errors[:5]}
    return spec, check


def _inside(path: str, directory: str) -> bool:
    path, directory = path.rstrip("/"), directory.rstrip("/")
    return path == directory or path.startswith(directory + "/")


def register_data(cfg: MakeDataConfig) -> MakeDataResult:
    """Check the three specs of cfg (source 'register') and write out_dir/registration.json."""
    started = time.perf_counter()
    for name in SPLITS:
        for url in resolve(getattr(cfg, name), check=False, counts=False).urls:
            if _inside(cfg.out_dir, url.rsplit("/", 1)[0]):
                raise SpecError(f"out_dir {cfg.out_dir!r} is inside the registered {name} data ({url}): registration "
                                "writes only its own files; choose an out_dir outside the user's data")
    splits: dict[str, SplitInfo] = {}
    checks: dict[str, dict[str, Any]] = {}
    registration: dict[str, Any] = {"format": "flexi-jest-registration/1", "splits": {}}
    for name in SPLITS:
        spec, check = check_split(name, getattr(cfg, name), cfg)
        splits[name] = SplitInfo(path=spec.spec, num_samples=check["num_samples"], num_shards=len(spec.shards))
        checks[name] = check
        registration["splits"][name] = {**check, "shards": [
            {"url": s.url, "num_samples": s.num_samples, "sha256": s.sha256} for s in spec.shards]}
    registration["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    storage.write_bytes(storage.join(cfg.out_dir, REGISTRATION), json.dumps(registration, indent=1).encode())
    result = MakeDataResult(dataset="registered", out_dir=cfg.out_dir, splits=splits, noise_counts={},
                            seconds=time.perf_counter() - started, checks=checks)
    storage.write_bytes(storage.join(cfg.out_dir, "result.json"), result.model_dump_json(indent=1).encode())
    return result
