"""The tiny pipeline with every component in the CPU image (images/Dockerfile), through KFP's DockerRunner on
podman, on a fresh clone of this repository's HEAD (what is committed is what is built and run).

As in a pod: each component runs as uid 10001 in the image, with nothing of the working tree mounted (only KFP's
pipeline root), its data on an S3 server (moto) and its tracking on an `mlflow server`, both on the host and
reached over the container network. The servers listen on the podman bridge's gateway address only, so they
are reachable from this machine and its containers, not from outside. The test starts and stops its own podman
API service (`podman system service`, DOCKER_HOST), and inspects the image: non-root, no credentials.

The end-to-end tests are slow (they build the image): `pytest -m slow`; `.ci/run` runs them after the default
suite. They need root with podman, runc and debootstrap (README, "Before a cluster"). The fast tests check what
`run-local --runner docker` hands the containers, and what it refuses.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PODMAN = ["podman", "--runtime", "runc"]
IMAGE = os.environ.get("FLEXI_JEST_TEST_IMAGE", "localhost/flexi-jest:0.1.0")
BUCKET, MLFLOW_BUCKET = "flexi-jest", "mlflow"
KEYS = {"AWS_ACCESS_KEY_ID": "flexi-jest-test", "AWS_SECRET_ACCESS_KEY": "flexi-jest-test-secret"}
SMALL = [  # tests/test_pipeline.py's small run
    "data_config=" + json.dumps({"curated_size": 200, "pool_size": 600, "eval_size": 100, "samples_per_shard": 200}),
    "reference_config=" + json.dumps({"steps": 4, "batch_size": 32, "progress": False}),
    "learner_config=" + json.dumps({"super_batch_size": 80, "progress": False, "scoring_patch_size": 16,
                                    "train_patch_sizes": [8, 16]}),
    "baseline_config=" + json.dumps({"super_batch_size": 80, "progress": False}),
    "steps=3",
]
# what a credential in an image looks like: an AWS access key id, a credentials file's secret, an env-file style
# assignment of a secret (SOMETHING_PASSWORD=...), a private key, or the S3 keys this test hands the containers
CREDENTIAL = re.compile(rb"AKIA[0-9A-Z]{16}|(?i:aws_secret_access_key)\s*[=:]\s*\S"
                        rb"|(?m:^\s*(?:export\s+)?[A-Z0-9_]*(?:PASSWORD|PASSWD|SECRET|TOKEN|ACCESS_KEY)[A-Z0-9_]*\s*=\s*\S)"
                        rb"|-----BEGIN [A-Z ]*PRIVATE KEY-----|" + "|".join(KEYS.values()).encode())
CREDENTIAL_FILES = {".env", "credentials", ".netrc", ".pypirc", ".git-credentials", "id_rsa", "id_ed25519",
                    "config.json", "pip.conf", "pip-build-ca.crt"}


def podman_unavailable() -> str | None:
    """Why the containerised pipeline cannot run here, or None."""
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        return (f"{', '.join(missing)} not installed: as root, `apt-get install podman runc debootstrap` and "
                "/etc/containers/containers.conf as README 'Containers' says (.ci/run does both where apt can)")
    if os.geteuid() != 0:
        return "needs root: the servers listen on the podman bridge's gateway, which rootless podman has not"
    done = subprocess.run([*PODMAN, "info"], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        return f"podman does not work here: {done.stderr.strip()[-500:]}"
    return None


def wait_for(check, what: str, timeout: float, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited: {log.read_text()[-3000:] if log else ''}")
        time.sleep(0.5)
    raise RuntimeError(f"{what} not ready within {timeout:.0f} s")


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except OSError:
        return False


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    reason = podman_unavailable()
    if reason:
        pytest.skip(reason)
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip(f"{ROOT} is not a git checkout: the test builds and runs a fresh clone of its HEAD")
    where = tmp_path_factory.mktemp("clone") / "flexi-jest"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(where)], check=True, timeout=120)
    return where


@pytest.fixture(scope="module")
def image(clone, tmp_path_factory):
    """The CPU image built from the clone by scripts/build-images.sh (layers cached: torch is not reinstalled
    when only the project changed); its build log and seconds in build.json beside it."""
    log = tmp_path_factory.mktemp("build") / "build.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(["bash", "scripts/build-images.sh", "cpu"], cwd=clone, stdout=out,
                              stderr=subprocess.STDOUT,
                              env=dict(os.environ, FLEXI_JEST_IMAGE=IMAGE), timeout=3600)
    seconds = time.perf_counter() - started
    if done.returncode == 3:  # the script's "not enough disk" (it names the space needed and found)
        pytest.skip(log.read_text().strip().splitlines()[-1])
    assert done.returncode == 0, f"scripts/build-images.sh cpu failed:\n{log.read_text()[-4000:]}"
    built = [line for line in log.read_text().splitlines() if line.startswith("== built")]
    print(f"scripts/build-images.sh cpu: {seconds:.0f} s", *built, sep="\n")
    return IMAGE


@pytest.fixture(scope="module")
def gateway(image):
    """The podman bridge's gateway address, kept up for the module by a container holding the bridge (podman
    removes the bridge with its last container); the servers listen there."""
    name = f"flexi-jest-bridge-{os.getpid()}"
    subprocess.run([*PODMAN, "run", "-d", "--rm", "--name", name, image, "sleep", "7200"],
                   check=True, capture_output=True, timeout=120)
    try:
        networks = json.loads(subprocess.run([*PODMAN, "network", "inspect", "podman"], check=True,
                                             capture_output=True, text=True).stdout)
        yield networks[0]["subnets"][0]["gateway"]
    finally:
        subprocess.run([*PODMAN, "rm", "-f", "-t", "0", name], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def docker_host(tmp_path_factory):
    """Our own podman API service (the Docker API KFP's DockerRunner speaks), stopped afterwards."""
    where = tmp_path_factory.mktemp("podman")
    socket, log = where / "podman.sock", where / "service.log"
    with open(log, "w") as out:
        service = subprocess.Popen([*PODMAN, "system", "service", "--time=0", f"unix://{socket}"],
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(socket.exists, "podman system service", 60, service, log)
        yield f"unix://{socket}"
    finally:
        stop(service)


@pytest.fixture(scope="module")
def servers(gateway, tmp_path_factory):
    """moto's S3 server and an `mlflow server` (artifacts proxied to S3) on the bridge's gateway address."""
    import boto3
    from moto.server import ThreadedMotoServer

    from test_storage import free_port

    where = tmp_path_factory.mktemp("servers")
    s3_port, port = free_port(), free_port()
    s3 = ThreadedMotoServer(ip_address=gateway, port=s3_port, verbose=False)
    s3.start()
    endpoint = f"http://{gateway}:{s3_port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=KEYS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=KEYS["AWS_SECRET_ACCESS_KEY"])
    for bucket in (BUCKET, MLFLOW_BUCKET):
        client.create_bucket(Bucket=bucket)
    env = dict(os.environ, **KEYS, MLFLOW_S3_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1",
               MLFLOW_DISABLE_TELEMETRY="true")
    log = where / "mlflow.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", gateway, "--port", str(port),
             "--backend-store-uri", f"sqlite:///{where / 'mlflow.db'}",
             "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/artifacts", "--workers", "1"],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=where)
    url = f"http://{gateway}:{port}"
    try:
        wait_for(lambda: answers(f"{url}/health"), "mlflow server", 120, server, log)
        yield {"tracking_uri": url, "s3_endpoint": endpoint, "s3": client}
    finally:
        stop(server)
        s3.stop()


