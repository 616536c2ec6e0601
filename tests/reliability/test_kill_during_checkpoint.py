"""Fault: the training process is killed (SIGKILL: no cleanup runs) at any point, including in the middle of a
checkpoint write, and restarted. The resumed run must end with the same model as an uninterrupted one, and the
temporary files of the interrupted writes must be gone.

The runs are real `flexi-jest train-reference` processes. In the killed runs every fsync of an atomic write is
slowed down (a wrapper patches os.fsync before the CLI starts), so the writes last long enough to be hit.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TEST_MODEL
from flexi_jest.checkpoint import load_model

WRAPPER = """
import os, sys, time
delay = float(os.environ.get("SLOW_FSYNC_SECONDS", "0"))
if delay:
    real_fsync = os.fsync
    def slow_fsync(fd):
        time.sleep(delay)
        real_fsync(fd)
    os.fsync = slow_fsync
from flexi_jest.cli import main
sys.exit(main(sys.argv[1:]))
"""
STEPS = 4


def start(config: Path, slow_fsync: float = 0.0) -> subprocess.Popen:
    env = dict(os.environ, SLOW_FSYNC_SECONDS=str(slow_fsync), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", WRAPPER, "train-reference", "--config", str(config)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def write_config(shapes_data, out_dir: Path, steps: int = STEPS) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    config = out_dir.parent / f"{out_dir.name}.json"
    config.write_text(json.dumps({
        "data": shapes_data.splits["curated"].path, "out_dir": str(out_dir), "model": TEST_MODEL.model_dump(),
        "steps": steps, "batch_size": 16, "checkpoint_every": 1, "log_every": 1, "progress": False, "device": "cpu"}))
    return config


def temp_files(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.rglob(".*.tmp"))


def wait_for(predicate, process: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Poll until predicate() (True) or the process exits (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.005)
    raise TimeoutError("the training process neither reached the point nor exited")


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def finish(config: Path) -> None:
    process = start(config)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]


def assert_same_model(a: Path, b: Path) -> None:
    first, _ = load_model(str(a / "model.pt"))
    second, _ = load_model(str(b / "model.pt"))
    for (name, x), (_, y) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(x, y), name


@pytest.fixture(scope="module")
def uninterrupted(shapes_data, tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("straight") / "run"
    finish(write_config(shapes_data, out_dir))
    return out_dir


@pytest.mark.slow  # reason: SIGKILLs a training subprocess mid-write, resumes it (46 s on 2 cores with its fixture)
def test_kill_during_a_checkpoint_write_then_resume(shapes_data, uninterrupted, tmp_path):
    out_dir = tmp_path / "run"
    config = write_config(shapes_data, out_dir)
    process = start(config, slow_fsync=0.5)
    # the second checkpoint's temporary file exists: the process is inside its write (fsync), kill it there
    hit = wait_for(lambda: any(p.name.startswith(".step-00000002.pt.") for p in temp_files(out_dir)), process)
    assert hit, f"the run finished before its second checkpoint was written: {process.stderr.read()[-2000:]}"
    kill(process)
    orphans = temp_files(out_dir)
    assert any(p.name.startswith(".step-00000002.pt.") for p in orphans), "the kill left the write's temp file"
    latest = json.loads((out_dir / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 1, "latest.json still names the last complete checkpoint"
    finish(config)
    assert temp_files(out_dir) == [], "the restart removed the orphaned temporary files"
    assert_same_model(uninterrupted, out_dir)
    assert [json.loads(line)["step"] for line in open(out_dir / "metrics.jsonl")] == list(range(1, STEPS + 1))


@pytest.mark.slow  # reason: six kill/restart cycles of real training processes, a minute or more on two cores
def test_repeated_kills_at_random_points_then_resume(shapes_data, tmp_path):
    """Kills at random moments: inside a write (a temp file exists), or at a random delay after a random number
    of completed checkpoints (in a step, in a write, between); every cycle restarts the run."""
    out_dir = tmp_path / "run"
    config = write_config(shapes_data, out_dir, steps=STEPS + 2)
    latest = out_dir / "checkpoints" / "latest.json"
    rng = random.Random(13)
    kills, orphans_seen = 0, 0
    for cycle in range(6):
        process = start(config, slow_fsync=rng.choice([0.05, 0.2]))
        done = json.loads(latest.read_text())["step"] if latest.exists() else 0
        if cycle % 2 == 0:  # inside whichever write comes next
            reached = wait_for(lambda: bool(temp_files(out_dir)), process)
        else:
            target = done + rng.randint(0, 1)
            reached = wait_for(
                lambda: latest.exists() and json.loads(latest.read_text() or "{}").get("step", 0) >= target,
                               process)
            time.sleep(rng.uniform(0.0, 0.5))
        if not reached or process.poll() is not None:
            break  # it finished first
        kill(process)
        kills += 1
        orphans_seen += len(temp_files(out_dir))
    assert kills >= 4 and orphans_seen >= 1, (kills, orphans_seen)
    finish(config)
    assert temp_files(out_dir) == []
    straight = tmp_path / "straight"
    finish(write_config(shapes_data, straight, steps=STEPS + 2))
    assert_same_model(straight, out_dir)
    print(json.dumps({"kills": kills, "orphaned_temp_files_seen": orphans_seen}))
