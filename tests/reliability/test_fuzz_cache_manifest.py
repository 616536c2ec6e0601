"""Fault: a reference-cache manifest that is random bytes, truncated or bit-flipped JSON, arbitrary JSON, or a
real manifest with fields removed or replaced by arbitrary JSON, with or without its digest recomputed (a
writer that is consistent but wrong, or an edit that also fixed up the digest).

Expected (the contract of reference_cache.ReferenceCache and its join): the cache opens and joins, or a
CacheError (or, for a sidecar the manifest names that is not there, a StorageError) naming the cache;
never another exception, never a hang. Every sidecar the manifest names is loaded (checksum, shapes, keys).
"""

import json
import shutil

import pytest
import torch
from faults import FUZZ_EXAMPLES, colour_samples, draw_damaged_bytes, fuzz_settings, no_hang
from fuzz_inputs import json_values
from hypothesis import given
from hypothesis import strategies as st

from conftest import TEST_MODEL
from flexi_jest import reference_cache, storage
from flexi_jest.checkpoint import save_model
from flexi_jest.config import CacheReferenceConfig
from flexi_jest.data.shards import write_split
from flexi_jest.models import DualEncoder
from flexi_jest.reference_cache import CacheError, ReferenceCache, cache_reference


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """(pool dir, cache dir, its manifest) of a real cache over an 8-sample, 2-shard pool."""
    root = tmp_path_factory.mktemp("cache")
    pool = str(root / "pool")
    write_split(colour_samples(8), pool, samples_per_shard=4)
    torch.manual_seed(0)
    save_model(DualEncoder(TEST_MODEL), str(root / "reference.pt"))
    made = cache_reference(CacheReferenceConfig(reference=str(root / "reference.pt"), pool=pool, device="cpu",
                                                out_dir=str(root / "refcache")))
    return pool, made.cache_dir, json.loads(storage.read_bytes(storage.join(made.cache_dir, "manifest.json")))


def redigest(manifest):
    """The manifest with its digest made consistent again, where the cache format has one."""
    digest = getattr(reference_cache, "manifest_digest", None)
    if digest is not None and isinstance(manifest, dict):
        manifest[getattr(reference_cache, "MANIFEST_DIGEST", "manifest_sha256")] = digest(manifest)
    return manifest


@st.composite
def damaged_cache_manifests(draw, valid: dict) -> bytes:
    kind = draw(st.sampled_from(["random", "json", "field", "shard_field", "bytes"]))
    if kind == "random":
        return draw(st.binary(max_size=2048))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    manifest = json.loads(json.dumps(valid))
    if kind == "field":
        field = draw(st.sampled_from(sorted(manifest)))
        if draw(st.booleans()):
            manifest[field] = draw(json_values)
        else:
            del manifest[field]
    if kind == "shard_field":
        entry = manifest["shards"][draw(st.sampled_from(sorted(manifest["shards"])))]
        field = draw(st.sampled_from(sorted(entry)))
        if draw(st.booleans()):
            entry[field] = draw(json_values)
        else:
            del entry[field]
    if kind in ("field", "shard_field") and draw(st.booleans()):
        manifest = redigest(manifest)
    data = json.dumps(manifest).encode()
    if kind == "bytes":
        data = draw_damaged_bytes(draw, data)
    return data


@fuzz_settings(max_examples=4 * FUZZ_EXAMPLES)  # an input costs milliseconds; the digest-consistent ones are rarer
@given(data=st.data())
def test_fuzz_cache_manifest_opens_or_fails_with_a_cache_error(tmp_path_factory, cache, data):
    pool, cache_dir, valid = cache
    copy = str(tmp_path_factory.mktemp("copy") / "refcache")
    shutil.copytree(cache_dir, copy)
    storage.write_bytes(storage.join(copy, "manifest.json"), data.draw(damaged_cache_manifests(valid)))
    with no_hang():
        try:
            opened = ReferenceCache(copy, pool)
            for name in opened.manifest["shards"]:  # every sidecar the manifest names, loaded and checked
                index, image_emb, text_emb = opened.load_shard(name)[:3]
                assert image_emb.shape == text_emb.shape == (len(index), opened.manifest["embed_dim"])
        except (CacheError, storage.StorageError) as exc:
            assert copy in str(exc)


def test_the_undamaged_cache_opens_and_joins(cache):
    pool, cache_dir, _ = cache
    opened = ReferenceCache(cache_dir, pool)
    loaded = [opened.load_shard(name) for name in opened.manifest["shards"]]
    assert sum(len(index) for index, *_ in loaded) == 8
    assert all(image_emb.shape[1] == TEST_MODEL.embed_dim for _, image_emb, *_ in loaded)
