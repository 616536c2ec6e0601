"""One small interface over where artifacts live: local paths, file:// URIs and s3://bucket/key.

Every reader and writer in the library goes through these functions, so the URI scheme is the only
difference between a laptop run and a cluster run. S3 (MinIO on a cluster) goes through the `minio`
SDK, configured from the environment only, never from code or configs:

    FLEXI_JEST_S3_ENDPOINT   e.g. http://minio.flexi-jest:9000 (falls back to MLFLOW_S3_ENDPOINT_URL)
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
    FLEXI_JEST_S3_REGION     optional

TLS follows the endpoint's scheme (https:// or http://).

Writes are atomic from a reader's point of view: a local file is written to a temporary name and
renamed; an S3 object (single or multipart PUT) becomes visible only when complete. Multi-file
outputs (shards, caches) write their manifest last. Transient S3 failures (connection errors, S3's
InternalError / ServiceUnavailable / SlowDown, and HTTP 429 / 500 / 502 / 503 / 504 without an S3 error
document, as a gateway in front of MinIO answers) are retried RETRIES times with exponential backoff; an
unreachable endpoint or rejected credentials is a StorageError naming them.
"""

import hashlib
import io
import os
import re
import socket
import tempfile
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Callable, TypeVar
from urllib.parse import urlparse

from flexi_jest.errors import BadInput, Unavailable

T = TypeVar("T")

RETRIES = 4
BACKOFF_SECONDS = 0.5
CREDENTIAL_ERRORS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken"}
TRANSIENT_ERRORS = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "OperationAborted"}
MISSING_ERRORS = {"NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"}
# HTTP statuses worth a retry when they come without an S3 error code: a gateway or ingress in front of
# MinIO answers 502/503/504 (and 429 when it rate-limits) with an HTML page, which minio raises as
# InvalidResponseError (a GET) or ServerError (a HEAD, or no body)
TRANSIENT_STATUSES = {429, 500, 502, 503, 504}


class StorageError(RuntimeError, Unavailable):
    """A storage location could not be read or written; the message names it and why."""


class UnsafeNameError(ValueError, BadInput):
    """A name read from a manifest or pointer file would leave the directory (or S3 prefix) it belongs to."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _local_path(uri: str) -> Path:
    parsed = urlparse(str(uri))
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme in ("", None) or len(parsed.scheme) == 1:  # plain path (or a Windows drive letter)
        return Path(uri)
    raise StorageError(f"unsupported storage URI scheme {parsed.scheme!r} in {uri!r}; expected a path, file:// or s3://")


def _bucket_key(uri: str) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key). Split by hand, not by urlparse: a key's `?`, `#` and tab are part of
    its name (urlparse would cut the key at a `?` or `#` and drop tabs, so `c?/a.jpg` became `c`). A run of `/`
    in the key is one `/`: servers disagree on empty segments (AWS keeps `a//b` apart from `a/b`, SeaweedFS
    merges them, MinIO refuses the name), so `s3://b/data//pool` names the same objects on every server."""
    bucket, _, key = str(uri).removeprefix("s3://").partition("/")
    if not bucket:
        raise StorageError(f"S3 URI {uri!r} has no bucket; expected s3://bucket/key")
    return bucket, re.sub(r"/{2,}", "/", key).lstrip("/")


# ---- remote reads: an overall deadline ------------------------------------------------------------------

READ_SECONDS_ENV = "FLEXI_JEST_REMOTE_READ_SECONDS"  # one remote object (a shard, an S3 object) read whole
CHECK_SECONDS_ENV = "FLEXI_JEST_REMOTE_CHECK_SECONDS"  # one existence check (an http(s) HEAD)
DEFAULT_READ_SECONDS = 1800.0
DEFAULT_CHECK_SECONDS = 60.0


