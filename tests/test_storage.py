"""Storage over local paths and over real S3 HTTP (moto's S3-compatible server on loopback, real minio client).

The S3 tests marked @BOTH_S3 run on moto and on SeaweedFS (a real S3 server, tests/seaweedfs.py). moto does not
check credentials: the wrong-credentials path is a unit test of the error mapping (explain_s3_error) and a test
against SeaweedFS, which checks them.
"""

import pytest

from conftest import BOTH_S3, free_port
from flexi_jest import storage
from flexi_jest.data.loader import StreamLoader
from flexi_jest.data.sample import Sample
from flexi_jest.data.shards import ReadStats, write_split
from readers import read_split


def test_local_round_trip_and_listing(tmp_path):
    storage.write_bytes(str(tmp_path / "a" / "x.bin"), b"hello")
    assert storage.read_bytes(str(tmp_path / "a" / "x.bin")) == b"hello"
    assert storage.read_bytes(f"file://{tmp_path}/a/x.bin") == b"hello"
    assert storage.list_names(str(tmp_path / "a")) == ["x.bin"]
    assert not list(tmp_path.glob("a/.*"))  # no temporary file left behind
    with pytest.raises(storage.StorageError, match="no such file"):
        storage.read_bytes(str(tmp_path / "missing"))
    with pytest.raises(storage.StorageError, match="unsupported storage URI scheme"):
        storage.read_bytes("gs://bucket/x")


def test_local_write_interrupted_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    import os
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        storage.write_bytes(str(target), b"data")
    assert not target.exists() and list(tmp_path.iterdir()) == []


@BOTH_S3
def test_s3_round_trip(s3):
    storage.write_bytes(f"{s3}/dir/a.txt", b"alpha")
    storage.write_bytes(f"{s3}/dir/b.json", b"{}")
    assert storage.read_bytes(f"{s3}/dir/a.txt") == b"alpha"
    assert storage.exists(f"{s3}/dir/a.txt") and not storage.exists(f"{s3}/dir/zzz")
    assert storage.list_names(f"{s3}/dir") == ["a.txt", "b.json"]
    assert storage.list_names(f"{s3}/dir", ".json") == ["b.json"]
    storage.remove(f"{s3}/dir/a.txt")
    assert not storage.exists(f"{s3}/dir/a.txt")
    with pytest.raises(storage.StorageError, match="no such object"):
        storage.read_bytes(f"{s3}/dir/a.txt")


