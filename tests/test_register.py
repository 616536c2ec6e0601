"""make-data with source 'register': a team's own data (img2dataset layout), checked, recorded under out_dir and
read by every later stage without a byte written into it."""

import io
import json
from pathlib import Path

import pytest
from PIL import Image
from webdataset import TarWriter

from conftest import BOTH_S3, TEST_MODEL
from flexi_jest import storage
from flexi_jest.config import (
    CacheReferenceConfig, EvaluateConfig, MakeDataConfig, TrainLearnerConfig, TrainReferenceConfig, validated_stage_config,
    ConfigError,
)
from flexi_jest.data.make import make_data
from flexi_jest.data.shapes import generate
from flexi_jest.data.specs import SpecError


def write_img2dataset_layout(root: str, shards: int = 3, per_shard: int = 16, seed: int = 0) -> str:
    """The layout img2dataset writes (00000.tar with 000000000.jpg/.txt/.json, 00000_stats.json beside it), by hand:
    fast enough for the default test run (tests marked slow build it with img2dataset itself)."""
    storage.makedirs(root)
    samples = iter(generate("pool", shards * per_shard, seed, image_size=40))
    for s in range(shards):
        buffer = io.BytesIO()
        with TarWriter(buffer) as writer:
            for i in range(per_shard):
                sample = next(samples)
                key = f"{s:05d}{i:04d}"
                wide = Image.new("RGB", (80, 40), sample.image.getpixel((0, 0)))
                wide.paste(sample.image, (20, 0))
                jpg = io.BytesIO()
                wide.save(jpg, format="JPEG", quality=90)
                writer.write({"__key__": key, "jpg": jpg.getvalue(), "txt": sample.caption.encode(),
                              "json": json.dumps({"key": key, "status": "success", "caption": sample.caption}).encode()})
        storage.write_bytes(storage.join(root, f"{s:05d}.tar"), buffer.getvalue())
        storage.write_bytes(storage.join(root, f"{s:05d}_stats.json"), json.dumps({"successes": per_shard}).encode())
    return root


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def register_config(data: str, out_dir: str, **overrides) -> MakeDataConfig:
    specs = dict(curated=f"{data}/{{00000..00001}}.tar", pool=data, eval=f"{data}/00002.tar")
    return MakeDataConfig(source="register", out_dir=out_dir, **{**specs, **overrides})


def run_stages(result, workdir: str) -> dict:
    """Reference, cache (default location), uniform and joint learners, evaluation on the registered specs."""
    from flexi_jest.evaluate import evaluate
    from flexi_jest.reference_cache import cache_reference
    from flexi_jest.train import train_learner, train_reference
    splits = result.splits
    reference = train_reference(TrainReferenceConfig(data=splits["curated"].path, out_dir=f"{workdir}/reference",
                                                     model=TEST_MODEL, steps=2, batch_size=16, progress=False))
    cache = cache_reference(CacheReferenceConfig(reference=reference.checkpoint, pool=splits["pool"].path))
    learner = train_learner(TrainLearnerConfig(
        pool=splits["pool"].path, reference_cache=cache.cache_dir, out_dir=f"{workdir}/learner", model=TEST_MODEL,
        super_batch_size=40, filter_ratio=0.8, n_chunks=4, steps=2, progress=False, train_crop="random_resized"))
    metrics = evaluate(EvaluateConfig(model=learner.checkpoint, eval_data=[splits["eval"].path]))
    return {"reference": reference, "cache": cache, "learner": learner, "metrics": metrics}


