"""One small interface over where artifacts live: local paths (and file:// URIs).

Every reader and writer in the library goes through these functions, so adding a scheme (s3://
through the minio SDK, with the pipeline) changes nothing else. Writes are atomic: a file appears
under its final name only once complete.
"""

import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse


class StorageError(RuntimeError):
    """A storage location could not be read or written; the message names it."""


def _local_path(uri: str) -> Path:
    parsed = urlparse(str(uri))
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme in ("", None) or len(parsed.scheme) == 1:  # plain path (or a Windows drive letter)
        return Path(uri)
    raise StorageError(f"unsupported storage URI scheme {parsed.scheme!r} in {uri!r}; expected a local path or file://")


def join(base: str, *parts: str) -> str:
    """Join path parts onto a path or URI with '/'."""
    return "/".join([str(base).rstrip("/"), *[p.strip("/") for p in parts]])


def exists(uri: str) -> bool:
    return _local_path(uri).exists()


def open_read(uri: str) -> BinaryIO:
    """A binary stream of the object at uri; a missing one is a StorageError naming it."""
    path = _local_path(uri)
    try:
        return open(path, "rb")
    except FileNotFoundError as exc:
        raise StorageError(f"no such file: {uri}") from exc


def read_bytes(uri: str) -> bytes:
    with open_read(uri) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: to a temporary file in the same directory, fsync, then rename."""
    path = _local_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def upload_file(local_file: str | Path, uri: str) -> None:
    """Copy a finished local file to uri (atomically)."""
    path = _local_path(uri)
    if Path(local_file).resolve() == path.resolve():
        return
    write_bytes(uri, Path(local_file).read_bytes())


def list_names(uri: str, suffix: str = "") -> list[str]:
    """Sorted names of the files directly under the directory uri ending with suffix."""
    path = _local_path(uri)
    if not path.is_dir():
        raise StorageError(f"not a directory: {uri}")
    return sorted(p.name for p in path.iterdir() if p.is_file() and p.name.endswith(suffix) and not p.name.startswith("."))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(uri: str, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open_read(uri) as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def local_dir(uri: str) -> Path:
    """The local directory behind uri, created if missing (for writers that need a real path)."""
    path = _local_path(uri)
    path.mkdir(parents=True, exist_ok=True)
    return path


def remove(uri: str) -> None:
    _local_path(uri).unlink(missing_ok=True)
