"""The learning-efficiency benchmark's arithmetic (its runs are benchmarks, not tests)."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import learning_efficiency  # noqa: E402
from learning_efficiency import learner_step_flops, summarize  # noqa: E402

from flexi_jest.config import TrainLearnerConfig  # noqa: E402


def test_bench_summary_adds_its_own_figures():
    runs = {
        "uniform": [{"curve": [(1, 0.1), (2, 0.2), (4, 0.5)], "total_flops": 4, "steps": 40, "selection": {}},
                    {"curve": [(1, 0.1), (2, 0.2), (4, 0.3)], "total_flops": 4, "steps": 40, "selection": {}}],
        "jest": [{"curve": [(1, 0.2), (2, 0.4), (4, 0.5)], "total_flops": 4, "steps": 10, "selection": {}}],
        "bad": [{"curve": [(1, 0.0), (2, 0.1), (4, 0.2)], "total_flops": 4, "steps": 10, "selection": {}}],
    }
    summary = summarize(runs, "top1")
    assert summary["target"] == pytest.approx(0.4)  # the seed-mean curve's final value
    assert summary["methods"]["uniform"]["final_metric_std"] == pytest.approx(0.1)
    assert summary["methods"]["uniform"]["flops_ratio_vs_uniform"] == pytest.approx(1.0)
    jest, bad = summary["methods"]["jest"], summary["methods"]["bad"]
    assert jest["flops_to_target"] == 2 and jest["flops_ratio_vs_uniform"] == 2
    assert bad["flops_to_target"] is None and bad["flops_ratio_vs_uniform"] is None
    assert math.isnan(summary["methods"]["uniform"]["noisy_fraction_selected"])
    assert summary["methods"]["jest"]["steps"] == 10 and summary["methods"]["uniform"]["total_flops"] == 4


def test_step_flops_match_what_training_counts(shapes_data, reference_cache, tmp_path):
    from conftest import TEST_MODEL
    from flexi_jest.train import train_learner
    for fields in ({"method": "uniform"}, {"method": "offline-filter"}, {"method": "joint"},
                   {"method": "independent", "score": "hard_learner"},
                   {"method": "joint", "score": "easy_reference", "scoring_patch_size": 16,
                    "train_patch_sizes": [8, 16]}):
        cfg = TrainLearnerConfig(pool=shapes_data.splits["pool"].path, reference_cache=reference_cache.cache_dir,
                                 out_dir=str(tmp_path / str(len(str(fields)))), model=TEST_MODEL, super_batch_size=40,
                                 n_chunks=4,
                                 steps=2, progress=False, **fields)
        result = train_learner(cfg)
        learner_flops = result.flops.learner_scoring + result.flops.learner_training
        assert learner_flops == 2 * learner_step_flops(cfg, TEST_MODEL.embed_dim), fields


@pytest.mark.slow  # reason: the GPU bench as a subprocess on the CPU (14 s on 2 cores); its figures come from a GPU run
def test_gpu_throughput_bench_reports_every_part(tmp_path):
    """The bench's JSON on the CPU at a toy size (its figures come from a GPU run; see docs)."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "bench/gpu_throughput.py", "--presets", "tiny", "--super-batch", "40",
                           "--device", "cpu", "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    result = report["results"][0]
    assert result["preset"] == "tiny" and result["sub_batch"] == 8
    for part in ("scoring", "scoring_flexi", "training", "training_mixed"):
        assert result[part]["images_per_second"] > 0 and result[part]["tflops_per_second"] > 0
    for variant in ("jest_step", "flexi_jest_step"):
        assert sum(result[variant]["share"].values()) == pytest.approx(1.0)