@pytest.fixture(scope="module")
def container_run(clone, image, docker_host, servers, tmp_path_factory):
    """run-local --runner docker from the clone: the summary, the run's wall time, and the containers started."""
    workdir = tmp_path_factory.mktemp("run")
    env = dict(os.environ, **KEYS, DOCKER_HOST=docker_host, FLEXI_JEST_IMAGE=image,
               MLFLOW_TRACKING_URI=servers["tracking_uri"], FLEXI_JEST_S3_ENDPOINT=servers["s3_endpoint"],
               AWS_DEFAULT_REGION="us-east-1", MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("FLEXI_JEST_GPU_IMAGE", None)
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
    command = [sys.executable, "pipelines/flexi_jest_pp.py", "run-local", "--runner", "docker", "--workdir",
               str(workdir), "--param", f"storage_root=s3://{BUCKET}/containers", "--param",
               "run_name=pp-in-containers"]
    for param in SMALL:
        command += ["--param", param]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, f"run-local --runner docker failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    print(done.stdout[-3000:])
    print(f"containerised pipeline: {seconds:.0f} s wall")
    started_images: list[str] = []
    for attempt in range(5):  # a loaded machine once read no event right after the run (CI, 2 cores shared)
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 1))
        events = subprocess.run([*PODMAN, "events", "--since", since, "--until", until, "--filter", "event=start",
                                 "--format", "{{.Image}}"], capture_output=True, text=True, timeout=120)
        started_images = [line for line in events.stdout.split() if line]
        if started_images:
            break
        print(f"podman events read nothing (attempt {attempt + 1}; stderr: {events.stderr.strip()[-500:]!r})")
        time.sleep(5)
    return json.loads((workdir / "summary.json").read_text()), workdir, started_images


