import json
import shutil

import pytest
import torch
from pydantic import ValidationError

from conftest import TEST_MODEL
from flexi_jest.checkpoint import load_model
from flexi_jest.config import CacheReferenceConfig, TrainLearnerConfig, TrainReferenceConfig
from flexi_jest.data.noise import SAMPLE_KINDS
from flexi_jest.reference_cache import CacheError, ReferenceCache, cache_reference
from flexi_jest.train import train_learner, train_reference
from readers import read_split


def learner_config(shapes_data, cache, out_dir, **overrides) -> TrainLearnerConfig:
    values = dict(pool=shapes_data.splits["pool"].path, reference_cache=cache.cache_dir,
                  reference_sha256=cache.reference_sha256, out_dir=str(out_dir), model=TEST_MODEL,
                  super_batch_size=40, filter_ratio=0.8, n_chunks=4, steps=6, checkpoint_every=3,
                  progress=False, log_every=1)
    values.update(overrides)
    return TrainLearnerConfig(**values)


def test_reference_training_reduces_its_loss(reference):
    history = [json.loads(line) for line in open(reference.metrics_path)]
    assert len(history) == 1 + (8 - 1) // 10 or history  # logged
    assert reference.steps == 8
    assert reference.flops.reference_training > 0 and reference.total_flops == reference.flops.reference_training
    model, sha = load_model(reference.checkpoint)
    assert sha == reference.checkpoint_sha256


def test_cache_covers_the_pool_and_matches_a_fresh_forward(reference, reference_cache, shapes_data):
    assert reference_cache.num_samples == shapes_data.splits["pool"].num_samples
    cache = ReferenceCache(reference_cache.cache_dir, shapes_data.splits["pool"].path, reference.checkpoint_sha256)
    index, image_emb, text_emb, _ = cache.load_shard(shapes_data.splits["pool"].path + "/shard-000000.tar")
    assert image_emb.dtype.name == "float16" and image_emb.shape == (300, TEST_MODEL.embed_dim)
    model, _ = load_model(reference.checkpoint)
    model.eval()
    sample = next(read_split(shapes_data.splits["pool"].path, TEST_MODEL.image_size))
    from flexi_jest.models import Tokenizer
    with torch.no_grad():
        fresh = model.encode_text(Tokenizer(TEST_MODEL)([sample["caption"]]))[0]
    cached = torch.from_numpy(text_emb[index[sample["key"]]]).float()
    assert torch.allclose(fresh, cached, atol=2e-3)


@pytest.mark.parametrize("method,score", [("joint", "learnability"), ("independent", "easy_reference"),
                                          ("uniform", "learnability"), ("joint", "hard_learner")])
def test_learner_methods_run_and_account_flops(shapes_data, reference_cache, tmp_path, method, score):
    result = train_learner(learner_config(shapes_data, reference_cache, tmp_path, method=method, score=score,
                                          steps=3, reference_training_flops=1e9, reference_caching_flops=2e9))
    assert result.steps == 3
    assert result.flops.learner_training > 0
    if method == "uniform":
        assert result.flops.learner_scoring == 0 and result.total_flops == result.flops.learner_training
    else:
        assert result.flops.learner_scoring > 0
        assert "selection_seconds" in result.selection
    uses_reference = method != "uniform" and score != "hard_learner"
    assert (result.flops.reference_training == 1e9) == uses_reference


