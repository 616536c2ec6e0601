"""Fault: a remote server that is alive but never finishes (a byte every half second), and a `pipe:` command
that writes more to stderr than a pipe holds (issue 20, finding 2).

Expected: the HEAD check of an http(s) spec, the read of an http(s) shard, the read of an S3 object and a
`pipe:` command each fail within their overall deadline (FLEXI_JEST_REMOTE_CHECK_SECONDS /
FLEXI_JEST_REMOTE_READ_SECONDS, here 2 s) with a TimeoutError (for S3 a StorageError) naming the URL, the limit
and the variable; the reader counts such a shard as `missing_shard` and goes on. A command writing 200 KB to
stderr before its tar neither deadlocks nor loses its error: the last line of its stderr is in the message.
Each test runs under no_hang, so the code before this change fails it instead of hanging the suite.
"""

import os
import sys
import time

import pytest
from faults import colour_samples, no_hang, record, tar_bytes
from loopback import Gateway, Trickler

from flexi_jest import storage
from flexi_jest.data.access import DataAccess, granted
from flexi_jest.data.shards import ReadStats, iter_tar, write_split
from flexi_jest.data.specs import Shard, SpecError, open_shard, resolve

DEADLINE = 2.0
SLACK = 4.0  # the deadline plus this is still "bounded": a loaded 2-core machine schedules late


@pytest.fixture
def short_deadlines(monkeypatch):
    monkeypatch.setenv(storage.READ_SECONDS_ENV, str(DEADLINE))
    monkeypatch.setenv(storage.CHECK_SECONDS_ENV, str(DEADLINE))
    with granted(DataAccess(allow_http=True, pipe_commands=(sys.executable, "sleep"))):  # enabled here (security.md)
        yield


def test_a_trickling_server_fails_the_head_check_within_the_deadline(short_deadlines):
    with Trickler(interval=0.5) as server, no_hang(15):
        started = time.monotonic()
        with pytest.raises(SpecError) as error:
            resolve(f"{server.url}/00000.tar")
        elapsed = time.monotonic() - started
    message = str(error.value)
    assert f"no complete answer within {DEADLINE:g} s" in message and storage.CHECK_SECONDS_ENV in message
    assert f"{server.url}/00000.tar" in message and "\n" not in message
    assert elapsed < DEADLINE + SLACK


def test_a_trickling_server_fails_the_shard_read_within_the_deadline(short_deadlines):
    with Trickler(interval=0.5) as server, no_hang(15):
        url = f"{server.url}/00000.tar"
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=rf"{url}: no complete answer within 2 s .*{storage.READ_SECONDS_ENV}"):
            with open_shard(url) as stream:
                stream.read()
        assert time.monotonic() - started < DEADLINE + SLACK
        stats = ReadStats()  # the shard reader: the shard counted as missing, with the reason, and no hang
        assert list(iter_tar(Shard(url), stats)) == []
        assert stats.skipped == {"missing_shard": 1} and "no complete answer" in stats.errors[0]


def test_a_trickling_s3_object_read_fails_within_the_deadline(s3, monkeypatch, short_deadlines):
    """moto behind a loopback gateway that sends an object's body a byte every half second."""
    uri = f"{s3}/slow/object.bin"
    storage.write_bytes(uri, b"x" * 4096)
    with Gateway(os.environ["FLEXI_JEST_S3_ENDPOINT"], failures=0) as gateway:
        gateway.trickle_suffix = ".bin"
        monkeypatch.setenv("FLEXI_JEST_S3_ENDPOINT", gateway.url)
        assert storage.exists(uri)  # a HEAD, not trickled (and the client learns the bucket's region)
        started = time.monotonic()
        with no_hang(20), pytest.raises(storage.StorageError, match=rf"{uri}: no complete answer within 2 s"):
            storage.read_bytes(uri)
        assert time.monotonic() - started < DEADLINE + SLACK  # not retried: a deadline is not a transient failure


@pytest.fixture
def chatty_script(tmp_path):
    """A command that writes 200 KB to stderr before its tar (curl's progress meter on a long download), then
    exits with the status given as its second argument."""
    script = tmp_path / "chatty.py"
    script.write_text(
        "import sys\n"
        "sys.stderr.write('progress ' * 25_000 + '\\n')\n"
        "sys.stderr.flush()\n"
        "sys.stdout.buffer.write(open(sys.argv[1], 'rb').read())\n"
        "sys.stderr.write('fatal: the last line of stderr\\n')\n"
        "sys.exit(int(sys.argv[2]))\n")
    return script


def test_a_pipe_command_writing_200kb_to_stderr_does_not_deadlock(short_deadlines, chatty_script, tmp_path):
    shard = tmp_path / "00000.tar"
    shard.write_bytes(tar_bytes([record(f"k{i}") for i in range(3)]))
    with no_hang(20):
        with open_shard(f"pipe:{sys.executable} {chatty_script} {shard} 0") as stream:
            data = stream.read()
        assert data == shard.read_bytes()
        with pytest.raises(OSError, match="exited with status 3: fatal: the last line of stderr"):
            with open_shard(f"pipe:{sys.executable} {chatty_script} {shard} 3") as stream:
                stream.read()


def test_a_pipe_command_that_never_ends_is_killed_at_the_deadline(short_deadlines):
    started = time.monotonic()
    with no_hang(15), pytest.raises(TimeoutError, match=r"pipe:sleep 60: no complete answer within 2 s"):
        with open_shard("pipe:sleep 60") as stream:
            stream.read()
    assert time.monotonic() - started < DEADLINE + SLACK


def test_a_bad_deadline_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(storage.READ_SECONDS_ENV, "soon")
    with pytest.raises(storage.StorageError, match=rf"{storage.READ_SECONDS_ENV}='soon' must be a positive number"):
        storage.Deadline.for_read("x")


def test_a_whole_split_still_reads_through_http_with_the_deadline(short_deadlines, tmp_path):
    """The deadline bounds a whole read, it does not cut short a read that finishes: a split served over http."""
    import functools
    import http.server
    import threading
    write_split(colour_samples(12), str(tmp_path / "served"), samples_per_shard=4)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "served"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        spec = resolve(f"{base}/shard-{{000000..000002}}.tar")
        stats = ReadStats()
        keys = [raw["__key__"] for shard in spec.shards for raw in iter_tar(shard, stats)]
        assert keys == [f"s-{i:05d}" for i in range(12)] and not stats.skipped
    finally:
        server.shutdown()
        server.server_close()