@pytest.mark.slow  # reason: the learning-efficiency bench as a subprocess, every method at toy size (52 s on 2 cores)
def test_learning_efficiency_bench_end_to_end_at_toy_size(tmp_path):
    """The benchmark's whole path (data, reference, cache, three methods at one budget, summary, plots) at a
    toy size; its figures come from the documented runs (docs/results.md). A rerun resumes every finished run."""
    import subprocess
    import sys
    command = [sys.executable, "bench/learning_efficiency.py", "--seeds", "1", "--jest-steps", "4", "--super-batch",
               "40", "--chunks", "4",
               "--reference-steps", "3", "--curated", "100", "--pool", "400", "--eval-size", "50", "--eval-points", "2",
               "--methods", "uniform,joint-learnability,flexi-jest", "--out", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    main = report["main"]
    assert list(main["methods"]) == ["uniform", "joint-learnability", "flexi-jest"]
    for name, info in main["methods"].items():
        assert set(info) >= {"final_metric", "flops_to_target", "flops_ratio_vs_uniform"}
        assert info["total_flops"] <= main["budget_flops"] * 1.05, name  # one budget for every method
    assert main["methods"]["uniform"]["flops_ratio_vs_uniform"] == pytest.approx(1.0)
    assert main["methods"]["uniform"]["steps"] > main["methods"]["joint-learnability"]["steps"]
    assert all(Path(png).stat().st_size > 0 for png in main["plots"])
    assert json.loads((tmp_path / "summary.json").read_text())["main"]["target"] == main["target"]
    finished = {path: path.stat().st_mtime_ns for path in (tmp_path / "main").rglob("result.json")}
    assert len(finished) == 3
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and json.loads(rerun.stdout)["main"]["methods"] == main["methods"]
    assert {path: path.stat().st_mtime_ns for path in finished} == finished, "a rerun trains nothing again"


@pytest.mark.slow  # reason: three bench processes training toy runs (74 s on 2 cores)
def test_reuse_runs_takes_stored_methods_once_one_stored_run_reproduces(tmp_path):
    """--reuse-runs: a second --out trains only the methods the stored runs.json lacks, after training the first
    stored run again and finding its curve unchanged; a stored curve that the code does not reproduce (other
    data, reference or code) refuses the whole file, naming the run."""
    import subprocess
    import sys
    toy = [sys.executable, "bench/learning_efficiency.py", "--seeds", "1", "--jest-steps", "3", "--super-batch", "40",
           "--chunks", "4", "--reference-steps", "2", "--curated", "100", "--pool", "300", "--eval-size", "40",
           "--eval-points", "2"]
    first = subprocess.run([*toy, "--methods", "uniform,joint-learnability", "--out", str(tmp_path / "a")],
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    stored = tmp_path / "a" / "main" / "runs.json"
    command = [*toy, "--methods", "uniform,joint-learnability,independent-learnability", "--reuse-runs", str(stored),
               "--out", str(tmp_path / "b")]
    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "uniform seed 0 reproduced its stored curve" in second.stderr
    trained = sorted(p.parent.parent.name for p in (tmp_path / "b" / "main").rglob("result.json"))
    assert trained == ["independent-learnability", "uniform"]  # joint came from the stored file
    methods = json.loads(second.stdout)["main"]["methods"]
    assert methods["joint-learnability"]["final_metric"] == \
        json.loads(first.stdout)["main"]["methods"]["joint-learnability"]["final_metric"]
    runs = json.loads(stored.read_text())
    runs["uniform"][0]["curve"][-1][1] += 0.01  # a curve this code does not give
    stored.write_text(json.dumps(runs))
    refused = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "uniform seed 0 trained again gives" in refused.stderr
    assert "none is reused" in refused.stderr


def test_capped_regime_plan_keeps_the_reference_small_and_the_pool_unrepeated():
    """--regime capped: the reference's training within 10 % of uniform's budget, and a pool large enough that
    no method draws a sample (the offline filter: a kept sample) more than --max-repetition times."""
    from flexi_jest import flops
    args = learning_efficiency.parse_args(["--regime", "capped", "--uniform-steps", "500", "--super-batch", "80",
                                           "--samples-per-shard", "100"])
    assert args.methods_list == learning_efficiency.CAPPED_METHODS and args.cache_patch == 16
    plan = learning_efficiency.regime_plan(args, args.methods_list, {})
    model = learning_efficiency.model_config(args)
    reference_step = flops.training_step_flops(model, learning_efficiency.REFERENCE_BATCH, [model.patch_size])
    assert plan["reference_steps"] * reference_step <= 0.1 * plan["budget"] < (
        plan["reference_steps"] + 1) * reference_step
    base = dict(pool="unused", reference_cache="unused", model=model, super_batch_size=80, filter_ratio=0.8)
    worst = 0.0
    for name in args.methods_list:
        cfg = learning_efficiency.probe_config(args, name, base)
        steps = flops.steps_for_budget(plan["budget"], cfg, 0.0, model.embed_dim)  # no share: the most draws
        worst = max(worst, learning_efficiency.repetition(cfg, steps, plan["pool"]))
    assert 1.8 < worst <= 2.0 and plan["pool"] % 100 == 0
    assert learning_efficiency.method_fields("joint-learnability-f90", 80)["super_batch_size"] == 160  # sub-batch 16
    with pytest.raises(SystemExit, match="at most 10%"):
        learning_efficiency.regime_plan(learning_efficiency.parse_args(
            ["--regime", "capped", "--uniform-steps", "500", "--super-batch", "80", "--reference-steps", "10000"]),
            ["uniform"], {})
    # an invocation with a subset of the methods (e.g. two in parallel) plans the whole regime's pool
    subset = learning_efficiency.parse_args(["--regime", "capped", "--uniform-steps", "500", "--super-batch", "80",
                                             "--samples-per-shard", "100", "--methods", "joint-learnability"])
    assert learning_efficiency.regime_plan(subset, subset.methods_list, {}) == plan


def test_paper_regime_plan_trains_the_reference_for_its_epochs_and_every_learner_on_uniforms_learner_flops():
    """--regime paper: the reference trains --reference-epochs epochs of the curated split whatever the budget,
    every learner runs on uniform's learner FLOPs (JEST at filter 80 % about 3/8 of uniform's steps: a separate
    scoring forward of the super-batch, 5 forwards, on top of 3 for training), and the pool is large enough that
    no method, filter+jest's kept fifth included, draws a sample more than --max-repetition times."""
    from flexi_jest import flops
    args = learning_efficiency.parse_args(["--regime", "paper", "--uniform-steps", "500", "--super-batch", "80",
                                           "--samples-per-shard", "100", "--curated", "1280", "--reference-epochs",
                                           "3"])
    assert args.methods_list == learning_efficiency.PAPER_METHODS and "filter+jest" in args.methods_list
    assert args.eval_size == 5000
    plan = learning_efficiency.regime_plan(args, args.methods_list, {})
    assert plan["reference_steps"] == 3 * 1280 // learning_efficiency.REFERENCE_BATCH
    model = learning_efficiency.model_config(args)
    base = dict(pool="unused", reference_cache="unused", model=model, super_batch_size=80, filter_ratio=0.8)
    steps = {name: flops.steps_for_budget(plan["budget"], learning_efficiency.probe_config(args, name, base), 0.0,
                                          model.embed_dim) for name in args.methods_list}
    assert steps["uniform"] == steps["offline-filter"] == 500
    assert 0.3 < steps["joint-learnability"] / 500 < 0.4  # ~3/8 of uniform's steps at the tiny preset
    assert steps["filter+jest"] == steps["joint-learnability"]
    worst = max(learning_efficiency.repetition(learning_efficiency.probe_config(args, name, base), steps[name],
                                               plan["pool"]) for name in args.methods_list)
    assert 1.8 < worst <= 2.0
    filter_jest = learning_efficiency.probe_config(args, "filter+jest", base)
    assert learning_efficiency.kept_fraction(filter_jest) == 0.3 and flops.uses_reference(filter_jest)


def test_a_finished_run_is_reused_only_on_the_same_steps_and_data(tmp_path):
    from flexi_jest.config import FlopsBreakdown, TrainResult
    result = TrainResult(out_dir=str(tmp_path), checkpoint="m.pt", checkpoint_sha256="0" * 64, steps=7,
                         final_loss=1.0, seconds=1.0, images_per_second=1.0, flops=FlopsBreakdown(), total_flops=1.0,
                         metrics_path="metrics.jsonl")
    (tmp_path / "result.json").write_text(result.model_dump_json())
    (tmp_path / "run_config.json").write_text(json.dumps({"sha256": "x",
                                                          "config": {"pool": "p1", "reference_cache": "c1"}}))
    data = {"pool": "p1", "reference_cache": "c1"}
    assert learning_efficiency.finished_run(tmp_path, 7, data).steps == 7
    assert learning_efficiency.finished_run(tmp_path, 8, data) is None
    assert learning_efficiency.finished_run(tmp_path, 7, {**data, "pool": "another pool"}) is None
    assert learning_efficiency.finished_run(tmp_path, 7, {**data, "optim": {"lr": 0.1}}) is None  # other hparams


def test_iterations_table_reads_uniform_steps_to_each_methods_final(tmp_path, monkeypatch, capsys):
    import iterations_table
    runs = {"uniform": [{"steps_curve": [[0, 0.0], [100, 0.1], [200, 0.2]]}],
            "joint": [{"steps_curve": [[0, 0.0], [50, 0.15]]}, {"steps_curve": [[0, 0.0], [50, 0.05]]}],
            "best": [{"steps_curve": [[0, 0.0], [40, 0.3]]}]}
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    monkeypatch.setattr(sys, "argv", ["iterations_table.py", str(tmp_path / "runs.json")])
    iterations_table.main()
    out = capsys.readouterr().out
    assert "| joint | 50 | 0.100 | 0.050 | 0.200 (200) |" in out  # seed mean 0.1; uniform at step 50: 0.05
    assert "| joint | 50 | 0.100 | 100 | 2.00x |" in out  # uniform needs 100 steps to reach 0.1
    assert "| best | 40 | 0.300 | never | - |" in out