def test_flexi_scoring_is_cheaper_than_full_resolution_scoring(shapes_data, reference_cache, tmp_path):
    full = train_learner(learner_config(shapes_data, reference_cache, tmp_path / "a", steps=1))
    flexi = train_learner(learner_config(shapes_data, reference_cache, tmp_path / "b", steps=1,
                                         scoring_patch_size=16, train_patch_sizes=[8, 16]))
    from flexi_jest.flops import image_forward_flops
    saved = 40 * (image_forward_flops(TEST_MODEL, 8) - image_forward_flops(TEST_MODEL, 16))  # 40 = super-batch
    assert full.flops.learner_scoring - flexi.flops.learner_scoring == saved > 0
    assert flexi.flops.learner_training < full.flops.learner_training


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_to_identical_weights(shapes_data, reference_cache, tmp_path, monkeypatch):
    straight = train_learner(learner_config(shapes_data, reference_cache, tmp_path / "straight"))

    from flexi_jest.data.loader import StreamLoader
    original_next, calls = StreamLoader.next_batch, {"n": 0}

    def next_then_die(self):
        calls["n"] += 1
        if calls["n"] == 5:  # during step 5, after the checkpoint at step 3
            raise Interrupt()
        return original_next(self)

    monkeypatch.setattr(StreamLoader, "next_batch", next_then_die)
    with pytest.raises(Interrupt):
        train_learner(learner_config(shapes_data, reference_cache, tmp_path / "resumed"))
    monkeypatch.setattr(StreamLoader, "next_batch", original_next)
    resumed = train_learner(learner_config(shapes_data, reference_cache, tmp_path / "resumed"))

    a, _ = load_model(straight.checkpoint)
    b, _ = load_model(resumed.checkpoint)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert resumed.total_flops == straight.total_flops
    steps = [json.loads(line)["step"] for line in open(resumed.metrics_path)]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_cache_from_another_reference_is_rejected(shapes_data, reference_cache, tmp_path):
    with pytest.raises(CacheError, match="made by reference"):
        train_learner(learner_config(shapes_data, reference_cache, tmp_path, reference_sha256="0" * 64))


def test_missing_cache_is_a_clear_error(shapes_data, reference_cache, tmp_path):
    with pytest.raises(CacheError, match="no reference cache"):
        cfg = learner_config(shapes_data, reference_cache, tmp_path)
        train_learner(cfg.model_copy(update={"reference_cache": str(tmp_path / "none")}))


def test_missing_cache_entry_names_the_sample(shapes_data, reference, tmp_path):
    pool = tmp_path / "pool"
    shutil.copytree(shapes_data.splits["pool"].path, pool, ignore=shutil.ignore_patterns("refcache-*"))
    cache = cache_reference(CacheReferenceConfig(reference=reference.checkpoint, pool=str(pool),
                                                 out_dir=str(tmp_path / "c")))
    # drop one key from a sidecar, keeping the manifest's checksums consistent, as a partial cache would be
    import io

    import numpy as np

    from flexi_jest import storage
    from flexi_jest.reference_cache import MANIFEST_DIGEST, manifest_digest
    manifest_path = tmp_path / "c" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    with np.load(tmp_path / "c" / "shard-000001.npz") as arrays:
        kept = {k: arrays[k][1:] for k in ("keys", "image_emb", "text_emb", "content_sha256")}
    buffer = io.BytesIO()
    np.savez(buffer, **kept)
    (tmp_path / "c" / "shard-000001.npz").write_bytes(buffer.getvalue())
    manifest["shards"][f"{pool}/shard-000001.tar"].update(sha256=storage.sha256_bytes(buffer.getvalue()),
                                                         num_samples=len(kept["keys"]))
    manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="is not in the reference cache"):
        train_learner(learner_config(shapes_data, cache, tmp_path / "l", pool=str(pool), steps=30))


def test_corrupt_cache_file_fails_its_checksum(shapes_data, reference, tmp_path):
    cache = cache_reference(CacheReferenceConfig(reference=reference.checkpoint, pool=shapes_data.splits["pool"].path,
                                                 out_dir=str(tmp_path / "c")))
    (tmp_path / "c" / "shard-000000.npz").write_bytes(b"garbage")
    with pytest.raises(CacheError, match="checksum"):
        train_learner(learner_config(shapes_data, cache, tmp_path / "l", steps=30))


def test_config_rejects_bad_values_with_the_field_named():
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="filter_ratio"):
        TrainLearnerConfig(filter_ratio=1.5, reference_cache="x")
    with pytest.raises(ValidationError, match="reference_cache is required"):
        TrainLearnerConfig(method="joint")
    with pytest.raises(ValidationError, match="unknown_field"):
        TrainLearnerConfig(reference_cache="x", unknown_field=1)
    with pytest.raises(ValidationError, match="scoring_patch_size 7"):
        TrainLearnerConfig(reference_cache="x", scoring_patch_size=7)
    from flexi_jest.config import MakeDataConfig
    for noise, message in (({"mismatched": True}, "boolean True"), ({"blank": float("nan")}, "blank"),
                           ({"corrupted": 0.7, "blank": 0.5}, "sum to at most 1"), ({"typo": 0.1}, "typo")):
        with pytest.raises(ValidationError, match=message):
            MakeDataConfig(out_dir="x", noise=noise)


