"""Fault: a split manifest or a reference-cache manifest names a file outside its directory (../, an absolute
path, another scheme). Every such name is refused, with the manifest and the name in the error, before it is read:
a split's by specs.resolve, which every reader calls, and so by the entry points production reads through (the
training stream, the evaluation reader, the reference's caching pass, registration); a cache's by ReferenceCache."""

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from flexi_jest import storage
from flexi_jest.config import CacheReferenceConfig, EvalSet, MakeDataConfig
from flexi_jest.data.eval_sets import open_eval_set
from flexi_jest.data.loader import StreamLoader
from flexi_jest.data.manifest import UnsafeShardNameError
from flexi_jest.data.register import register_data
from flexi_jest.data.sample import Sample
from flexi_jest.data.shards import write_split
from flexi_jest.data.specs import resolve
from flexi_jest.reference_cache import MANIFEST_DIGEST, CacheError, ReferenceCache, cache_reference, manifest_digest
from readers import cache_pass

ESCAPES = ["../../secret/outside.tar", "../outside.tar", "/tmp/secret/outside.tar", "s3://other-bucket/outside.tar",
           "file:///tmp/secret/outside.tar", "a/../../outside.tar", "./shard.tar", "a//b.tar", "..\\outside.tar"]


def samples(n: int, prefix: str):
    for i in range(n):
        yield Sample(key=f"{prefix}-{i:04d}", image=Image.new("RGB", (8, 8), (i, 2 * i, 3 * i)),
                     caption=f"{prefix} caption {i}", meta={})


@pytest.fixture
def split_with_secret_outside(tmp_path):
    """tmp/data/split (a good split) and tmp/secret/outside.tar (a readable shard that must never be used)."""
    write_split(samples(4, "secret"), str(tmp_path / "secret"), samples_per_shard=10)
    (tmp_path / "secret" / "shard-000000.tar").rename(tmp_path / "secret" / "outside.tar")
    split = tmp_path / "data" / "split"
    write_split(samples(6, "ok"), str(split), samples_per_shard=3)
    return split


@pytest.mark.parametrize("name", ESCAPES)
def test_split_manifest_naming_a_file_outside_the_split_is_refused(split_with_secret_outside, name):
    split = split_with_secret_outside
    manifest = json.loads((split / "manifest.json").read_text())
    manifest["shards"][1]["name"] = name
    (split / "manifest.json").write_text(json.dumps(manifest))
    spec = str(split)
    readers = {
        "resolve": lambda: resolve(spec),  # the dataset spec every reader resolves
        "stream": lambda: StreamLoader(spec, 1, mode="epoch"),
        "eval": lambda: open_eval_set(EvalSet(uri=spec)),
        "cache": lambda: cache_pass(spec, spec + "-cache"),
        "register": lambda: register_data(MakeDataConfig(source="register", out_dir=spec + "-registered",
                                                         curated=spec, pool=spec, eval=spec)),
    }
    for reader, read in readers.items():
        with pytest.raises(UnsafeShardNameError) as error:  # a ShardError and a storage.UnsafeNameError
            read()
        assert "manifest.json" in str(error.value) and repr(name) in str(error.value), reader
    assert sorted(p.name for p in split.parent.iterdir()) == ["split"]  # no reader wrote anything


def test_names_inside_the_directory_are_accepted():
    assert storage.confined("s3://b/pool", "shard-000001.tar", "m") == "s3://b/pool/shard-000001.tar"
    assert storage.confined("/data/pool", "sub/shard-000001.tar", "m") == "/data/pool/sub/shard-000001.tar"
    assert storage.confined("pool", "shard..1.tar", "m") == "pool/shard..1.tar"


@pytest.mark.parametrize("name", ["../../secret/outside.npz", "/tmp/secret/x.npz", "s3://other/x.npz", "a/../../x.npz"])
def test_cache_manifest_naming_a_file_outside_the_cache_is_refused(shapes_data, reference, tmp_path, name):
    """Even with the manifest's digest recomputed (a deliberate plant, not an accident)."""
    cache = cache_reference(CacheReferenceConfig(reference=reference.checkpoint, pool=shapes_data.splits["pool"].path,
                                                 out_dir=str(tmp_path / "cache")))
    outside = tmp_path / "secret"
    outside.mkdir()
    shutil.copy(tmp_path / "cache" / "shard-000000.npz", outside / "outside.npz")
    manifest_path = tmp_path / "cache" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    shard = storage.join(shapes_data.splits["pool"].path, "shard-000000.tar")  # the cache keys shards by URL
    manifest["shards"][shard]["file"] = name
    manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CacheError) as error:
        ReferenceCache(cache.cache_dir).load_shard(shard)
    assert str(manifest_path) in str(error.value) and repr(name) in str(error.value)
    assert np.load(io.BytesIO((outside / "outside.npz").read_bytes()))["keys"].shape[0] == 300  # it was there
