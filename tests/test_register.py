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
    CacheReferenceConfig,
    ConfigError,
    EvaluateConfig,
    MakeDataConfig,
    TrainLearnerConfig,
    TrainReferenceConfig,
    validated_stage_config,
)
from flexi_jest.data.make import make_data
from flexi_jest.data.shapes import generate
from flexi_jest.data.specs import SpecError


def write_img2dataset_layout(root: str, shards: int = 3, per_shard: int = 16, seed: int = 0,
                             empty_last: bool = True) -> str:
    """The layout img2dataset writes (00000.tar with 000000000.jpg/.txt/.json, 00000_stats.json beside it), by hand:
    fast enough for the default test run (tests marked slow build it with img2dataset itself). empty_last: one
    more shard, empty, with `successes: 0`, as img2dataset writes when every URL of a shard failed."""
    storage.makedirs(root)
    samples = iter(generate("pool", shards * per_shard, seed, image_size=40))
    for s in range(shards + empty_last):
        buffer = io.BytesIO()
        count = per_shard if s < shards else 0
        with TarWriter(buffer) as writer:
            for i in range(count):
                sample = next(samples)
                key = f"{s:05d}{i:04d}"
                wide = Image.new("RGB", (80, 40), sample.image.getpixel((0, 0)))
                wide.paste(sample.image, (20, 0))
                jpg = io.BytesIO()
                wide.save(jpg, format="JPEG", quality=90)
                writer.write({"__key__": key, "jpg": jpg.getvalue(), "txt": sample.caption.encode(),
                              "json": json.dumps({"key": key, "status": "success",
                                                  "caption": sample.caption}).encode()})
        storage.write_bytes(storage.join(root, f"{s:05d}.tar"), buffer.getvalue())
        storage.write_bytes(storage.join(root, f"{s:05d}_stats.json"),
                            json.dumps({"successes": count, "failed_to_download": per_shard - count}).encode())
    return root


def write_team_data(root: str) -> str:
    """A team's three datasets, each an img2dataset download with an empty last shard: root/curated (2 shards of
    16), root/laion (the pool: 3 of 16) and root/eval (1 of 16); different images, the same keys (each download
    numbers its samples from 0)."""
    write_img2dataset_layout(storage.join(root, "curated"), shards=2, seed=1)
    write_img2dataset_layout(storage.join(root, "laion"), shards=3, seed=0)
    write_img2dataset_layout(storage.join(root, "eval"), shards=1, seed=2)
    return root


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def register_config(team: str, out_dir: str, **overrides) -> MakeDataConfig:
    specs = dict(curated=f"{team}/curated/{{00000..00002}}.tar", pool=f"{team}/laion", eval=f"{team}/eval/00000.tar")
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


def test_register_checks_records_and_never_writes_into_the_data(tmp_path, capsys):
    team = write_team_data(str(tmp_path / "team"))
    data = f"{team}/laion"
    before = snapshot(tmp_path / "team")
    result = make_data(register_config(team, str(tmp_path / "run" / "data")))
    assert {name: s.num_samples for name, s in result.splits.items() if name != "overlap"} == {
        "curated": 32, "pool": 48, "eval": 16}
    # later stages read the training splits as resolved here (one shard list each), evaluation its spec
    listed = str(tmp_path / "run" / "data" / "pool.shardlist.json")
    assert result.splits["pool"].path == listed and result.splits["pool"].spec == data
    assert result.splits["eval"].path == result.splits["eval"].spec == f"{team}/eval/00000.tar"
    assert result.checks["pool"]["images_decoded"] == 32
    assert result.checks["eval"]["image_sizes"] == [[40, 80]]
    from flexi_jest.tracking import numeric_metrics  # what MLflow logs of the result: no URL in a metric name
    assert not any("/" in name for name in numeric_metrics(result.model_dump()))
    registration = json.loads((tmp_path / "run" / "data" / "registration.json").read_text())
    assert [s["url"] for s in registration["splits"]["pool"]["shards"]] == [f"{data}/{i:05d}.tar" for i in range(4)]
    # img2dataset's empty last shard, by name: in the result, in registration.json and on stdout
    empty = [f"{data}/00003.tar"]
    assert result.checks["pool"]["empty_shards"] == empty == registration["splits"]["pool"]["empty_shards"]
    assert result.checks["curated"]["empty_shards"] == [f"{team}/curated/00002.tar"]
    printed = capsys.readouterr().out
    assert f"warning: pool: 1 empty shard (no sample; training never draws it): {data}/00003.tar" in printed
    assert any("00003.tar" in w for w in registration["warnings"])
    # separate downloads number their samples alike: shared keys, no shared image, a warning only
    assert result.checks["overlap"]["pool_and_eval"] == {
        "shared_keys": 16, "shared_images": 0, "example_keys": ["000000000", "000000001", "000000002"],
        "example_images": []}
    assert "share 16 sample keys" in printed and "this alone is not leakage" in printed
    outputs = run_stages(result, str(tmp_path / "run"))
    # the cache went beside the reference (the run's storage), not into the team's data
    assert outputs["cache"].cache_dir.startswith(str(tmp_path / "run" / "reference"))
    assert outputs["cache"].num_samples == 48
    assert outputs["learner"].steps == 2 and outputs["metrics"].splits
    assert snapshot(tmp_path / "team") == before