@pytest.mark.slow
def test_pipeline_runs_green_in_containers_registers_the_learner_and_writes_to_s3(container_run, servers):
    import mlflow

    summary, _, _ = container_run
    assert summary["runner"] == "docker" and summary["tracking_uri"] == servers["tracking_uri"]
    # the pipeline's default baselines (uniform, offline-filter) beside the JEST learner, and the reference
    assert sorted(row["method"] for row in summary["rows"]) == ["joint", "offline-filter", "reference", "uniform"]
    assert all(row["i2t_r1"] is not None and row["total_flops"] > 0 for row in summary["rows"])
    assert summary["decision"] == "champion" and summary["learner_version"] == "1"
    mlflow.set_tracking_uri(servers["tracking_uri"])
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("flexi-jest-learner", "champion").version) == "1"
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    stages = [run.data.tags["flexi_jest.stage"] for run in client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")]
    assert sorted(stages) == sorted(["make-data", "train-reference", "cache-reference", "promote"]
                                    + ["train-learner"] * 3 + ["evaluate"] * 4)  # as tests/test_pipeline.py's run

    def keys(bucket: str, prefix: str) -> list[str]:
        pages = servers["s3"].get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    data = keys(BUCKET, "containers/")
    assert any(key.endswith(".tar") for key in data), f"no data shards in s3://{BUCKET}/containers: {data[:20]}"
    assert any(key.endswith(".pt") for key in data), f"no checkpoints in s3://{BUCKET}/containers: {data[:20]}"
    assert keys(MLFLOW_BUCKET, "artifacts/"), "the MLflow server stored no artifacts in S3"


@pytest.mark.slow
def test_every_component_ran_in_the_image_as_uid_10001(container_run, image):
    """Every container podman started during the run was the image (8 tasks at least: tracking, data,
    reference, cache, two learners, two evaluations, promotion, comparison, close), and what the components
    wrote into KFP's pipeline root (the one mount) belongs to uid 10001."""
    _, workdir, started_images = container_run
    assert len(started_images) >= 8 and set(started_images) == {image}, started_images
    outputs = [path for path in (workdir / "kfp").rglob("*") if path.is_file()]
    assert outputs and {path.stat().st_uid for path in outputs} == {10001}


@pytest.mark.slow
def test_image_runs_as_non_root_and_holds_no_credentials(image):
    (info,) = json.loads(subprocess.run([*PODMAN, "image", "inspect", image], check=True, capture_output=True,
                                        text=True).stdout)
    assert info["Config"]["User"] == "10001:10001"
    whoami = subprocess.run([*PODMAN, "run", "--rm", "--network", "none", image, "id", "-u"], check=True,
                            capture_output=True, text=True, timeout=120).stdout.strip()
    assert whoami == "10001"
    env = info["Config"].get("Env", [])
    leaked = [item for item in env if re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", item.split("=")[0],
                                                re.I)]
    assert not leaked, f"credential-like variables in the image's env: {leaked}"
    history = subprocess.run([*PODMAN, "history", "--no-trunc", "--format", "{{.CreatedBy}}", image], check=True,
                             capture_output=True, text=True).stdout
    assert not CREDENTIAL.search(history.encode()), "a layer's command holds a credential"
    assert "pip-build-ca" not in history and "/etc/pip.conf" not in history
    mount = subprocess.run([*PODMAN, "image", "mount", image], check=True, capture_output=True,
                           text=True).stdout.strip()
    try:
        found = []
        for directory, _, files in os.walk(mount):
            relative = os.path.relpath(directory, mount)
            in_packages = "site-packages" in relative or relative.startswith("usr/lib/python3")
            for name in files:
                path = Path(directory, name)
                if name in CREDENTIAL_FILES and not in_packages and not relative.startswith("usr/share"):
                    if path.is_symlink() or path.stat().st_size:  # podman 4.3 leaves build mounts' empty mount points
                        found.append(f"/{relative}/{name}")
                elif not in_packages and relative.split(
                    os.sep)[0] in ("etc", "home", "root", "workspace", "tmp", "opt"):
                    if path.is_file() and not path.is_symlink() and path.stat().st_size < 1 << 20:
                        if CREDENTIAL.search(path.read_bytes()):
                            found.append(f"/{relative}/{name}")
        assert not found, f"credential-like files in the image: {found}"
        for leftover in ("etc/pip.conf", "etc/pip-build-ca.crt", "opt/pypi", "opt/pypi-more", "opt/wheels"):
            path = Path(mount, leftover)  # scripts/build-images.sh's read-only build mounts: nothing of them stays
            assert not path.exists() or (
                path.is_dir() and not any(path.iterdir())) or path.stat().st_size == 0, leftover
    finally:
        subprocess.run([*PODMAN, "image", "unmount", image], capture_output=True)


