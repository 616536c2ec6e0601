"""An `mlflow server` whose backend store is a real PostgreSQL (as k8s/base deploys it), for the registry tests.

PostgreSQL runs from a temporary data directory on loopback (initdb + pg_ctl; no system service). It refuses
to run as root, so under root (CI) it runs as the `postgres` user through runuser. When the server binaries,
a non-root user or psycopg2 are missing, the tests skip saying which (.ci/run installs Debian's postgresql).
"""

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from test_storage import free_port


def postgres_bin(name: str) -> str | None:
    """initdb / pg_ctl on PATH, else in Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def as_postgres_user() -> list[str]:
    """The command prefix that runs a PostgreSQL binary: none, or runuser -u postgres under root."""
    if os.geteuid() != 0:
        return []
    try:
        import pwd
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("PostgreSQL refuses to run as root and there is no `postgres` user to run it as "
                    "(Debian's postgresql package creates it)")
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("PostgreSQL refuses to run as root and runuser is missing (util-linux)")
    return [runuser, "-u", "postgres", "--"]


def wait_for_health(url: str, server: subprocess.Popen, log: Path, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {log.read_text()[-2000:]}")
            time.sleep(1)
    server.kill()
    raise RuntimeError(f"mlflow server did not answer /health within {seconds:.0f} s: {log.read_text()[-2000:]}")


@contextmanager
def postgres(workdir: Path) -> Iterator[str]:
    """A PostgreSQL 15 server on loopback from a fresh data directory; yields its SQLAlchemy URI (database mlflow)."""
    initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("needs the PostgreSQL server binaries initdb and pg_ctl (apt-get install postgresql; .ci/run does)")
    try:
        import psycopg2
    except ImportError:
        pytest.skip("needs psycopg2 (pip install -e '.[test]' installs psycopg2-binary)")
    prefix = as_postgres_user()
    # a directory the postgres user can reach: pytest's tmp_path is private to root
    data = Path(tempfile.mkdtemp(prefix="flexi-jest-pg-"))
    if prefix:
        shutil.chown(data, "postgres", "postgres")
    port = free_port()
    log = workdir / "postgres.log"
    subprocess.run(prefix + [initdb, "-D", str(data / "db"), "-U", "mlflow", "--auth=trust", "-E", "UTF8",
                             "--no-locale"], check=True, capture_output=True, text=True)
    started = subprocess.run(prefix + [pg_ctl, "-D", str(data / "db"), "-l", str(data / "server.log"), "-w", "-t",
                                       "120",
                                       "-o", f"-h 127.0.0.1 -p {port} -k {data}", "start"], capture_output=True,
                                       text=True)
    if started.returncode != 0:
        server_log = (data / "server.log").read_text() if (data / "server.log").exists() else ""
        shutil.rmtree(data, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start: {started.stderr} {server_log[-2000:]}")
    try:
        connection = psycopg2.connect(host="127.0.0.1", port=port, user="mlflow", dbname="postgres")
        connection.autocommit = True
        connection.cursor().execute("CREATE DATABASE mlflow")
        connection.close()
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(prefix + [pg_ctl, "-D", str(data / "db"), "-m", "fast", "-w", "stop"], capture_output=True)
        if (data / "server.log").exists():
            shutil.copy(data / "server.log", log)
        shutil.rmtree(data, ignore_errors=True)


@contextmanager
def mlflow_on_postgres(workdir: Path) -> Iterator[tuple[str, str]]:
    """`mlflow server` (two workers) on loopback with its backend store on a fresh PostgreSQL; yields its URL and
    the database's URI."""
    with postgres(workdir) as database:
        port = free_port()
        log = workdir / "mlflow-server.log"
        env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
        with open(log, "w") as out:
            server = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                 "--backend-store-uri", database, "--artifacts-destination", str(workdir / "artifacts"),
                 "--workers", "2"], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_health(url, server, log)
            yield url, database
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
