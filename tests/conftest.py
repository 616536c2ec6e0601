"""Shared fixtures: one small generated dataset and a trained reference, made once per test session."""

import os
import socket
import sys
import uuid

import pytest

# The `mlflow server`s the tests start (and their children) inherit this: no server-side job runner, which
# would start seven huey worker processes (~1.2 GB) per server and outlive a killed test.
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

from flexi_jest.config import MakeDataConfig, ModelConfig, TrainReferenceConfig
from flexi_jest.data.make import make_data

# Smaller than the tiny profile, so that end-to-end tests take seconds.
TEST_MODEL = ModelConfig(image_size=32, patch_size=8, vision_width=48, vision_depth=2, vision_heads=3,
                         text_width=48, text_depth=1, text_heads=2, context_length=16, embed_dim=32)


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return make_data(MakeDataConfig(dataset="shapes", out_dir=str(out), curated_size=300, pool_size=900,
                                    eval_size=200, samples_per_shard=300))


@pytest.fixture(scope="session")
def reference(shapes_data, tmp_path_factory):
    from flexi_jest.train import train_reference
    out = tmp_path_factory.mktemp("reference")
    cfg = TrainReferenceConfig(data=shapes_data.splits["curated"].path, out_dir=str(out), model=TEST_MODEL,
                               steps=8, batch_size=32, progress=False)
    return train_reference(cfg)


@pytest.fixture(scope="session")
def reference_cache(reference, shapes_data):
    from flexi_jest.config import CacheReferenceConfig
    from flexi_jest.reference_cache import cache_reference
    return cache_reference(CacheReferenceConfig(reference=reference.checkpoint, pool=shapes_data.splits["pool"].path,
                                                batch_size=128))


# ---- S3: moto's S3-compatible server, or SeaweedFS (a real S3 server), on loopback, read through the real minio client
# --
# A test takes `s3` (an empty bucket, s3://NAME, with the environment pointing at its server): on moto unless it is
# marked @BOTH_S3, which runs it on moto and on SeaweedFS (tests/seaweedfs.py). Keep moto for injected faults (it
# runs in this process and can be stopped and restarted at will); take both for what a real server must agree with.

S3_BACKENDS = ("moto", "seaweedfs")
BOTH_S3 = pytest.mark.parametrize("s3_backend", S3_BACKENDS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server():
    """moto's S3 server: (endpoint, access key, secret key); it accepts any credentials."""
    from moto.server import ThreadedMotoServer
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}", "testing", "testing"
    server.stop()


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory):
    """SeaweedFS's S3 gateway, started once per session (about 4 s): (endpoint, access key, secret key); it checks
    them. Tests that need it are skipped, saying why, if it cannot start."""
    from seaweedfs import SeaweedUnavailable, start_seaweedfs
    try:
        server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    except SeaweedUnavailable as exc:
        pytest.skip(f"SeaweedFS (a real S3 server) did not start: {exc}")
    yield server.endpoint, server.access_key, server.secret_key
    server.stop()


@pytest.fixture
def s3_backend():
    """Which S3 server `s3` uses: moto, unless a test is parametrized over S3_BACKENDS (@BOTH_S3)."""
    return "moto"


@pytest.fixture
def s3(s3_backend, request, monkeypatch):
    endpoint, access_key, secret_key = request.getfixturevalue(
        {"moto": "moto_server", "seaweedfs": "seaweedfs_server"}[s3_backend])
    monkeypatch.setenv("FLEXI_JEST_S3_ENDPOINT", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
    from flexi_jest import storage
    client = storage.s3_client()
    bucket = f"b{uuid.uuid4().hex[:16]}"  # a fresh bucket per test, also on the session's one SeaweedFS
    client.make_bucket(bucket)
    return f"s3://{bucket}"


@pytest.fixture(scope="session")
def img2dataset_dir(tmp_path_factory):
    """A pool written by img2dataset itself from URLs served on loopback (img2dataset_fixture.py): 78 images of
    varied aspect ratio and 3 broken URLs in 5 shards, 00000.tar 18 samples, 00001..00003.tar 20 each and the last,
    00004.tar, empty (`successes: 0`), as a real pool's last shard often is."""
    from img2dataset_fixture import img2dataset_pool
    return img2dataset_pool(tmp_path_factory.mktemp("img2dataset"))


def keep_mlflow_process_state(monkeypatch) -> None:
    """MLflow keeps per-process state that outlives a test: the active experiment (a module global, and
    MLFLOW_EXPERIMENT_ID, which set_experiment writes into os.environ) and the tracking URI (a module global, and
    MLFLOW_TRACKING_URI, which set_tracking_uri writes into os.environ so that subprocesses inherit it). From here
    on there is no active experiment, and when monkeypatch undoes its changes the other three are as they were
    now, so that a later test never reaches an earlier test's (stopped) server or store, in this process or in
    one it starts."""
    from mlflow.tracking._tracking_service import utils
    for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_TRACKING_URI"):
        value = os.environ.get(name)
        monkeypatch.setenv(name, value or "")  # records the value now (or its absence): restored at undo
        if value is None:
            monkeypatch.delenv(name)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # no active experiment from here on
    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)
    fluent = sys.modules.get("mlflow.tracking.fluent")
    if fluent is not None:
        monkeypatch.setattr(fluent, "_active_experiment_id", None)


@pytest.fixture(autouse=True)
def _keep_mlflow_process_state(monkeypatch):
    """keep_mlflow_process_state around every test (in CI a slow test's `mlflow.set_tracking_uri` once sent a later
    test's subprocesses to its stopped server)."""
    keep_mlflow_process_state(monkeypatch)
    yield
    fluent = sys.modules.get("mlflow.tracking.fluent")
    if fluent is not None:
        fluent._active_experiment_id = None


def bare_version(client, name: str) -> str:
    """A registry version of an empty run (the promotion logic reads only aliases and tags)."""
    import mlflow
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException:
        pass
    run = client.create_run("0")
    return str(client.create_model_version(name, source=f"{run.info.artifact_uri}/model",
                                           run_id=run.info.run_id).version)
