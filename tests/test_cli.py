import json
import os
import subprocess
import sys

import pytest

from flexi_jest.cli import main, parse_overrides


def test_parse_overrides_nests_and_types_values():
    assert parse_overrides(["optim.lr=0.001", "train_patch_sizes=[8, 16]", "method=joint", "resume=false"]) == {
        "optim": {"lr": 0.001}, "train_patch_sizes": [8, 16], "method": "joint", "resume": False}


def test_bad_value_is_rejected_with_the_field_named(capsys):
    assert main(["train-learner", "--set", "filter_ratio=1.5", "--set", "reference_cache=x", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "invalid config for train-learner" in err and "filter_ratio" in err and "1.5" in err


def test_wrong_type_and_unknown_field_are_rejected(capsys):
    assert main(["make-data", "--set", "pool_size=lots", "--print-config"]) == 2
    assert "pool_size" in capsys.readouterr().err
    assert main(["evaluate", "--set", "no_such_field=1", "--print-config"]) == 2
    assert "no_such_field" in capsys.readouterr().err


def test_config_file_profile_and_overrides_compose(tmp_path, capsys):
    path = tmp_path / "learner.yaml"
    path.write_text("method: independent\nreference_cache: /x\noptim:\n  lr: 0.01\n")
    assert main(["train-learner", "--config", str(path), "--set", "optim.warmup_steps=5", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["method"] == "independent" and cfg["optim"]["lr"] == 0.01 and cfg["optim"]["warmup_steps"] == 5
    assert main(["train-learner", "--profile", "paper", "--set", "reference_cache=/x", "--print-config"]) == 0
    paper = json.loads(capsys.readouterr().out)
    assert paper["model"]["vision_width"] == 768 and paper["super_batch_size"] * (
        1 - paper["filter_ratio"]) == pytest.approx(32768)


def test_console_script_runs_a_stage(tmp_path):
    out = subprocess.run([sys.executable, "-m", "flexi_jest.cli", "make-data", "--set", f"out_dir={tmp_path}",
                          "--set", "curated_size=10", "--set", "pool_size=20", "--set", "eval_size=10"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["splits"]["pool"]["num_samples"] == 20
    assert (tmp_path / "pool" / "manifest.json").exists() and (tmp_path / "result.json").exists()


def test_demo_runs_every_stage_end_to_end(tmp_path, capsys, monkeypatch):
    from flexi_jest import config
    monkeypatch.setitem(config.PROFILES, "tiny", {
        "make-data": {"curated_size": 200, "pool_size": 600, "eval_size": 100, "samples_per_shard": 200},
        "train-reference": {"steps": 4, "batch_size": 32, "progress": False},
        "train-learner": {"steps": 3, "super_batch_size": 80, "progress": False},
    })
    assert main(["demo", "--workdir", str(tmp_path), "--methods", "uniform,flexi-jest"]) == 0
    out = capsys.readouterr().out
    assert "flexi-jest" in out and "reference" in out and "end-to-end wall time" in out
    rows = json.loads((tmp_path / "demo_results.json").read_text())
    assert [r["method"] for r in rows] == ["uniform", "flexi-jest", "reference"]
    assert rows[1]["total_flops"] > rows[1]["learner_flops"] > 0  # the reference's share is counted


def test_cli_stages_log_the_run_the_pipeline_stage_would(tmp_path, monkeypatch, capsys):
    """MLFLOW_TRACKING_URI set (or --track): a CLI stage is an MLflow run with the config as params and the
    result as metrics and result.json, as the pipeline's stage logs it; --overwrite reaches the config."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    # MLflow remembers the active experiment per process (and in MLFLOW_EXPERIMENT_ID): forget this store's after
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    assert main(["make-data", "--set", f"out_dir={tmp_path / 'data'}", "--set", "curated_size=10", "--set",
                 "pool_size=20", "--set", "eval_size=10", "--experiment", "cli-tracked"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["splits"]["pool"]["num_samples"] == 20
    run_id = captured.err.split("tracked as MLflow run ")[1].split()[0]
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    assert run.data.tags["flexi_jest.stage"] == "make-data" and run.data.params["pool_size"] == "20"
    assert run.data.metrics["splits.pool.num_samples"] == 20
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.json", "result.json"}
    assert main(["train-reference", "--overwrite", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["overwrite"] is True
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert main(["make-data", "--set", f"out_dir={tmp_path / 'untracked'}", "--set", "curated_size=10", "--set",
                 "pool_size=20", "--set", "eval_size=10"]) == 0
    assert "tracked as" not in capsys.readouterr().err


@pytest.mark.slow  # reason: a fresh interpreter building the real ViT-B-16-SigLIP (12 s on 2 cores); the same
# error in one process is test_models' test_a_hugging_face_tokenizer_missing_offline_fails_at_once_with_how_to_get_it
def test_a_tokenizer_missing_offline_is_one_line_from_the_cli(tmp_path):
    """The real ViT-B-16-SigLIP without its Hugging Face tokenizer in the local cache: exit status 2 and one line
    naming the tokenizer and the fix, no traceback."""
    from huggingface_hub import try_to_load_from_cache
    if isinstance(try_to_load_from_cache("timm/ViT-B-16-SigLIP", "tokenizer_config.json"), str):
        pytest.skip("this machine's Hugging Face cache holds timm/ViT-B-16-SigLIP's tokenizer: not missing here")
    out = subprocess.run([sys.executable, "-m", "flexi_jest.cli", "train-reference", "--set", "model=ViT-B-16-SigLIP",
                          "--set", f"data={tmp_path / 'data'}", "--set", f"out_dir={tmp_path / 'out'}",
                          "--set", "steps=1", "--set", "device=cpu"],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("train-reference: ") and "timm/ViT-B-16-SigLIP" in line and "hf download" in line


# ---- errors a user can cause: one line on stderr, a non-zero exit, no traceback (issue 20, finding 12) ----------


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


CLASSIFY_IN_A_FRESH_PROCESS = """
import json, sys
from flexi_jest.cli import user_error
from flexi_jest.data.access import SpecError
from flexi_jest.storage import StorageError
print(json.dumps({"spec": user_error(SpecError("dataset spec 'x': missing\\n shard")),
                  "storage": user_error(StorageError("s3://b/k: unreachable")),
                  "bug": user_error(KeyError("k")),
                  "heavy": sorted(m for m in ("torch", "open_clip", "mlflow", "flexi_jest.checkpoint")
                                  if m in sys.modules)}))
"""


def test_classifying_an_error_imports_nothing_heavy():
    """A one-line error is classified by its base (errors.py): reporting a SpecError never imports torch, open_clip
    or mlflow (importing the checkpoint module's error class alone loaded them, 8 s before a one-line error)."""
    done = subprocess.run([sys.executable, "-c", CLASSIFY_IN_A_FRESH_PROCESS], capture_output=True, text=True,
                          check=True, timeout=120)
    seen = json.loads(done.stdout)
    assert seen["spec"] == ["dataset spec 'x': missing shard", 2] and seen["storage"] == ["s3://b/k: unreachable", 1]
    assert seen["bug"] is None and seen["heavy"] == []


def test_a_spec_error_is_one_line(tmp_path, capsys):
    """A brace pattern over shards that are not there: SpecError (it was a traceback)."""
    spec = f"{tmp_path}/missing/{{00000..00002}}.tar"
    assert main(["train-reference", "--set", f"data={spec}", "--set", f"out_dir={tmp_path / 'out'}",
                 "--set", "steps=1"]) == 2
    line = one_line(capsys)
    assert line.startswith(f"train-reference: dataset spec '{spec}': missing shard")


def test_a_shard_error_is_one_line(tmp_path, capsys):
    """A split whose manifest.json is not JSON: ShardError naming the manifest."""
    (tmp_path / "split").mkdir()
    (tmp_path / "split" / "manifest.json").write_text("{not json")
    assert main(["train-reference", "--set", f"data={tmp_path / 'split'}", "--set", f"out_dir={tmp_path / 'out'}",
                 "--set", "steps=1"]) == 2
    assert one_line(capsys).startswith(f"train-reference: corrupt manifest {tmp_path / 'split' / 'manifest.json'}")


def test_a_cache_error_is_one_line(reference_cache, shapes_data, tmp_path, capsys):
    """A learner given a reference cache made by another reference than the one it names: CacheError."""
    other = "ab" * 32
    assert main(["train-learner", "--set", f"pool={shapes_data.splits['pool'].path}", "--set", "method=joint",
                 "--set", f"reference_cache={reference_cache.cache_dir}", "--set", f"reference_sha256={other}",
                 "--set", f"out_dir={tmp_path / 'out'}", "--set", "steps=1"]) == 2
    line = one_line(capsys)
    assert line.startswith("train-learner: ") and reference_cache.cache_dir in line and other[:12] in line


def test_a_storage_error_is_one_line_with_status_1(tmp_path, capsys):
    """A model file that is not there: StorageError (the place failed, not the config: exit status 1)."""
    assert main(["evaluate", "--set", f"model={tmp_path / 'none.pt'}", "--set", f"eval_data=[{tmp_path}]"]) == 1
    assert one_line(capsys) == f"evaluate: no such file: {tmp_path / 'none.pt'}"


@pytest.mark.slow  # reason: make-data in a fresh interpreter in a private mount namespace (11 s on 2 cores)
def test_a_full_disk_is_one_line_naming_the_file(tmp_path):
    """make-data onto a real file system that fills up (a 64 KiB tmpfs, mounted in a private mount namespace of the
    child only: nothing to unmount): ENOSPC names the file being written, exit status 1, no traceback."""
    import shutil
    full = tmp_path / "full"
    full.mkdir()
    if not shutil.which("unshare"):
        pytest.skip("needs util-linux's unshare to mount a small tmpfs in a private namespace")
    probe = subprocess.run(["unshare", "-r", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {full}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user+mount namespace here: {probe.stderr.strip()}")
    command = (f"mount -t tmpfs -o size=64k tmpfs {full} && exec {sys.executable} -m flexi_jest.cli make-data "
               f"--set out_dir={full}/data --set curated_size=40 --set pool_size=80 --set eval_size=20")
    out = subprocess.run(["unshare", "-r", "-m", "sh", "-c", command], capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith(f"make-data: no space left on device writing {full}/data/"), line
    assert "[Errno 28]" in line
