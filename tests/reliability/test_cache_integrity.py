"""Faults in a reference cache that used to train on silently: an edited manifest field, NaN or wrongly shaped
embeddings, a truncated manifest, a pool whose captions changed after caching (no pool manifest to notice), and
duplicate keys. Each is a CacheError naming the cache and what is wrong, from the caching pass (cache_reference), the
cache's reader (ReferenceCache) or, for a changed sample, the training stream joining the cache's embeddings onto the
samples it reads (StreamLoader's attach hook, as training uses it)."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from flexi_jest import storage
from flexi_jest.checkpoint import load_model, save_model
from flexi_jest.config import CacheReferenceConfig
from flexi_jest.reference_cache import MANIFEST_DIGEST, CacheError, ReferenceCache, cache_reference, manifest_digest
from readers import stream_batch


@pytest.fixture
def cache_dir(shapes_data, reference, tmp_path):
    out = tmp_path / "cache"
    cache_reference(CacheReferenceConfig(reference=reference.checkpoint, pool=shapes_data.splits["pool"].path,
                                         out_dir=str(out)))
    return out


def url(cache_dir, shard: str) -> str:
    """A pool shard's URL, by which the cache's manifest keys it."""
    return storage.join(json.loads((cache_dir / "manifest.json").read_text())["pool"], shard)


def edit_manifest(cache_dir, change, recompute_digest: bool) -> None:
    path = cache_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    if recompute_digest:
        manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest))


def rewrite_sidecar(cache_dir, shard: str, change) -> None:
    """Change a sidecar's arrays and keep the manifest consistent with it (sha256, count, digest): only the
    content checks can catch it."""
    path = cache_dir / shard.replace(".tar", ".npz")
    with np.load(path) as arrays:
        values = {k: arrays[k] for k in arrays.files}
    change(values)
    buffer = io.BytesIO()
    np.savez(buffer, **values)
    path.write_bytes(buffer.getvalue())
    key = url(cache_dir, shard)
    edit_manifest(cache_dir, lambda m: m["shards"][key].update(sha256=storage.sha256_bytes(buffer.getvalue())), True)


@pytest.mark.parametrize("field,value", [("logit_scale", 3.0), ("logit_bias", 5.0), ("reference_sha256", "0" * 64),
                                         ("embed_dim", 16)])
def test_an_edited_manifest_field_fails_the_digest(cache_dir, field, value):
    edit_manifest(cache_dir, lambda m: m.update({field: value}), recompute_digest=False)
    with pytest.raises(CacheError, match="fails its digest") as error:
        ReferenceCache(str(cache_dir))
    assert str(cache_dir) in str(error.value)


def test_an_edited_shard_entry_fails_the_digest(cache_dir):
    key = url(cache_dir, "shard-000001.tar")
    edit_manifest(cache_dir, lambda m: m["shards"][key].update(num_samples=3), recompute_digest=False)
    with pytest.raises(CacheError, match="fails its digest"):
        ReferenceCache(str(cache_dir))


def test_a_truncated_manifest_names_the_cache_and_file(cache_dir):
    path = cache_dir / "manifest.json"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CacheError, match="not valid JSON") as error:
        ReferenceCache(str(cache_dir))
    assert str(cache_dir) in str(error.value) and str(path) in str(error.value)


def test_an_older_cache_format_is_refused(cache_dir):
    edit_manifest(cache_dir, lambda m: m.update(format="flexi-jest-refcache/1"), recompute_digest=True)
    with pytest.raises(CacheError, match="refcache/1"):
        ReferenceCache(str(cache_dir))


def test_embeddings_of_the_wrong_size_name_the_cache_and_file(cache_dir):
    rewrite_sidecar(cache_dir, "shard-000001.tar", lambda v: v.update(text_emb=v["text_emb"][:, :16]))
    with pytest.raises(CacheError, match=r"text_emb of shape \(300, 16\)") as error:
        ReferenceCache(str(cache_dir)).load_shard(url(cache_dir, "shard-000001.tar"))
    assert str(cache_dir / "shard-000001.npz") in str(error.value)


def test_a_sidecar_that_is_not_an_npz_names_the_file(cache_dir):
    rewrite_sidecar(cache_dir, "shard-000000.tar", lambda v: v.pop("content_sha256"))
    with pytest.raises(CacheError, match="not a readable sidecar") as error:
        ReferenceCache(str(cache_dir)).load_shard(url(cache_dir, "shard-000000.tar"))
    assert str(cache_dir / "shard-000000.npz") in str(error.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_embeddings_in_a_sidecar_are_refused(cache_dir, bad):
    def poison(values):
        values["image_emb"] = values["image_emb"].copy()
        values["image_emb"][7, 3] = bad
    rewrite_sidecar(cache_dir, "shard-000002.tar", poison)
    with pytest.raises(CacheError, match="non-finite") as error:
        ReferenceCache(str(cache_dir)).load_shard(url(cache_dir, "shard-000002.tar"))
    assert str(cache_dir) in str(error.value) and "shard-000002.tar" in str(error.value)


def test_a_reference_giving_nan_embeddings_writes_no_cache(shapes_data, reference, tmp_path):
    model, _ = load_model(reference.checkpoint)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "text" in n and p.ndim == 2).fill_(float("nan"))
    broken = tmp_path / "nan-reference.pt"
    save_model(model, str(broken))
    with pytest.raises(CacheError, match="non-finite") as error:
        cache_reference(CacheReferenceConfig(reference=str(broken), pool=shapes_data.splits["pool"].path,
                                             out_dir=str(tmp_path / "cache")))
    assert "shard-000000.tar" in str(error.value) and str(tmp_path / "cache") in str(error.value)
    assert not (tmp_path / "cache" / "manifest.json").exists()


def rewrite_tar(path, change) -> None:
    """Rewrite a shard's members through change(name, bytes) -> bytes."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            data = change(member.name, data)
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def pool_without_manifest(shapes_data, tmp_path):
    """The pool's shards as external tars (part-00000N.tar, no manifest): nothing but the cache records them."""
    pool = tmp_path / "pool"
    pool.mkdir()
    for shard in sorted(Path(shapes_data.splits["pool"].path).glob("shard-*.tar")):
        shutil.copy(shard, pool / shard.name.replace("shard-", "part-"))
    return pool