def test_periodic_evaluation_is_recorded_against_flops(shapes_data, reference_cache, tmp_path):
    result = train_learner(learner_config(shapes_data, reference_cache, tmp_path, steps=4, log_every=10, eval_every=2,
                                          eval_data=[shapes_data.splits["eval"].path], eval_max_samples=50))
    history = [json.loads(line) for line in open(result.metrics_path)]
    evaluated = [h for h in history if "eval" in h]
    assert [h["step"] for h in evaluated] == [2, 4]
    assert evaluated[0]["total_flops"] < evaluated[1]["total_flops"]
    assert 0.0 <= evaluated[1]["eval"]["shapes.top1"] <= 1.0 and "shapes.image_to_text_r1" in evaluated[1]["eval"]


@pytest.mark.slow  # reason: torch.compile of the training step on the CPU (Inductor's C++ build), 81 s on 2 cores
def test_compiled_training_matches_eager(shapes_data, tmp_path):
    """compile=True (the GPU speed path's torch.compile) trains the same model; here with inductor on the CPU."""
    fields = dict(data=shapes_data.splits["curated"].path, model=TEST_MODEL, steps=2, batch_size=16, progress=False,
                  log_every=1, device="cpu")
    eager = train_reference(TrainReferenceConfig(out_dir=str(tmp_path / "eager"), **fields))
    compiled = train_reference(TrainReferenceConfig(out_dir=str(tmp_path / "compiled"), compile=True, **fields))
    assert compiled.final_loss == pytest.approx(eager.final_loss, rel=1e-4)


def test_offline_filter_keeps_the_top_fraction_of_the_pool_by_reference_cosine(shapes_data, reference_cache):
    """The kept set is exactly the top round(k N) of the pool by the reference's cached image-text cosine."""
    from flexi_jest.reference_cache import OfflineFilter
    from flexi_jest.selection import pair_cosines
    cache = ReferenceCache(reference_cache.cache_dir, shapes_data.splits["pool"].path)
    offline = OfflineFilter(cache, 0.3)
    assert offline.pool_size == shapes_data.splits["pool"].num_samples
    assert offline.kept == round(0.3 * offline.pool_size)
    cosines = {}
    for shard in cache.manifest["shards"]:
        index, image_emb, text_emb, _ = cache.load_shard(shard)
        row_cosines = pair_cosines(torch.from_numpy(image_emb), torch.from_numpy(text_emb))
        cosines.update({key: float(row_cosines[row]) for key, row in index.items()})
    kept = [cosines[key] for key in offline.kept_keys]
    dropped = [value for key, value in cosines.items() if key not in offline.kept_keys]
    assert min(kept) == pytest.approx(offline.threshold) and max(dropped) <= offline.threshold


def test_offline_filter_trains_uniformly_on_the_kept_samples_and_is_charged_the_reference(
        shapes_data, reference_cache, tmp_path, monkeypatch):
    """The stream drops (and counts) the samples below the threshold; the kept fraction is k; no learner scoring
    FLOPs; the reference's training and caching are charged, the cosines with the caching."""
    from flexi_jest import train as train_module
    from flexi_jest.reference_cache import OfflineFilter
    seen: list[str] = []
    original = train_module.OfflineFilter.__call__

    def recording(self, shard_name, raws):
        for raw in original(self, shard_name, raws):
            seen.append(raw["__key__"])
            yield raw

    filters: list[OfflineFilter] = []
    monkeypatch.setattr(train_module.OfflineFilter, "__call__", recording)
    monkeypatch.setattr(train_module, "OfflineFilter", lambda *a: filters.append(OfflineFilter(*a)) or filters[-1])
    pool = shapes_data.splits["pool"].num_samples
    result = train_learner(learner_config(shapes_data, reference_cache, tmp_path, method="offline-filter",
                                          offline_keep_ratio=0.25, steps=40, super_batch_size=40,
                                          reference_training_flops=1e9, reference_caching_flops=2e9))
    offline = filters[0]
    assert set(seen) <= offline.kept_keys and len(set(seen)) == offline.kept == round(0.25 * pool)
    assert offline.dropped >= pool - offline.kept  # 40 steps x 8 = 320 > the 225 kept: one epoch at least
    assert result.selection["offline_kept_fraction"] == pytest.approx(0.25, abs=1e-3)
    assert result.flops.learner_scoring == 0
    assert result.flops.reference_training == 1e9
    assert result.flops.reference_caching == pytest.approx(2e9 + 6 * pool * TEST_MODEL.embed_dim)