RUNNER_ENV = {"MLFLOW_TRACKING_URI": "http://10.88.0.1:5000", "FLEXI_JEST_S3_ENDPOINT": "http://10.88.0.1:9000",
              **KEYS}


def test_docker_runner_runs_as_uid_10001_with_only_the_services_and_keys(monkeypatch):
    from kfp import local

    from pipelines.runner import CONTAINER_ENV, docker_runner
    for name, value in RUNNER_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FLEXI_JEST_SOMETHING_ELSE", "stays here")
    runner = docker_runner({"storage_root": "s3://flexi-jest/runs"})
    assert isinstance(runner, local.DockerRunner)
    assert runner.container_run_args["user"] == "10001:10001"
    environment = runner.container_run_args["environment"]
    assert environment == {name: os.environ[name] for name in CONTAINER_ENV if os.environ.get(name)}
    assert RUNNER_ENV.items() <= environment.items() and "FLEXI_JEST_SOMETHING_ELSE" not in environment
    assert "volumes" not in runner.container_run_args, "nothing but KFP's pipeline root is mounted"


@pytest.mark.parametrize("change, message", [
    ({"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}, "MLFLOW_TRACKING_URI must be an MLflow server"),
    ({"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}, "is loopback"),
    ({"FLEXI_JEST_S3_ENDPOINT": "http://localhost:9000"}, "is loopback"),
    ({"FLEXI_JEST_S3_ENDPOINT": ""}, "FLEXI_JEST_S3_ENDPOINT must be the S3 server"),
    ({"storage_root": ""}, "storage_root=s3://"),
], ids=["sqlite", "loopback-mlflow", "loopback-s3", "no-s3", "local-storage"])
def test_docker_runner_refuses_what_a_container_cannot_reach(monkeypatch, change, message):
    from pipelines.runner import docker_runner
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    for name, value in RUNNER_ENV.items():
        monkeypatch.setenv(name, change.get(name, value))
    with pytest.raises(SystemExit, match=message):
        docker_runner({"storage_root": change.get("storage_root", "s3://flexi-jest/runs")})


def test_docker_runner_lets_a_quiet_component_and_a_busy_podman_be(monkeypatch):
    """docker-py's 60 s read timeout would cut a component's log stream after a minute without output."""
    import docker

    from pipelines.runner import DOCKER_API_TIMEOUT_S, docker_runner
    for name, value in RUNNER_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/podman.sock")
    monkeypatch.setattr(docker.client, "DEFAULT_TIMEOUT_SECONDS", 60)
    docker_runner({"storage_root": "s3://flexi-jest/runs"})
    assert docker.from_env(version="1.41").api.timeout == DOCKER_API_TIMEOUT_S >= 600  # no call to the socket
