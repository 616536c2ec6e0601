"""Streams of remote shards: http(s) responses and `pipe:` commands, each under an overall deadline.

A socket timeout bounds one read, not a whole answer: a server that sends a byte every few seconds holds a
reader forever. Here every remote read has a total time limit (storage.Deadline, from the environment:
FLEXI_JEST_REMOTE_CHECK_SECONDS for a HEAD check, FLEXI_JEST_REMOTE_READ_SECONDS for one shard read whole);
past it the connection is shut down (a command killed) and the reader gets a TimeoutError naming the URL, the
limit and the variable that sets it.

http(s) goes through http.client (its socket is what the deadline shuts down), following up to MAX_REDIRECTS
redirects and the environment's http(s)_proxy / no_proxy as urllib does. A `pipe:` command runs as an argument
list (never through a shell) with its stderr drained by a thread into a bounded tail, so a chatty command
(curl without -s) cannot fill the stderr pipe and deadlock; the tail's last line names a failure.
"""

import collections
import http.client
import shlex
import subprocess
import threading
import urllib.parse
import urllib.request
from typing import Callable

from flexi_jest import storage

SOCKET_TIMEOUT_SECONDS = 10  # one blocking socket operation (connect, one recv)
MAX_REDIRECTS = 5
STDERR_TAIL_BYTES = 16_384  # of a pipe: command's stderr, kept for its error message
USER_AGENT = "flexi-jest"


class _Stream:
    """A read-only binary stream over read1-style chunk reads, under a deadline; closing releases everything."""

    def __init__(self, what: str, deadline: storage.Deadline, read_chunk: Callable[[int], bytes],
                 release: Callable[[], None]):
        self.what, self.deadline = what, deadline
        self._read_chunk, self._release = read_chunk, release
        self.closed = False

    def read(self, size: int = -1) -> bytes:
        """Up to size bytes (all that is left when size < 0); fewer only at the end of the stream."""
        parts, got = [], 0
        while size < 0 or got < size:
            want = 1 << 16 if size < 0 else min(1 << 16, size - got)
            try:
                chunk = self._read_chunk(want)
            except (OSError, http.client.HTTPException) as exc:
                self.deadline.check()
                raise OSError(f"{self.what}: read failed: {type(exc).__name__}: {exc}") from None
            self.deadline.check()  # a shut-down socket reads as an early end: never take it for the end
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.deadline.cancel()
            self._release()

    def __enter__(self) -> "_Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- http(s) ------------------------------------------------------------------------------------------------


def _connection(url: str) -> tuple[http.client.HTTPConnection, str]:
    """An unconnected connection for url (through the environment's proxy, if any) and the request target."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise OSError(f"{url}: not an http(s) URL")
    target = urllib.parse.urlunsplit(("", "", parsed.path or "/", parsed.query, ""))
    secure = parsed.scheme == "https"
    kind = http.client.HTTPSConnection if secure else http.client.HTTPConnection
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy and not urllib.request.proxy_bypass(parsed.hostname):
        proxied = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if secure:  # a CONNECT tunnel through the proxy, TLS to the host
            connection = http.client.HTTPSConnection(proxied.hostname, proxied.port or 8080,
                                                     timeout=SOCKET_TIMEOUT_SECONDS)
            connection.set_tunnel(parsed.hostname, parsed.port or 443)
            return connection, target
        return http.client.HTTPConnection(proxied.hostname, proxied.port or 8080, timeout=SOCKET_TIMEOUT_SECONDS), url
    return kind(parsed.hostname, parsed.port, timeout=SOCKET_TIMEOUT_SECONDS), target


def http_open(url: str, method: str = "GET", deadline: storage.Deadline | None = None) -> _Stream:
    """The body of url (method GET or HEAD) as a stream, under deadline (default: the shard read deadline).

    Raises OSError naming the url: an HTTP error status ("HTTP 404"), a refused connection, too many redirects,
    or (TimeoutError) no complete answer within the deadline."""
    deadline = deadline or storage.Deadline.for_read(url)
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        connection, target = _connection(current)
        try:
            connection.connect()
            deadline.watch(connection.sock)
            connection.request(method, target, headers={"User-Agent": USER_AGENT})
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            deadline.check()
            deadline.cancel()
            raise OSError(f"{url}: {getattr(exc, 'strerror', None) or exc}") from None
        location = response.getheader("Location")
        if response.status in (301, 302, 303, 307, 308) and location:
            connection.close()
            current = urllib.parse.urljoin(current, location)
            continue
        if response.status >= 400:
            connection.close()
            deadline.cancel()
            raise OSError(f"{url}: HTTP {response.status} {response.reason}")

        def release(response=response, connection=connection) -> None:
            response.close()
            connection.close()

        return _Stream(url, deadline, response.read1, release)
    deadline.cancel()
    raise OSError(f"{url}: more than {MAX_REDIRECTS} redirects")


def http_problem(url: str) -> str | None:
    """None if a HEAD request for url succeeds within the check deadline, else why not (one line)."""
    try:
        with http_open(url, "HEAD", storage.Deadline.for_check(url)):
            return None
    except OSError as exc:
        return str(exc).removeprefix(f"{url}: ")


# ---- pipe: ---------------------------------------------------------------------------------------------------


class _Tail:
    """The last `limit` bytes a stream wrote, read to its end by a daemon thread."""

    def __init__(self, stream, limit: int = STDERR_TAIL_BYTES):
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size, self.limit = 0, limit
        self.thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
        self.thread.start()

    def _drain(self, stream) -> None:
        with stream:
            while chunk := stream.read1(1 << 16) if hasattr(stream, "read1") else stream.read(1 << 16):
                self.chunks.append(chunk)
                self.size += len(chunk)
                while self.size - len(self.chunks[0]) >= self.limit:
                    self.size -= len(self.chunks.popleft())

    def last_line(self, wait: float = 5.0) -> str:
        self.thread.join(wait)
        lines = b"".join(self.chunks)[-self.limit:].decode(errors="replace").strip().splitlines()
        return lines[-1].strip() if lines else ""


def pipe_open(argv: list[str], command: str, deadline: storage.Deadline | None = None) -> _Stream:
    """The stdout of the command argv (an argument list: no shell) as a stream; `command` names it in errors.

    Its stderr is drained concurrently (a bounded tail kept); past the deadline the command is killed and the
    reader gets a TimeoutError. Closing waits for the command: a non-zero exit is an OSError with the status
    and the last line of its stderr."""
    deadline = deadline or storage.Deadline.for_read(f"pipe:{command}")
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except (OSError, ValueError) as exc:
        deadline.cancel()
        raise OSError(f"pipe:{command}: cannot start: {exc}") from None
    tail = _Tail(process.stderr)
    deadline.watch_process(process)

    def release() -> None:
        process.stdout.close()
        try:
            status = process.wait(timeout=max(deadline.remaining(), 0.0) + 5.0)
        except subprocess.TimeoutExpired:
            process.kill()
            status = process.wait()
        if deadline.expired:
            raise deadline.error()
        if status != 0:
            raise OSError(f"pipe:{command} exited with status {status}: {tail.last_line()}")

    return _Stream(f"pipe:{command}", deadline, process.stdout.read1, release)


def split_command(command: str) -> list[str]:
    """A pipe: command's argument list (shlex, POSIX rules); ValueError for unbalanced quotes or an empty one."""
    argv = shlex.split(command)
    if not argv:
        raise ValueError("the command is empty")
    return argv