def test_a_split_with_no_readable_sample_is_refused_naming_it(tmp_path):
    """An img2dataset download whose every URL failed: before, registration recorded `samples: 0` and training
    failed later (or by chance)."""
    team = write_team_data(str(tmp_path / "team"))
    empty = f"{team}/laion/00003.tar"
    with pytest.raises(SpecError, match=rf"'{empty}' \(pool\) holds no sample: every shard is empty by its counts"):
        make_data(register_config(team, str(tmp_path / "a"), pool=empty))
    (tmp_path / "team" / "laion" / "00003_stats.json").unlink()  # without counts: found empty by reading it
    with pytest.raises(SpecError, match=r"\(pool\) holds no readable sample: each of the 1 shards read is empty"):
        make_data(register_config(team, str(tmp_path / "b"), pool=empty))
    (tmp_path / "team" / "laion" / "00000_stats.json").write_text(json.dumps({"successes": 0}))  # a count that lies
    with pytest.raises(SpecError, match=r"shard .*laion/00000.tar holds 16 samples but its count .* says 0"):
        make_data(register_config(team, str(tmp_path / "c")))


def test_an_eval_split_sharing_images_with_training_data_is_refused_unless_allowed(tmp_path, capsys):
    """curated = pool = eval: before, registered without a word, and evaluation on the pool inflated the metric
    promotion uses."""
    team = write_team_data(str(tmp_path / "team"))
    pool = f"{team}/laion"
    with pytest.raises(SpecError,
                       match=r"curated and eval share 48 images \(identical bytes\) in the shards read, e\.g\. "
                                        r"000000000 = 000000000.*; pool and eval share 48 images.*"
                                        r"set allow_eval_overlap: true"):
        make_data(register_config(team, str(tmp_path / "a"), curated=pool, eval=pool))
    with pytest.raises(SpecError, match=r"curated and eval share 16 images"):  # eval is a curated shard
        make_data(register_config(team, str(tmp_path / "a"), eval=f"{team}/curated/00001.tar"))
    allowed = make_data(register_config(team, str(tmp_path / "b"), curated=pool, eval=pool, allow_eval_overlap=True))
    assert allowed.checks["overlap"]["curated_and_pool"]["shared_images"] == 48
    printed = capsys.readouterr().out
    assert "warning: curated and pool share 48 images" in printed
    assert "warning: pool and eval share 48 images" in printed
    registration = json.loads((tmp_path / "b" / "registration.json").read_text())
    assert registration["overlap"]["pool_and_eval"]["shared_images"] == 48


def test_unknown_counts_are_counted_when_cheap_and_allowed_when_not(tmp_path):
    team = write_team_data(str(tmp_path / "team"))
    for stats in (tmp_path / "team").rglob("*_stats.json"):
        stats.unlink()
    counted = make_data(register_config(team, str(tmp_path / "a")))
    assert counted.splits["pool"].num_samples == 48 and counted.checks["pool"]["counted_by_reading"]
    assert counted.checks["pool"]["empty_shards"] == [f"{team}/laion/00003.tar"]  # found by reading it
    unknown = make_data(register_config(team, str(tmp_path / "b"), count_max_shards=2))
    assert unknown.splits["pool"].num_samples is None  # a pool may be too large to count
    explicit = make_data(register_config(team, str(tmp_path / "c"), count_max_shards=0, num_samples={"pool": 1000}))
    assert explicit.splits["pool"].num_samples == 1000


def test_bad_registrations_fail_naming_the_spec_or_the_field(tmp_path):
    team = write_team_data(str(tmp_path / "team"))
    data = f"{team}/laion"
    with pytest.raises(SpecError, match=r"missing shard .*00004.tar \(and 3 more of 8\)"):
        make_data(register_config(team, str(tmp_path / "run"), pool=f"{data}/{{00000..00007}}.tar"))
    with pytest.raises(SpecError, match="out_dir .* is inside the registered pool data"):
        make_data(register_config(team, f"{data}/registered"))
    (tmp_path / "team" / "laion" / "00002.tar").write_bytes(b"not a tar")
    with pytest.raises(SpecError, match=r"\(pool\): cannot read shard .*00002.tar: corrupt_shard"):
        make_data(register_config(team, str(tmp_path / "run")))
    with pytest.raises(ConfigError, match="source 'register' needs a dataset spec for pool"):
        validated_stage_config("make-data", "tiny", {"source": "register", "curated": data, "eval": data})
    with pytest.raises(ConfigError, match="are read with source 'register'"):
        validated_stage_config("make-data", "tiny", {"pool": data})