def attach_all(cache: ReferenceCache, pool, shard: str, samples: int = 300) -> int:
    """The training stream over one pool shard with the cache's embeddings joined (cache.attach as StreamLoader's
    attach hook, as training joins them): its first epoch, in one batch of the shard's `samples`, each of which must
    carry the reference's embeddings; returns how many distinct samples it read."""
    batch, _ = stream_batch(storage.join(str(pool), shard), samples, attach=cache.attach)
    assert all(s["ref_image_emb"].shape == s["ref_text_emb"].shape == (cache.manifest["embed_dim"],) for s in batch)
    return len({s["key"] for s in batch})


@pytest.mark.parametrize("member", ["txt", "png"])
def test_a_caption_or_image_changed_after_caching_fails_naming_the_shard(reference, pool_without_manifest, tmp_path,
                                                                         member):
    pool = pool_without_manifest
    cache = cache_reference(CacheReferenceConfig(reference=reference.checkpoint, pool=str(pool),
                                                 out_dir=str(tmp_path / "cache")))
    reader = ReferenceCache(cache.cache_dir, str(pool), reference.checkpoint_sha256)
    assert attach_all(reader, pool, "part-000001.tar") == 300  # unchanged: every sample joins
    changed = {"n": 0}

    def change(name: str, data: bytes) -> bytes:
        if name.endswith("." + member) and changed["n"] == 0:
            changed["n"] = 1
            return b"a caption written after caching" if member == "txt" else data[:-8] + b"\0" * 8
        return data

    rewrite_tar(pool / "part-000001.tar", change)
    with pytest.raises(CacheError, match="another caption or image") as error:
        attach_all(ReferenceCache(cache.cache_dir, str(pool), reference.checkpoint_sha256), pool, "part-000001.tar")
    assert "part-000001.tar" in str(error.value) and cache.cache_dir in str(error.value)
    assert attach_all(reader, pool, "part-000000.tar") == 300  # the other shards still join


def test_duplicate_keys_across_shards_are_refused_when_caching(reference, pool_without_manifest, tmp_path):
    pool = pool_without_manifest
    with tarfile.open(pool / "part-000000.tar") as tar:
        first_key = tar.getmembers()[0].name.split(".")[0]
    with tarfile.open(pool / "part-000002.tar") as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    victim = members[0][0].split(".")[0]  # its first sample takes the key of part-000000's first
    with tarfile.open(pool / "part-000002.tar", "w") as tar:
        for name, data in members:
            if name.split(".")[0] == victim:
                name = first_key + name[len(victim):]
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(CacheError, match=f"key '{first_key}' is in shard") as error:
        cache_reference(CacheReferenceConfig(reference=reference.checkpoint, pool=str(pool),
                                             out_dir=str(tmp_path / "cache")))
    assert "part-000000.tar and in shard" in str(error.value) and "part-000002.tar" in str(error.value)
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_duplicate_keys_across_sidecars_are_refused_when_loading(cache_dir):
    with np.load(cache_dir / "shard-000000.npz") as arrays:
        key = str(arrays["keys"][5])

    def duplicate(values):
        values["keys"] = values["keys"].astype(object)
        values["keys"][0] = key
        values["keys"] = values["keys"].astype(str)
    rewrite_sidecar(cache_dir, "shard-000001.tar", duplicate)
    cache = ReferenceCache(str(cache_dir))
    cache.load_shard(url(cache_dir, "shard-000000.tar"))
    with pytest.raises(CacheError, match=f"key '{key}' is in shard .*shard-000000.tar and in shard .*shard-000001.tar"):
        cache.load_shard(url(cache_dir, "shard-000001.tar"))
