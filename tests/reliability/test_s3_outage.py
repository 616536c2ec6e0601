"""Fault: the S3 endpoint stops in the middle of writing a split (or a reference cache), then comes back.

Expected: the write fails with a clear StorageError naming the endpoint; nothing partial is visible as
complete (the manifest, written last, is absent, and readers refuse the interrupted split: specs.resolve, the
training stream, the evaluation reader, the reference's caching pass); after the endpoint restarts, re-running the
same write completes and the output reads whole (the evaluation reader, the training stream's first epoch). The
endpoint is a real S3 HTTP server (moto, on loopback) spoken to by the real minio client, stopped and restarted on
the same port; moto keeps its objects in this process, as a restarted MinIO keeps its disk.
"""

import socket

import pytest
from faults import colour_samples

from flexi_jest import storage
from flexi_jest.config import EvalSet
from flexi_jest.data.eval_sets import open_eval_set
from flexi_jest.data.loader import StreamLoader
from flexi_jest.data.manifest import IncompleteSplitError, read_manifest
from flexi_jest.data.shards import write_split
from flexi_jest.data.specs import resolve
from readers import cache_pass, eval_read, stream_batch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Endpoint:
    """A moto S3 server on loopback that can be stopped and started again on its port."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
        self.server = None


@pytest.fixture
def endpoint(monkeypatch):
    server = Endpoint()
    server.start()
    monkeypatch.setenv("FLEXI_JEST_S3_ENDPOINT", server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setattr(storage, "BACKOFF_SECONDS", 0.01)  # the retries, without their waits
    storage.s3_client().make_bucket(f"b{server.port}")
    yield server
    if server.server is not None:
        server.stop()


def stop_after_writes(monkeypatch, endpoint: Endpoint, writes: int) -> list[str]:
    """Stop the endpoint right after the `writes`-th successful storage.write_bytes; returns the written URIs."""
    written: list[str] = []
    original = storage.write_bytes

    def write_then_maybe_stop(uri: str, data: bytes) -> None:
        original(uri, data)
        written.append(uri)
        if len(written) == writes:
            endpoint.stop()

    monkeypatch.setattr(storage, "write_bytes", write_then_maybe_stop)
    return written


def test_s3_stopped_mid_split_write_then_restarted(endpoint, monkeypatch):
    split = f"s3://b{endpoint.port}/data/pool"
    written = stop_after_writes(monkeypatch, endpoint, writes=2)  # two of four shards, then the outage
    with pytest.raises(storage.StorageError, match=f"cannot reach S3 endpoint {endpoint.url}"):
        write_split(colour_samples(40), split, samples_per_shard=10)
    assert [uri.rsplit("/", 1)[1] for uri in written] == ["shard-000000.tar", "shard-000001.tar"]

    endpoint.start()  # the endpoint comes back with what it had stored
    monkeypatch.undo()  # the plain write_bytes again (the env and backoff are set again below)
    monkeypatch.setenv("FLEXI_JEST_S3_ENDPOINT", endpoint.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setattr(storage, "BACKOFF_SECONDS", 0.01)
    assert storage.list_names(split, ".tar") == ["shard-000000.tar", "shard-000001.tar"]  # the partial write
    assert read_manifest(split) is None  # ... is not complete: no manifest
    for read in (lambda: resolve(split), lambda: StreamLoader(split, 1), lambda: open_eval_set(EvalSet(uri=split)),
                 lambda: cache_pass(split, f"{split}-cache")):
        with pytest.raises(IncompleteSplitError, match="write was interrupted"):
            read()

    manifest = write_split(colour_samples(40), split, samples_per_shard=10)  # the re-run
    assert manifest["num_samples"] == 40 and read_manifest(split)["num_samples"] == 40
    keys = [f"s-{i:05d}" for i in range(40)]
    samples, stats = eval_read(split)
    assert [s.key for s in samples] == keys and stats.complete and stats.samples == 40
    batch, stats = stream_batch(split, 40)  # the training stream's first epoch, in one batch
    assert sorted(s["key"] for s in batch) == keys and stats.complete and stats.samples == 40


def test_s3_stopped_mid_cache_write_then_restarted(endpoint, monkeypatch, tmp_path):
    import torch

    from conftest import TEST_MODEL
    from flexi_jest.checkpoint import save_model
    from flexi_jest.config import CacheReferenceConfig
    from flexi_jest.models import DualEncoder
    from flexi_jest.reference_cache import CacheError, ReferenceCache, cache_reference
    torch.manual_seed(0)
    reference = str(tmp_path / "reference.pt")
    save_model(DualEncoder(TEST_MODEL), reference)  # a reference is a model file; its training is not the point
    bucket = f"s3://b{endpoint.port}"
    pool = f"{bucket}/data/pool"
    write_split(colour_samples(30), pool, samples_per_shard=10)
    cache_dir = f"{bucket}/data/pool/refcache"
    config = CacheReferenceConfig(reference=reference, pool=pool, out_dir=cache_dir, device="cpu")
    stop_after_writes(monkeypatch, endpoint, writes=1)  # one sidecar of three, then the outage
    with pytest.raises(storage.StorageError, match=f"cannot reach S3 endpoint {endpoint.url}"):
        cache_reference(config)

    endpoint.start()
    monkeypatch.undo()
    monkeypatch.setenv("FLEXI_JEST_S3_ENDPOINT", endpoint.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setattr(storage, "BACKOFF_SECONDS", 0.01)
    with pytest.raises(CacheError, match="missing manifest.json"):  # the partial cache is not usable as one
        ReferenceCache(cache_dir, pool)
    result = cache_reference(config)  # the re-run
    assert result.num_samples == 30 and result.read_stats.samples == 30
    assert ReferenceCache(cache_dir, pool).manifest["num_samples"] == 30


# ---- a gateway in front of the endpoint answers HTML 503 (issue 20, finding 11) ----------------------------------


def through_gateway(monkeypatch, endpoint: Endpoint, failures: int):
    """A loopback Gateway (loopback.py) in front of the moto endpoint, as FLEXI_JEST_S3_ENDPOINT."""
    from loopback import Gateway
    gateway = Gateway(endpoint.url, failures)
    monkeypatch.setenv("FLEXI_JEST_S3_ENDPOINT", gateway.url)
    return gateway


@pytest.mark.parametrize("operation", ["write_bytes", "read_bytes", "exists"])
def test_a_gateways_html_503_is_retried(endpoint, monkeypatch, operation):
    """An ingress in front of MinIO answers HTML 503 while the backend restarts: minio raises InvalidResponseError
    (a GET or PUT) or ServerError (a HEAD), which must be retried like S3's own ServiceUnavailable."""
    uri = f"s3://b{endpoint.port}/gateway/object.bin"
    storage.write_bytes(uri, b"payload")
    with through_gateway(monkeypatch, endpoint, failures=2) as gateway:
        if operation == "write_bytes":
            storage.write_bytes(uri, b"written through the gateway")
            monkeypatch.setenv("FLEXI_JEST_S3_ENDPOINT", endpoint.url)
            assert storage.read_bytes(uri) == b"written through the gateway"
        elif operation == "read_bytes":
            assert storage.read_bytes(uri) == b"payload"
        else:
            assert storage.exists(uri) and not storage.exists(uri + ".missing")
        assert gateway.failed == 2 and gateway.requests > 2