@BOTH_S3
def test_s3_multipart_upload(s3, tmp_path):
    big = tmp_path / "big.bin"
    # 12 MiB: two 6 MiB parts... minio uses 5 MiB+ parts
    big.write_bytes(bytes(range(256)) * (6 * 1024 * 1024 // 256 * 2))
    storage.upload_file(big, f"{s3}/big.bin")
    assert storage.sha256_file(f"{s3}/big.bin") == storage.sha256_bytes(big.read_bytes())


@BOTH_S3
def test_s3_interrupted_upload_is_never_visible(s3, monkeypatch):
    from minio import Minio
    original = Minio.put_object

    def broken_put(self, bucket, key, data, length, *args, **kwargs):
        class Dying:
            def __init__(self):
                self.sent = 0

            def read(self, n=-1):
                self.sent += 1
                if self.sent > 1:
                    raise ConnectionResetError("connection dropped mid-upload")
                return data.read(min(n, 1024) if n and n > 0 else 1024)

        return original(self, bucket, key, Dying(), length, *args, **kwargs)

    monkeypatch.setattr(Minio, "put_object", broken_put)
    monkeypatch.setattr(storage, "BACKOFF_SECONDS", 0.01)
    with pytest.raises(storage.StorageError, match=r"partial\.bin after \d+ attempts: .*connection dropped mid-upload"):
        storage.write_bytes(f"{s3}/partial.bin", b"x" * 100_000)  # retried, then one error naming the object
    monkeypatch.setattr(Minio, "put_object", original)
    assert not storage.exists(f"{s3}/partial.bin")


def test_unreachable_endpoint_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FLEXI_JEST_S3_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(storage, "BACKOFF_SECONDS", 0.01)
    with pytest.raises(storage.StorageError, match="cannot reach S3 endpoint http://127.0.0.1"):
        storage.read_bytes("s3://bucket/key")


def test_missing_endpoint_setting_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("FLEXI_JEST_S3_ENDPOINT", raising=False)
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    with pytest.raises(storage.StorageError, match="FLEXI_JEST_S3_ENDPOINT"):
        storage.read_bytes("s3://bucket/key")


def test_error_mapping_for_credentials_and_transient_failures():
    from minio.error import S3Error
    from urllib3.exceptions import MaxRetryError

    def s3_error(code):
        return S3Error(None, code, "message", "resource", "request-id", "host-id")

    assert "rejected the credentials" in str(storage.explain_s3_error(s3_error("InvalidAccessKeyId"), "s3://b/k"))
    assert "rejected the credentials" in str(storage.explain_s3_error(s3_error("SignatureDoesNotMatch"), "s3://b/k"))
    assert "no such object" in str(storage.explain_s3_error(s3_error("NoSuchKey"), "s3://b/k"))
    assert storage.explain_s3_error(s3_error("SlowDown"), "s3://b/k") is None  # retried
    assert storage.explain_s3_error(MaxRetryError(None, "/k", "refused"), "s3://b/k") is None  # retried


@pytest.mark.parametrize("s3_backend", ["seaweedfs"])  # moto accepts any credentials
def test_a_real_server_rejecting_the_credentials_is_a_clear_error_at_once(s3, monkeypatch):
    storage.write_bytes(f"{s3}/k", b"x")
    monkeypatch.setattr(storage, "BACKOFF_SECONDS", 60.0)  # a retry would take minutes: none is made
    for key, secret, code in [("flexi-jest-tests", "wrong",
                               "SignatureDoesNotMatch"), ("nobody", "x", "InvalidAccessKeyId")]:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        for action in (lambda: storage.read_bytes(f"{s3}/k"), lambda: storage.exists(f"{s3}/k"),
                       lambda: storage.write_bytes(f"{s3}/k", b"y"), lambda: storage.list_names(s3)):
            with pytest.raises(storage.StorageError, match=rf"S3 rejected the credentials for {s3}.* \({code}\)"):
                action()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(storage.StorageError, match=r"rejected the credentials .*\(AccessDenied\)"):
        storage.read_bytes(f"{s3}/k")  # anonymous


def test_transient_errors_are_retried_then_succeed(monkeypatch):
    monkeypatch.setattr(storage, "BACKOFF_SECONDS", 0.0)
    attempts = {"n": 0}

    def flaky():
        attempts["n"] += 1
        if attempts["n"] < 3:
            raise ConnectionResetError("reset")
        return "ok"

    assert storage._with_retries("s3://b/k", flaky) == "ok" and attempts["n"] == 3


@BOTH_S3
def test_shards_on_s3_read_exactly_like_local_shards(s3, tmp_path):
    from PIL import Image
    samples = [Sample(f"k-{i:03d}", Image.new("RGB", (8, 8), (i, 0, 0)), f"caption {i}", {"i": i}) for i in range(25)]
    write_split(iter(samples), f"{s3}/pool", samples_per_shard=10)
    write_split(iter(samples), str(tmp_path / "pool"), samples_per_shard=10)
    remote = [(s["key"], s["caption"], s["image"].sum().item()) for s in read_split(f"{s3}/pool")]
    local = [(s["key"], s["caption"], s["image"].sum().item()) for s in read_split(str(tmp_path / "pool"))]
    assert remote == local and len(remote) == 25
    with StreamLoader(f"{s3}/pool", 25, streams=1, mode="epoch", seed=1) as stream:
        assert len({s["key"] for s in stream.next_batch()}) == 25
    # a corrupted object on S3 is reported like a local one
    storage.write_bytes(f"{s3}/pool/shard-000001.tar", b"garbage")
    stats = ReadStats()
    assert len(list(read_split(f"{s3}/pool", stats=stats))) == 15
    assert stats.skipped["checksum_mismatch"] == 1 and stats.skipped["short_shard"] == 1


@BOTH_S3
def test_stages_read_and_write_s3_uris(s3):
    """make-data, train-reference and cache-reference with every path an s3:// URI: only the scheme differs."""
    from conftest import TEST_MODEL
    from flexi_jest.config import CacheReferenceConfig, MakeDataConfig, TrainReferenceConfig
    from flexi_jest.data.make import make_data
    from flexi_jest.reference_cache import ReferenceCache, cache_reference
    from flexi_jest.train import train_reference

    made = make_data(MakeDataConfig(out_dir=f"{s3}/data", curated_size=64, pool_size=60, eval_size=10,
                                    samples_per_shard=30))
    assert made.splits["pool"].path == f"{s3}/data/pool"
    assert storage.list_names(f"{s3}/data/pool", ".tar") == ["shard-000000.tar", "shard-000001.tar"]
    reference = train_reference(TrainReferenceConfig(data=f"{s3}/data/curated", out_dir=f"{s3}/reference",
                                                     model=TEST_MODEL, steps=3, batch_size=16, checkpoint_every=2,
                                                     progress=False))
    assert storage.exists(f"{s3}/reference/model.pt") and storage.exists(f"{s3}/reference/checkpoints/latest.json")
    cache = cache_reference(CacheReferenceConfig(reference=reference.checkpoint, pool=f"{s3}/data/pool"))
    assert cache.cache_dir.startswith(f"{s3}/data/pool/refcache-") and cache.num_samples == 60
    assert ReferenceCache(cache.cache_dir, f"{s3}/data/pool",
                          reference.checkpoint_sha256).load_shard(f"{s3}/data/pool/shard-000001.tar")[1].shape[0] == 30


@BOTH_S3
def test_s3_keys_keep_every_character_of_their_name(s3):
    """An S3 key is everything after the bucket: a `?` or `#` in a name (an ImageFolder class `what?`, a shard
    `a#1.tar`) is part of the key, not a query or a fragment, and a tab is kept; two such names never collapse
    into one object."""
    names = ["what?/a.jpg", "what?/b.jpg", "c#1.tar", "c#2.tar", "tab\there.txt", "plain/x y+z%20.txt"]
    for name in names:
        storage.write_bytes(storage.join(s3, "odd", name), name.encode())
    assert [storage.read_bytes(storage.join(s3, "odd", name)) for name in names] == [n.encode() for n in names]
    assert all(storage.exists(storage.join(s3, "odd", name)) for name in names)
    assert storage.list_tree(f"{s3}/odd") == sorted(names)
    assert storage.list_names(f"{s3}/odd/what?") == ["a.jpg", "b.jpg"]
    storage.remove(f"{s3}/odd/c#1.tar")
    assert not storage.exists(f"{s3}/odd/c#1.tar") and storage.exists(f"{s3}/odd/c#2.tar")


@BOTH_S3
def test_an_s3_uri_with_a_double_slash_names_the_same_objects_on_every_server(s3):
    """`s3://b/data//pool` is `s3://b/data/pool`: servers disagree on an empty key segment (AWS and moto keep
    `data//pool/x` apart from `data/pool/x`, SeaweedFS merges them, so its listing of `data//pool` was empty while
    reads worked; MinIO refuses the name), so the key's runs of `/` are one `/` on every server."""
    storage.write_bytes(f"{s3}/data//pool/x.tar", b"x")
    storage.write_bytes(f"{s3}/data/pool/y.tar", b"y")
    for pool in (f"{s3}/data//pool", f"{s3}/data/pool", f"{s3}//data///pool/"):
        assert storage.list_names(pool, ".tar") == ["x.tar", "y.tar"]
        assert storage.list_tree(pool) == ["x.tar", "y.tar"]
        assert storage.read_bytes(storage.join(pool, "x.tar")) == b"x" and storage.exists(storage.join(pool, "y.tar"))