@pytest.mark.parametrize("spelling", ["{team}/./laion", "{team}/curated/../laion/registered", "file://{data}",
                                      "{link}/registered"])
def test_the_out_dir_guard_compares_resolved_paths(tmp_path, spelling):
    """Before, the guard compared strings: `DATA/./pool` or `file://.../pool` wrote registration.json and
    result.json into the user's dataset."""
    team = write_team_data(str(tmp_path / "team"))
    data = f"{team}/laion"
    (tmp_path / "link").symlink_to(tmp_path / "team" / "laion")
    before = snapshot(tmp_path / "team")
    out_dir = spelling.format(team=team, data=data, link=tmp_path / "link")
    with pytest.raises(SpecError, match="is inside the registered pool data"):
        make_data(register_config(team, out_dir))
    assert snapshot(tmp_path / "team") == before


IMG2DATASET_SPECS = {"curated": "{root}/00000.tar", "eval": "{root}/00001.tar", "pool": "{root}/{{00002..00004}}.tar"}


def img2dataset_config(root: str, out_dir: str, **overrides) -> MakeDataConfig:
    """Registration of the img2dataset fixture's download (conftest.img2dataset_dir): curated its first shard, eval
    its second, the pool the rest, its empty last shard included."""
    specs = {name: spec.format(root=root) for name, spec in IMG2DATASET_SPECS.items()}
    return MakeDataConfig(source="register", out_dir=out_dir, **{**specs, **overrides})


# img2dataset starts processes that import pandas, pyarrow and wandb: about a minute on 2 shared cores
@pytest.mark.slow
@BOTH_S3
def test_an_img2dataset_pool_local_and_on_s3_runs_through_every_stage(img2dataset_dir, s3, tmp_path):
    local = make_data(img2dataset_config(str(img2dataset_dir), str(tmp_path / "local")))
    assert local.splits["pool"].num_samples == 40  # 41 URLs, 1 of them broken, alone in the last shard
    assert local.checks["pool"]["empty_shards"] == [f"{img2dataset_dir}/00004.tar"]
    for path in img2dataset_dir.iterdir():
        storage.upload_file(path, f"{s3}/laion/{path.name}")
    remote = make_data(img2dataset_config(f"{s3}/laion", f"{s3}/run/data"))
    assert {n: s.num_samples for n, s in remote.splits.items()} == {n: s.num_samples for n, s in local.splits.items()}
    assert remote.checks["pool"]["empty_shards"] == [f"{s3}/laion/00004.tar"]
    assert storage.exists(f"{s3}/run/data/registration.json")
    outputs = run_stages(remote, f"{s3}/run")
    assert outputs["cache"].cache_dir.startswith(f"{s3}/run/reference/refcache-") and outputs["cache"].num_samples == 40
    assert outputs["metrics"].splits


def test_later_stages_read_the_shards_registered_not_the_data_as_it_is_now(tmp_path):
    """The spec is resolved once, by registration: a shard that appears in the pool afterwards is not cached or
    trained on (the cache and the stream would disagree), and one that disappears stops the learner, naming it."""
    from flexi_jest.reference_cache import cache_reference
    from flexi_jest.train import train_learner, train_reference
    team = write_team_data(str(tmp_path / "team"))
    result = make_data(register_config(team, str(tmp_path / "run" / "data")))
    later = write_img2dataset_layout(str(tmp_path / "later"), shards=1, seed=5, empty_last=False)
    Path(f"{team}/laion/00004.tar").write_bytes(Path(f"{later}/00000.tar").read_bytes())
    Path(f"{team}/laion/00004_stats.json").write_text(json.dumps({"successes": 16}))
    reference = train_reference(TrainReferenceConfig(data=result.splits["curated"].path, model=TEST_MODEL, steps=1,
                                                     out_dir=str(tmp_path / "run" / "reference"), batch_size=16,
                                                     progress=False))
    cache = cache_reference(CacheReferenceConfig(reference=reference.checkpoint, pool=result.splits["pool"].path))
    assert cache.num_samples == 48  # the registered 48, not the 64 now in the directory
    Path(f"{team}/laion/00001.tar").unlink()
    with pytest.raises(SpecError, match=r"pool.shardlist.json: missing shard .*laion/00001.tar; the data changed"):
        train_learner(TrainLearnerConfig(pool=result.splits["pool"].path, reference_cache=cache.cache_dir,
                                         out_dir=str(tmp_path / "run" / "learner"), model=TEST_MODEL,
                                         super_batch_size=40, filter_ratio=0.8, n_chunks=4, steps=1, progress=False))
