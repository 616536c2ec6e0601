"""Fault: the MLflow tracking server stops answering during a stage. Before, the stage sat silent for minutes in
MLflow's default retries (7 per request, backing off up to 120 s, 120 s a try: about 20 minutes per request at
worst) and left its run RUNNING. Now the retries are bounded (tracking.HTTP_RETRY_DEFAULTS), said on stderr in one
line while they run, the stage fails with one line and exit status 1, and its run is marked FAILED, with the error
tagged, as soon as the server is back (tracking.end_run waits a bounded time for it)."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import free_port
from flexi_jest import tracking

SHORT_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def test_the_retry_bounds_are_set_unless_the_environment_sets_them(monkeypatch):
    for name in tracking.HTTP_RETRY_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    assert tracking.retry_seconds() == 4 + 8 + 16 + 32 + 64 + 120 + 6 * 1.0 + 8 * 120  # MLflow's own: 20 minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    bound = tracking.bound_http_retries()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"  # the environment's choice is kept
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"
    assert bound == 2 + 4 + 8 + 16 + 6 * 7


def stage_command(tmp_path, experiment: str = "outage") -> list[str]:
    """A tracked make-data stage through the real CLI, large enough to run for some seconds after its run starts."""
    return [sys.executable, "-m", "flexi_jest.cli", "make-data", "--track", "--experiment", experiment,
            "--set", f"out_dir={tmp_path / 'data'}", "--set", "curated_size=200", "--set", "pool_size=600",
            "--set", "eval_size=100"]


def test_a_tracking_server_that_is_down_is_one_line_within_the_bound(tmp_path):
    """Nothing listens at the tracking URI: the stage says so while it retries and fails in one line, exit 1."""
    url = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, **SHORT_BOUNDS, "MLFLOW_TRACKING_URI": url}
    started = time.monotonic()
    out = subprocess.run(stage_command(tmp_path), capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    notice = [line for line in lines if line.startswith("[mlflow] the tracking server")]
    assert notice and f"at {url} is unreachable ([Errno 111] Connection refused)" in notice[0]
    assert "retrying for at most 17 s" in notice[0]  # 2 s of backoff, 3 tries of up to 5 s
    assert lines[-1].startswith(f"make-data: the MLflow tracking server at {url} did not answer during the start of ")
    assert time.monotonic() - started < 120  # imports and 2 s of backoff; MLflow's defaults took 4 minutes here


# ---- a real `mlflow server` on loopback, killed mid-stage and started again on the same port and store ------------


def start_server(workdir, port: int) -> subprocess.Popen:
    """`mlflow server` on loopback over a SQLite store in workdir, in a process group of its own (its workers die
    with it); waits for /health."""
    from postgres_mlflow import wait_for_health

    log = workdir / "server.log"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--artifacts-destination",
         str(workdir / "artifacts"), "--workers", "1"],
        env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True)
    wait_for_health(f"http://127.0.0.1:{port}", server, log)
    return server


def kill_server(server: subprocess.Popen) -> None:
    """SIGKILL to the server's own process group (the server and its uvicorn worker): a crash, not a shutdown."""
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait(timeout=30)


class StderrLines:
    """A child's stderr, read line by line in a thread; wait_for(text) blocks until a line holds text."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self.thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, seconds: float) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = [line for line in self.lines if text in line]
            if found:
                return found[0]
            time.sleep(0.2)
        raise AssertionError(f"no stderr line with {text!r} within {seconds:.0f} s: {self.lines[-20:]}")


@pytest.mark.slow  # two starts of an mlflow server: about a minute or two on the loaded 2-core machine
def test_server_killed_mid_stage_the_run_is_marked_failed_when_it_returns(tmp_path):
    import mlflow

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    stage = None
    try:
        client = mlflow.MlflowClient(tracking_uri=url)
        env = {**os.environ, **SHORT_BOUNDS, "MLFLOW_TRACKING_URI": url, tracking.CLOSE_WAIT_ENV: "300"}
        stage = subprocess.Popen(stage_command(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True, env=env, cwd=tmp_path)
        stderr = StderrLines(stage)
        deadline, runs = time.monotonic() + 180, []
        while not runs and time.monotonic() < deadline and stage.poll() is None:
            experiment = client.get_experiment_by_name("outage")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            time.sleep(0.2)
        assert runs and runs[0].info.status == "RUNNING", stderr.lines[-20:]
        run_id = runs[0].info.run_id
        kill_server(server)  # mid-stage: the run exists, its config or its result is still to be logged

        notice = stderr.wait_for("[mlflow] the tracking server", 240)
        assert f"at {url} is unreachable" in notice and "retrying for at most 17 s" in notice
        waiting = stderr.wait_for("[mlflow] waiting at most 300 s", 120)
        assert run_id in waiting and "to mark run" in waiting and "FAILED" in waiting
        server = start_server(tmp_path, port)  # the same port and store: the server is back
        assert stage.wait(timeout=120) == 1
        stderr.thread.join(timeout=10)
        assert not any("Traceback" in line for line in stderr.lines), stderr.lines
        assert stderr.lines[-1].startswith(f"make-data: the MLflow tracking server at {url} did not answer during "
                                           "make-data")
        assert stderr.lines[-1].endswith(f"its run {run_id} was marked FAILED")
        run = client.get_run(run_id)
        assert run.info.status == "FAILED" and run.info.end_time is not None
        assert "did not answer" in run.data.tags[tracking.FAILURE_TAG] or "Connection" in run.data.tags[
            tracking.FAILURE_TAG]
    finally:
        if stage is not None and stage.poll() is None:
            stage.kill()
            stage.wait(timeout=30)
        kill_server(server)
