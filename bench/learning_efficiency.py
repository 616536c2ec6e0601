"""Learning efficiency: does JEST reach uniform's accuracy with fewer total training FLOPs?

Same architecture, same pool, same seeds; every method gets the same total FLOP budget (scoring +
training + the reference's share, JEST.md), so uniform trains for more steps than JEST. Each run is
evaluated at regular points; curves are zero-shot top-1 against total FLOPs. For each method:

    final_metric            accuracy at the budget (mean over seeds, with the spread)
    flops_to_target         total FLOPs to first reach uniform's final accuracy (None: never)
    flops_ratio_vs_uniform  uniform's FLOPs to reach its own final accuracy / this method's (> 1: cheaper)

    python bench/learning_efficiency.py --quick                     # ~10 min on 2 CPU cores
    python bench/learning_efficiency.py --dataset emoji --seeds 3   # the full set of methods, hours
    python bench/learning_efficiency.py --ablations                  # + filter ratio, chunks, scores, noise

Prints the JSON summary and writes it, with the plots, under --out.
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from flexi_jest import efficiency, flops
from flexi_jest.config import (
    CacheReferenceConfig, MakeDataConfig, ModelConfig, TrainLearnerConfig, TrainReferenceConfig, TrainResult,
)
from flexi_jest.data.make import make_data
from flexi_jest.data.noise import NoiseConfig
from flexi_jest.reference_cache import cache_reference
from flexi_jest.train import train_learner, train_reference

# name -> learner config fields (tiny model: patch 8 is the paper's 16, patch 16 its 32)
METHODS: dict[str, dict[str, Any]] = {
    "uniform": {"method": "uniform"},
    "independent-learnability": {"method": "independent", "score": "learnability"},
    "independent-hard_learner": {"method": "independent", "score": "hard_learner"},
    "independent-easy_reference": {"method": "independent", "score": "easy_reference"},
    "joint-learnability": {"method": "joint", "score": "learnability"},
    "joint-hard_learner": {"method": "joint", "score": "hard_learner"},
    "joint-easy_reference": {"method": "joint", "score": "easy_reference"},
    "flexi-jest": {"method": "joint", "score": "learnability", "scoring_patch_size": 16, "train_patch_sizes": [8, 16]},
}
QUICK_METHODS = ["uniform", "joint-learnability", "flexi-jest"]


def learner_step_flops(cfg: TrainLearnerConfig, reference_dim: int) -> int:
    """FLOPs of one learner step (scoring + training), as the training loop counts them."""
    train = flops.training_step_flops(cfg.model, cfg.sub_batch_size, cfg.train_patch_sizes)
    if cfg.method == "uniform":
        return train
    uses_reference = cfg.score != "hard_learner"
    scoring = flops.scoring_step_flops(cfg.model, cfg.super_batch_size, cfg.scoring_patch_size or cfg.model.patch_size,
                                       cfg.sub_batch_size, cfg.method, cfg.score != "easy_reference",
                                       reference_dim if uses_reference else None)
    return train + scoring


def summarize(runs: dict[str, list[dict[str, Any]]], metric: str) -> dict[str, Any]:
    """efficiency.summarize over each method's seeds, plus what the benchmark also reports per method:
    steps, mean total FLOPs, final retrieval R@1 and the noisy share of what it trained on."""
    summary = efficiency.summarize({name: [r["curve"] for r in rs] for name, rs in runs.items()}, metric,
                                   {name: rs[0].get("reference_share_flops", 0.0) for name, rs in runs.items()})
    for name, rs in runs.items():
        summary["methods"][name].update(
            steps=rs[0]["steps"], total_flops=statistics.mean(r["total_flops"] for r in rs),
            final_retrieval_r1=statistics.mean(r.get("final_r1", math.nan) for r in rs),
            noisy_fraction_selected=statistics.mean(r["selection"].get("noisy_fraction_selected", math.nan) for r in rs))
    return summary


def plot(runs: dict[str, list[dict[str, Any]]], summary: dict[str, Any], out: Path, title: str) -> list[str]:
    """accuracy_vs_flops.png (the pipeline's report draws the same figure) and flops_ratio.png under out."""
    curves_png, ratio_png = out / "accuracy_vs_flops.png", out / "flops_ratio.png"
    efficiency.figure({name: [r["curve"] for r in rs] for name, rs in runs.items()}, summary, title).savefig(
        curves_png, dpi=110)
    efficiency.ratio_figure(summary).savefig(ratio_png, dpi=110)
    return [str(curves_png), str(ratio_png)]


def finished_run(out_dir: Path, steps: int) -> TrainResult | None:
    """The result of a run this benchmark already finished (same directory, same steps): a rerun of the
    benchmark after an interruption continues where it stopped instead of training again."""
    path = out_dir / "result.json"
    if not path.exists():
        return None
    result = TrainResult.model_validate_json(path.read_text())
    return result if result.steps == steps else None


def run_experiment(args: argparse.Namespace, out: Path, methods: list[str], noise_rate: float,
                   overrides: dict[str, Any], tag: str,
                   reuse: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Data at this noise rate -> reference -> cache -> every method x seed at one FLOP budget.
    `reuse`: runs of another experiment that are identical here (same data and budget), not rerun."""
    data_dir = out / "data" / (f"{args.dataset}-c{args.curated}-p{args.pool}-e{args.eval_size}"
                               f"-noise{int(noise_rate * 100)}")
    if not (data_dir / "eval" / "manifest.json").exists():
        make_data(MakeDataConfig(dataset=args.dataset, out_dir=str(data_dir), seed=0, curated_size=args.curated,
                                 pool_size=args.pool, eval_size=args.eval_size, noise=NoiseConfig.at_rate(noise_rate)))
    model = ModelConfig()
    reference_dir = data_dir / f"reference-s{args.reference_steps}"
    if (reference_dir / "result.json").exists():  # one reference per pool, shared by every experiment on it
        reference = TrainResult.model_validate_json((reference_dir / "result.json").read_text())
    else:
        reference = train_reference(TrainReferenceConfig(data=str(data_dir / "curated"), out_dir=str(reference_dir),
                                                         model=model, steps=args.reference_steps, batch_size=128,
                                                         progress=False))
    cache = cache_reference(CacheReferenceConfig(reference=reference.checkpoint, pool=str(data_dir / "pool")))
    reference_share = reference.flops.reference_training + cache.flops
    base = dict(pool=str(data_dir / "pool"), reference_cache=cache.cache_dir, reference_sha256=cache.reference_sha256,
                reference_training_flops=reference.flops.reference_training, reference_caching_flops=cache.flops,
                model=model, super_batch_size=args.super_batch, filter_ratio=0.8, n_chunks=args.chunks, progress=False,
                eval_data=[str(data_dir / "eval")], eval_max_samples=args.eval_size, log_every=10, checkpoint_every=10**6)
    base.update(overrides)
    # the budget: the joint-learnability run at --jest-steps, reference share included
    anchor = TrainLearnerConfig(**{**base, **METHODS["joint-learnability"], "out_dir": "unused", "steps": 1})
    budget = reference_share + args.jest_steps * learner_step_flops(anchor, model.embed_dim)
    runs: dict[str, list[dict[str, Any]]] = dict(reuse or {})
    for name in [m for m in methods if m not in runs]:
        for seed in range(args.seeds):
            fields = {**base, **METHODS[name], "seed": seed, "out_dir": str(out / tag / name / f"seed{seed}"),
                      "steps": 1}
            probe = TrainLearnerConfig(**fields)
            uses_reference = probe.method != "uniform" and probe.score != "hard_learner"
            own_budget = budget - (reference_share if uses_reference else 0.0)
            steps = max(1, round(own_budget / learner_step_flops(probe, model.embed_dim)))
            fields.update(steps=steps, eval_every=max(1, steps // args.eval_points), overwrite=True)
            started = time.perf_counter()
            result = finished_run(Path(fields["out_dir"]), steps) or train_learner(TrainLearnerConfig(**fields))
            r1 = efficiency.curve(result.metrics_path, f"{args.dataset}.image_to_text_r1")
            runs.setdefault(name, []).append({
                "seed": seed, "steps": steps, "total_flops": result.total_flops, "seconds": time.perf_counter() - started,
                "curve": efficiency.curve(result.metrics_path, f"{args.dataset}.top1"), "selection": result.selection,
                "final_r1": r1[-1][1] if r1 else math.nan,
                "reference_share_flops": reference_share if uses_reference else 0.0})
            print(f"[{tag}] {name} seed {seed}: {steps} steps, {result.total_flops / 1e9:.0f} GFLOP, "
                  f"top1 {runs[name][-1]['curve'][-1][1]:.3f}, {time.perf_counter() - started:.0f} s", file=sys.stderr)
    runs = {name: runs[name] for name in methods if name in runs}
    summary = summarize(runs, f"{args.dataset}.top1")
    summary.update(budget_flops=budget, reference_share_flops=reference_share, noise_rate=noise_rate,
                   overrides=dict(overrides))
    (out / tag).mkdir(parents=True, exist_ok=True)
    summary["plots"] = plot(runs, summary, out / tag, f"{args.dataset}, pool noise {noise_rate:.0%} ({tag})")
    (out / tag / "runs.json").write_text(json.dumps(runs, indent=1))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 methods, 2 seeds, small pool: ~10 min on 2 cores")
    parser.add_argument("--dataset", default="shapes", choices=["shapes", "emoji"])
    parser.add_argument("--methods", default=None, help=f"comma-separated from {sorted(METHODS)} (default: all)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--noise", type=float, default=0.6, help="pool noise rate")
    parser.add_argument("--jest-steps", type=int, default=300, help="the budget: joint-learnability at this many steps")
    parser.add_argument("--super-batch", type=int, default=640)
    parser.add_argument("--chunks", type=int, default=16, help="n_chunks of joint selection (at most the sub-batch)")
    parser.add_argument("--reference-steps", type=int, default=300)
    parser.add_argument("--curated", type=int, default=2000)
    parser.add_argument("--pool", type=int, default=20000)
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--eval-points", type=int, default=10)
    parser.add_argument("--ablations", action="store_true", help="filter ratio, chunks, scores and noise ablations")
    parser.add_argument("--out", default="runs/bench/learning_efficiency")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.jest_steps, args.super_batch = 2, 60, 320
        args.reference_steps, args.curated, args.pool, args.eval_size, args.eval_points = 150, 1000, 6000, 300, 6
    methods = args.methods.split(",") if args.methods else (QUICK_METHODS if args.quick else list(METHODS))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {"benchmark": "learning_efficiency", "dataset": args.dataset, "quick": args.quick,
                              "seeds": args.seeds, "args": vars(args)}
    report["main"] = run_experiment(args, out, methods, args.noise, {}, "main")
    if args.ablations:
        main_runs = json.loads((out / "main" / "runs.json").read_text())
        # learner-only vs reference-only vs learnability scoring: the main experiment's joint-* methods
        ablations: dict[str, Any] = {}
        for ratio in (0.5, 0.9):  # 0.8 is the main experiment; joint vs independent at each ratio
            ablations[f"filter_{ratio}"] = run_experiment(
                args, out, ["uniform", "independent-learnability", "joint-learnability"], args.noise,
                {"filter_ratio": ratio}, f"filter{ratio}")
        for chunks in (1, 4):  # 16 is the main experiment; the FLOPs do not depend on it, so uniform is reused
            ablations[f"chunks_{chunks}"] = run_experiment(
                args, out, ["uniform", "joint-learnability"], args.noise, {"n_chunks": chunks}, f"chunks{chunks}",
                reuse={"uniform": main_runs["uniform"]} if "uniform" in main_runs else None)
        for rate in (0.0, 0.3, 0.8):  # the main experiment is --noise (0.6)
            if rate != args.noise:
                ablations[f"noise_{rate}"] = run_experiment(
                    args, out, ["uniform", "joint-learnability", "flexi-jest"], rate, {}, f"noise{rate}")
        report["ablations"] = ablations
    report["seconds"] = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