def test_register_checks_records_and_never_writes_into_the_data(tmp_path):
    data = write_img2dataset_layout(str(tmp_path / "team" / "laion"))
    before = snapshot(tmp_path / "team")
    result = make_data(register_config(data, str(tmp_path / "run" / "data")))
    assert {name: s.num_samples for name, s in result.splits.items()} == {"curated": 32, "pool": 48, "eval": 16}
    assert result.splits["pool"].path == data and result.checks["pool"]["images_decoded"] == 32
    assert result.checks["eval"]["image_sizes"] == [[40, 80]]
    from flexi_jest.tracking import numeric_metrics  # what MLflow logs of the result: no URL in a metric name
    assert not any("/" in name for name in numeric_metrics(result.model_dump()))
    registration = json.loads((tmp_path / "run" / "data" / "registration.json").read_text())
    assert [s["url"] for s in registration["splits"]["pool"]["shards"]] == [f"{data}/{i:05d}.tar" for i in range(3)]
    outputs = run_stages(result, str(tmp_path / "run"))
    # the cache went beside the reference (the run's storage), not into the team's data
    assert outputs["cache"].cache_dir.startswith(str(tmp_path / "run" / "reference"))
    assert outputs["cache"].num_samples == 48
    assert outputs["learner"].steps == 2 and outputs["metrics"].splits
    assert snapshot(tmp_path / "team") == before


def test_unknown_counts_are_counted_when_cheap_and_allowed_when_not(tmp_path):
    data = write_img2dataset_layout(str(tmp_path / "laion"))
    for stats in (tmp_path / "laion").glob("*_stats.json"):
        stats.unlink()
    counted = make_data(register_config(data, str(tmp_path / "a")))
    assert counted.splits["pool"].num_samples == 48 and counted.checks["pool"]["counted_by_reading"]
    unknown = make_data(register_config(data, str(tmp_path / "b"), count_max_shards=2))
    assert unknown.splits["pool"].num_samples is None  # a pool may be too large to count
    explicit = make_data(register_config(data, str(tmp_path / "c"), count_max_shards=0, num_samples={"pool": 1000}))
    assert explicit.splits["pool"].num_samples == 1000


def test_bad_registrations_fail_naming_the_spec_or_the_field(tmp_path):
    data = write_img2dataset_layout(str(tmp_path / "laion"))
    with pytest.raises(SpecError, match=r"missing shard .*00003.tar \(and 4 more of 8\)"):
        make_data(register_config(data, str(tmp_path / "run"), pool=f"{data}/{{00000..00007}}.tar"))
    with pytest.raises(SpecError, match="out_dir .* is inside the registered curated data"):
        make_data(register_config(data, f"{data}/registered"))
    (tmp_path / "laion" / "00002.tar").write_bytes(b"not a tar")
    with pytest.raises(SpecError, match=r"\(pool\): cannot read shard .*00002.tar: corrupt_shard"):
        make_data(register_config(data, str(tmp_path / "run")))
    with pytest.raises(ConfigError, match="source 'register' needs a dataset spec for pool"):
        validated_stage_config("make-data", "tiny", {"source": "register", "curated": data, "eval": data})
    with pytest.raises(ConfigError, match="are read with source 'register'"):
        validated_stage_config("make-data", "tiny", {"pool": data})


@pytest.mark.slow  # img2dataset starts processes that import pandas, pyarrow and wandb: about a minute on 2 shared cores
@BOTH_S3
def test_an_img2dataset_pool_local_and_on_s3_runs_through_every_stage(img2dataset_dir, s3, tmp_path):
    local = make_data(register_config(str(img2dataset_dir), str(tmp_path / "local")))
    assert local.splits["pool"].num_samples == 58  # 60 URLs, 2 of them broken: img2dataset's stats say 58
    for path in img2dataset_dir.iterdir():
        storage.upload_file(path, f"{s3}/laion/{path.name}")
    remote = make_data(register_config(f"{s3}/laion", f"{s3}/run/data"))
    assert {n: s.num_samples for n, s in remote.splits.items()} == {n: s.num_samples for n, s in local.splits.items()}
    assert storage.exists(f"{s3}/run/data/registration.json")
    outputs = run_stages(remote, f"{s3}/run")
    assert outputs["cache"].cache_dir.startswith(f"{s3}/run/reference/refcache-") and outputs["cache"].num_samples == 58
    assert outputs["metrics"].splits