def _seconds(variable: str, default: float) -> float:
    raw = os.environ.get(variable, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise StorageError(f"{variable}={raw!r} must be a positive number of seconds")
    return value


class Deadline:
    """A total time limit on one remote read (a socket timeout bounds a single recv, so a server trickling a byte
    every few seconds would hold a reader forever). When it passes, the watched sockets are shut down and the
    watched processes killed, so a blocked read returns; check() then raises TimeoutError naming what was read,
    the limit and the environment variable that sets it."""

    def __init__(self, seconds: float, what: str, variable: str):
        self.seconds, self.what, self.variable = seconds, what, variable
        self.end = time.monotonic() + seconds
        self.expired = False
        self._timers: list[threading.Timer] = []

    @classmethod
    def for_read(cls, what: str) -> "Deadline":
        """The deadline of reading one object whole (FLEXI_JEST_REMOTE_READ_SECONDS, default 1800 s)."""
        return cls(_seconds(READ_SECONDS_ENV, DEFAULT_READ_SECONDS), what, READ_SECONDS_ENV)

    @classmethod
    def for_check(cls, what: str) -> "Deadline":
        """The deadline of one existence check (FLEXI_JEST_REMOTE_CHECK_SECONDS, default 60 s)."""
        return cls(_seconds(CHECK_SECONDS_ENV, DEFAULT_CHECK_SECONDS), what, CHECK_SECONDS_ENV)

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def _at_end(self, action: Callable[[], None]) -> None:
        def expire() -> None:
            self.expired = True
            try:
                action()
            except OSError:  # already closed or gone
                pass
        timer = threading.Timer(max(self.remaining(), 0.0), expire)
        timer.daemon = True
        timer.start()
        self._timers.append(timer)

    def watch(self, sock) -> None:
        """Shut sock down when the deadline passes (a read blocked on it then returns)."""
        if sock is not None:
            self._at_end(lambda: sock.shutdown(socket.SHUT_RDWR))

    def watch_process(self, process) -> None:
        """Kill a subprocess when the deadline passes."""
        self._at_end(process.kill)

    def error(self) -> TimeoutError:
        return TimeoutError(f"{self.what}: no complete answer within {self.seconds:g} s (the remote read deadline; "
                            f"{self.variable} sets it)")

    def check(self) -> None:
        """Raise error() if the deadline has passed."""
        if self.expired or self.remaining() < 0:
            self.expired = True
            raise self.error()

    def cancel(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()


# ---- S3 through minio ----------------------------------------------------------------------------------


def s3_endpoint() -> str:
    endpoint = os.environ.get("FLEXI_JEST_S3_ENDPOINT") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    if not endpoint:
        raise StorageError(
            "s3:// storage needs FLEXI_JEST_S3_ENDPOINT (or MLFLOW_S3_ENDPOINT_URL) set to the S3/MinIO endpoint")
    return endpoint


@lru_cache(maxsize=8)
def _client(endpoint: str, access_key: str | None, secret_key: str | None, region: str | None):
    import urllib3
    from minio import Minio

    parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    # retries are ours (_with_retries), so that every failure is classified and reported the same way
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=10, read=300), retries=False, maxsize=16)
    return Minio(parsed.netloc, access_key=access_key, secret_key=secret_key, region=region,
                 secure=parsed.scheme == "https", http_client=http)


def s3_client():
    """The minio client for the environment's endpoint and credentials."""
    return _client(s3_endpoint(), os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY"),
                   os.environ.get("FLEXI_JEST_S3_REGION"))


def explain_s3_error(exc: Exception, uri: str) -> StorageError | None:
    """Map a minio / urllib3 exception to a clear StorageError, or None if it is transient (worth a retry)."""
    from minio.error import InvalidResponseError, S3Error, ServerError
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(exc, (InvalidResponseError, ServerError)):  # no S3 error document: judged by the HTTP status
        status = http_status(exc)
        if status in TRANSIENT_STATUSES:
            return None
        return StorageError(f"S3 request for {uri} failed with HTTP {status} and no S3 error document: {exc}")
    if isinstance(exc, S3Error):
        if exc.code in CREDENTIAL_ERRORS:
            return StorageError(f"S3 rejected the credentials for {uri} ({exc.code}): check AWS_ACCESS_KEY_ID / "
                                "AWS_SECRET_ACCESS_KEY and the bucket policy")
        if exc.code in MISSING_ERRORS:
            return StorageError(f"no such object: {uri} ({exc.code})")
        if exc.code in TRANSIENT_ERRORS:
            return None
        return StorageError(f"S3 error on {uri}: {exc.code}: {exc.message}")
    if isinstance(exc, (Urllib3Error, ConnectionError, TimeoutError, OSError)):
        return None
    return StorageError(f"S3 request for {uri} failed: {exc!r}")


def http_status(exc: Exception) -> int | None:
    """The HTTP status of a minio InvalidResponseError (a non-XML answer) or ServerError, else None."""
    from minio.error import InvalidResponseError, ServerError

    if isinstance(exc, ServerError):
        return exc.status_code
    if isinstance(exc, InvalidResponseError):
        return getattr(exc, "_code", None)  # minio 7.2 keeps the status only here (no public property)
    return None