def test_filter_then_jest_selects_only_among_the_samples_the_offline_filter_kept(
        shapes_data, reference_cache, tmp_path, monkeypatch):
    """filter+jest (prefilter_keep_ratio): the stream keeps the pool's top fraction by the reference's cosine,
    with their reference embeddings attached; joint selection then picks the sub-batch from those only. The
    learner scores its super-batch (scoring FLOPs) and is charged the reference, the cosines with its caching."""
    from flexi_jest import train as train_module
    from flexi_jest.reference_cache import OfflineFilter
    filters: list[OfflineFilter] = []
    monkeypatch.setattr(train_module, "OfflineFilter", lambda *a: filters.append(OfflineFilter(*a)) or filters[-1])
    drawn: list[str] = []
    original = train_module.ReferenceCache.attach

    def recording(self, shard_name, raws):
        for raw in original(self, shard_name, raws):
            assert "ref_image_emb" in raw
            drawn.append(raw["__key__"])
            yield raw

    monkeypatch.setattr(train_module.ReferenceCache, "attach", recording)
    pool = shapes_data.splits["pool"].num_samples
    result = train_learner(learner_config(shapes_data, reference_cache, tmp_path, method="joint",
                                          prefilter_keep_ratio=0.25, steps=6, super_batch_size=40, n_chunks=2,
                                          reference_training_flops=1e9, reference_caching_flops=2e9))
    prefilter = filters[0]
    assert prefilter.keep_ratio == 0.25 and drawn and set(drawn) <= prefilter.kept_keys
    assert result.selection["offline_kept_fraction"] == pytest.approx(0.25, abs=1e-3)
    assert result.flops.learner_scoring > 0 and result.flops.reference_training == 1e9
    assert result.flops.reference_caching == pytest.approx(2e9 + 6 * pool * TEST_MODEL.embed_dim)
    shares = [result.selection[f"selected_{kind}"] for kind in SAMPLE_KINDS]
    assert sum(shares) == pytest.approx(1.0)


def test_prefilter_is_for_selection_methods_with_a_reference_cache(shapes_data, reference_cache, tmp_path):
    with pytest.raises(ValidationError, match="prefilter_keep_ratio is for method 'independent' or 'joint'"):
        learner_config(shapes_data, reference_cache, tmp_path, method="uniform", prefilter_keep_ratio=0.3)
    with pytest.raises(ValidationError, match="reference_cache is required with prefilter_keep_ratio"):
        TrainLearnerConfig(pool=shapes_data.splits["pool"].path, out_dir=str(tmp_path), model=TEST_MODEL,
                           method="joint", score="hard_learner", prefilter_keep_ratio=0.3)


def test_offline_filter_keeps_fewer_noisy_samples_than_the_pool_holds(shapes_data, reference, tmp_path):
    """With a reference that has learnt something, the top 30 % by cosine is cleaner than the pool (the pool
    records each sample's noise kind in its json)."""
    from flexi_jest.reference_cache import OfflineFilter
    trained = train_reference(TrainReferenceConfig(
        data=shapes_data.splits["curated"].path, out_dir=str(tmp_path / "reference"), model=TEST_MODEL, steps=60,
        batch_size=64, progress=False, init_checkpoint=reference.checkpoint))
    cache_dir = str(tmp_path / "cache")
    cache_reference(CacheReferenceConfig(reference=trained.checkpoint, pool=shapes_data.splits["pool"].path,
                                         out_dir=cache_dir, batch_size=128))
    offline = OfflineFilter(ReferenceCache(cache_dir), 0.3)
    noise = {s["key"]: s["meta"].get("noise", "clean") for s in read_split(shapes_data.splits["pool"].path)}
    pool_noisy = sum(kind != "clean" for kind in noise.values()) / len(noise)
    kept_noisy = sum(noise[key] != "clean" for key in offline.kept_keys) / offline.kept
    print(f"offline filter 30 %: noisy share kept {kept_noisy:.3f}, pool {pool_noisy:.3f}")
    assert pool_noisy > 0.4 and kept_noisy < pool_noisy - 0.15, (kept_noisy, pool_noisy)