def test_a_gateway_503_that_does_not_end_fails_after_bounded_retries(endpoint, monkeypatch):
    uri = f"s3://b{endpoint.port}/gateway/object.bin"
    storage.write_bytes(uri, b"payload")
    with through_gateway(monkeypatch, endpoint, failures=10_000) as gateway:
        with pytest.raises(storage.StorageError, match=rf"cannot reach S3 endpoint {gateway.url} .* after "
                           rf"{storage.RETRIES + 1} attempts: HTTP 503 without an S3 error document"):
            storage.read_bytes(uri)
        assert gateway.requests == storage.RETRIES + 1  # bounded: one request per attempt, then the error


def test_a_gateways_html_404_is_not_retried(endpoint, monkeypatch):
    """Only the transient statuses are retried: an HTML 404 (a misrouted ingress) fails at once, naming the status."""
    from loopback import Gateway
    uri = f"s3://b{endpoint.port}/gateway/object.bin"
    with Gateway(endpoint.url, failures=10_000) as gateway:
        monkeypatch.setenv("FLEXI_JEST_S3_ENDPOINT", gateway.url)
        gateway.status = 404
        with pytest.raises(storage.StorageError, match="failed with HTTP 404 and no S3 error document"):
            storage.read_bytes(uri)
        assert gateway.requests == 1