def _brief(exc: Exception) -> str:
    """One line about a transient failure: an HTML error page is named by its status, not pasted whole."""
    status = http_status(exc)
    if status is not None:
        return f"HTTP {status} without an S3 error document (a gateway or proxy in front of the endpoint?)"
    return " ".join(str(exc).split())[:300]


def _with_retries(uri: str, action: Callable[[], T], retries: int = RETRIES) -> T:
    """Run an S3 action, retrying transient failures with exponential backoff."""
    for attempt in range(retries + 1):
        try:
            return action()
        except StorageError:
            raise
        except Exception as exc:  # classified below
            error = explain_s3_error(exc, uri)
            if error is not None:
                raise error from exc
            if attempt == retries:
                raise StorageError(f"cannot reach S3 endpoint {s3_endpoint()} for {uri} after {retries + 1} attempts: "
                                   f"{_brief(exc)}") from exc
            time.sleep(BACKOFF_SECONDS * 2**attempt)
    raise AssertionError("unreachable")


# ---- the interface --------------------------------------------------------------------------------------


def join(base: str, *parts: str) -> str:
    """Join path parts onto a path or URI with '/'."""
    return "/".join([str(base).rstrip("/"), *[p.strip("/") for p in parts]])


def confined(base: str, name: str, source: str) -> str:
    """base/name, for a name read from data (a manifest, a pointer file) that must stay inside base.

    Only a plain relative name is accepted: no scheme (s3://, file:), no absolute path, no `..`, `.` or
    empty component, no backslash or NUL. source names the file the name came from, for the error."""
    problem = None
    if not isinstance(name, str) or not name:
        problem = "is not a non-empty string"
    elif "\\" in name or "\0" in name:
        problem = "holds a backslash or NUL"
    elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", name):
        problem = "has a scheme or drive"
    elif name.startswith("/"):
        problem = "is absolute"
    elif any(part in ("", ".", "..") for part in name.split("/")):
        problem = "has an empty, '.' or '..' component"
    if problem is not None:
        raise UnsafeNameError(f"{source} names {name!r}, which {problem}: names in it must stay inside {base}")
    return join(base, name)


TEMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # write_bytes' temporary files (tempfile.mkstemp names)


def remove_temp_files(directory: str) -> list[str]:
    """Delete the temporary files an interrupted write_bytes left in a local directory (kill -9 mid-write);
    returns their names. Call it only where no other process is writing (the start of a run). S3 writes
    leave nothing (an object appears only when complete): a no-op there."""
    if is_s3(directory):
        return []
    path = _local_path(directory)
    if not path.is_dir():
        return []
    removed = []
    for child in sorted(path.iterdir()):
        if child.is_file() and TEMP_FILE.match(child.name):
            child.unlink(missing_ok=True)
            removed.append(child.name)
    return removed


def exists(uri: str) -> bool:
    if not is_s3(uri):
        return _local_path(uri).exists()
    bucket, key = _bucket_key(uri)
    client = s3_client()

    def stat() -> bool:
        from minio.error import S3Error
        try:
            client.stat_object(bucket, key)
            return True
        except S3Error as exc:
            if exc.code in MISSING_ERRORS:
                return False
            raise

    return _with_retries(uri, stat)


def read_bytes(uri: str) -> bytes:
    if not is_s3(uri):
        try:
            return _local_path(uri).read_bytes()
        except FileNotFoundError as exc:
            raise StorageError(f"no such file: {uri}") from exc
        except IsADirectoryError as exc:
            raise StorageError(f"is a directory, not a file: {uri}") from exc
    bucket, key = _bucket_key(uri)
    client = s3_client()

    def get() -> bytes:
        deadline = Deadline.for_read(uri)
        response = client.get_object(bucket, key)
        try:
            deadline.watch(getattr(getattr(response, "connection", None), "sock", None))
            try:
                data = response.read()
            except Exception:
                if deadline.expired:
                    raise StorageError(str(deadline.error())) from None
                raise
            if deadline.expired:  # a shut-down socket can read as an early end
                raise StorageError(str(deadline.error()))
            return data
        finally:
            deadline.cancel()
            response.close()
            response.release_conn()

    return _with_retries(uri, get)