def test_out_dir_of_another_config_is_refused_naming_the_fields(shapes_data, reference_cache, tmp_path, capsys):
    """The issue's cases: a rerun with another filter_ratio silently returned the old model; a changed model shape
    failed with a raw state_dict RuntimeError. Now both refuse naming the fields; the same config returns the
    finished result without recomputing and says so; overwrite starts afresh; the data is left as it was."""
    from flexi_jest.run_identity import StaleOutputError

    out = tmp_path / "learner"
    first = train_learner(learner_config(shapes_data, reference_cache, out, steps=2))
    model_file = out / "model.pt"
    written = model_file.stat().st_mtime_ns
    with pytest.raises(StaleOutputError, match=r"filter_ratio: 0\.8 -> 0\.5") as refused:
        train_learner(learner_config(shapes_data, reference_cache, out, steps=2, filter_ratio=0.5))
    assert "--overwrite" in str(refused.value)
    wider = TEST_MODEL.model_copy(update={"vision_width": 96})
    with pytest.raises(StaleOutputError, match=r"model\.vision_width: 48 -> 96"):
        train_learner(learner_config(shapes_data, reference_cache, out, steps=2, model=wider))
    assert model_file.stat().st_mtime_ns == written, "a refused run leaves the earlier one as it was"
    capsys.readouterr()
    again = train_learner(learner_config(shapes_data, reference_cache, out, steps=2, device="cpu", progress=True))
    assert again == first and model_file.stat().st_mtime_ns == written  # runtime-only fields changed: same run
    assert "already holds a finished run of this config" in capsys.readouterr().out
    fresh = train_learner(learner_config(shapes_data, reference_cache, out, steps=2, filter_ratio=0.5, overwrite=True))
    assert fresh.checkpoint_sha256 != first.checkpoint_sha256 and model_file.stat().st_mtime_ns != written
    assert json.loads((out / "run_config.json").read_text())["config"]["filter_ratio"] == 0.5


def test_a_checkpoint_of_another_config_is_not_resumed(shapes_data, reference_cache, tmp_path):
    """An interrupted run's checkpoint (no result yet) resumes only under the same config."""
    from flexi_jest.run_identity import StaleOutputError

    out = tmp_path / "learner"
    train_learner(learner_config(shapes_data, reference_cache, out, steps=3))
    (out / "result.json").unlink()
    (out / "model.pt").unlink()  # as if stopped after the step-3 checkpoint
    with pytest.raises(StaleOutputError, match=r"optim\.lr"):
        train_learner(learner_config(shapes_data, reference_cache, out, steps=3, optim={"lr": 1e-4}))
    resumed = train_learner(learner_config(shapes_data, reference_cache, out, steps=3))
    assert resumed.steps == 3 and (out / "model.pt").exists()


def test_scoring_precision_changes_only_the_scoring_forward(shapes_data, reference_cache, tmp_path, monkeypatch):
    """scoring_precision: the learner's no-grad scoring forward runs under that autocast, training under its own."""
    from flexi_jest import train as train_module
    seen: list[tuple[str, bool]] = []
    original = train_module.autocast

    def recording(device, precision):
        seen.append((precision, torch.is_grad_enabled()))
        return original(device, precision)

    monkeypatch.setattr(train_module, "autocast", recording)
    train_learner(learner_config(shapes_data, reference_cache, tmp_path, steps=2, precision="fp32",
                                 scoring_precision="bf16"))
    assert ("bf16", False) in seen and ("fp32", True) in seen and ("bf16", True) not in seen