def open_read(uri: str) -> BinaryIO:
    """A binary stream of the object at uri (an S3 object is fetched whole, with retries)."""
    if not is_s3(uri):
        try:
            return open(_local_path(uri), "rb")
        except FileNotFoundError as exc:
            raise StorageError(f"no such file: {uri}") from exc
    return io.BytesIO(read_bytes(uri))


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: locally to a temporary file, fsync, rename; on S3 one PUT (visible only when complete)."""
    if is_s3(uri):
        bucket, key = _bucket_key(uri)
        client = s3_client()
        _with_retries(uri, lambda: client.put_object(bucket, key, io.BytesIO(data), len(data)))
        return
    path = _local_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # write()/fsync() name no file (disk full): name it
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


def upload_file(local_file: str | Path, uri: str) -> None:
    """Copy a finished local file to uri (atomically; multipart on S3 for large files)."""
    if is_s3(uri):
        bucket, key = _bucket_key(uri)
        client = s3_client()
        _with_retries(uri, lambda: client.fput_object(bucket, key, str(local_file)))
        return
    path = _local_path(uri)
    if path.exists() and Path(local_file).resolve() == path.resolve():
        return
    write_bytes(uri, Path(local_file).read_bytes())


def list_names(uri: str, suffix: str = "") -> list[str]:
    """Sorted names of the files directly under the directory (or S3 prefix) uri ending with suffix."""
    if not is_s3(uri):
        path = _local_path(uri)
        if not path.is_dir():
            raise StorageError(f"not a directory: {uri}")
        return sorted(
            p.name for p in path.iterdir() if p.is_file() and p.name.endswith(suffix) and not p.name.startswith("."))
    bucket, prefix = _bucket_key(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    client = s3_client()

    def names() -> list[str]:
        return sorted(
            obj.object_name[len(prefix):] for obj in client.list_objects(bucket, prefix=prefix)
            if not obj.is_dir and obj.object_name.endswith(suffix)
        )

    found = _with_retries(uri, names)
    if not found and not suffix:
        raise StorageError(f"no objects under {uri}")
    return found


def list_tree(uri: str) -> list[str]:
    """Sorted '/'-joined paths, relative to uri, of every file under the directory (or S3 prefix) uri, at
    any depth (hidden files and folders skipped). A local directory's empty sub-folders do not appear.

    Locally, a symlink to a directory is followed (as torchvision's ImageFolder follows them) unless it leads back
    to the directory itself or one of the directories above it on the way down (`class/l1 -> ..`): such a loop
    would list the same files again under ever longer names, without end, and is skipped."""
    if not is_s3(uri):
        root = _local_path(uri)
        if not root.is_dir():
            raise StorageError(f"not a directory: {uri}")
        found = []
        pending = [(root, Path(), frozenset({os.path.realpath(root)}))]  # (directory, relative name, real ancestors)
        while pending:
            directory, relative, ancestors = pending.pop()
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    if not entry.is_dir():  # follows symlinks; a file, or a broken link (its reader says so)
                        found.append((relative / entry.name).as_posix())
                        continue
                    real = os.path.realpath(entry.path)
                    if real not in ancestors:  # a link back up the walk is a loop: not followed
                        pending.append((Path(entry.path), relative / entry.name, ancestors | {real}))
        return sorted(found)
    bucket, prefix = _bucket_key(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    client = s3_client()

    def names() -> list[str]:
        return sorted(
            obj.object_name[len(prefix):] for obj in client.list_objects(bucket, prefix=prefix, recursive=True)
            if not obj.is_dir and not any(part.startswith(".") for part in obj.object_name[len(prefix):].split("/"))
        )

    return _with_retries(uri, names)


def remove(uri: str) -> None:
    if is_s3(uri):
        bucket, key = _bucket_key(uri)
        client = s3_client()
        _with_retries(uri, lambda: client.remove_object(bucket, key))
        return
    _local_path(uri).unlink(missing_ok=True)


def makedirs(uri: str) -> None:
    """Create a local directory (S3 has no directories: a no-op there)."""
    if not is_s3(uri):
        _local_path(uri).mkdir(parents=True, exist_ok=True)


SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # what sha256_bytes and sha256_file return


def is_sha256(value: object) -> bool:
    """Whether `value` is a sha256 as this module writes it: 64 lowercase hex digits."""
    return isinstance(value, str) and SHA256_HEX.fullmatch(value) is not None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(uri: str, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open_read(uri) as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()
