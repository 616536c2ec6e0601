"""Learning efficiency: does JEST reach uniform's accuracy with fewer total training FLOPs?

Same architecture, same pool, same seeds; every method gets the same total FLOP budget (scoring +
training + the reference's share, docs/method.md), so uniform trains for more steps than JEST. Each run is
evaluated at regular points; curves are zero-shot top-1 against total FLOPs and against steps. For each method:

    final_metric            accuracy at the budget (mean over seeds, with the spread)
    flops_to_target         total FLOPs to first reach uniform's final accuracy (None: never)
    flops_ratio_vs_uniform  uniform's FLOPs to reach its own final accuracy / this method's (> 1: cheaper);
                            *_learner_only: the same with the reference's share left out (amortised)
    steps_to_target         training steps (iterations) to reach it, and steps_ratio_vs_uniform
    vs_offline_filter       the same ratios against the offline filter (CLIP-score filtering) when it ran
    repetition              how many times the method draws each pool sample on average (offline filter:
                            each kept sample)

Three regimes:
  default   the budget is joint learnability at --jest-steps plus the reference's share (the runs of
            docs/results.md: a small pool drawn many times, the reference a large share of the budget)
  paper     (--regime paper) the paper's count (docs/method.md): every learner gets uniform's learner FLOPs at
            --uniform-steps (its scoring and training; the reference's cached embeddings free), so JEST at
            filter 80 % trains about 3/8 of uniform's steps; the reference trains --reference-epochs epochs of
            --curated (default 10, the paper's), evaluated on a held-out validation split each epoch (the
            saturation rule: under --plateau-points gained over its last 20 %), and caches the pool once at
            --cache-patch (default 16); both are reported, and charged in the second accounting ("charged",
            with the break-even learner count); --eval-size 5,000 by default; --experiments reference and batch
            add the reference-strength and sub-batch diagnostics
  capped    (--regime capped) the budget is uniform at --uniform-steps; the reference trains on --curated
            for at most 10 % of that budget (--reference-steps: by default the most that fits) and its caching
            pass over the pool is charged on top, at --cache-patch (default 16, the Flexi scoring patch: a
            FlexiViT reference scores like the learner)
  In the paper and capped regimes the pool (--pool 0: automatic) is large enough that no method draws a pool
  sample more than --max-repetition times, and uniform's plateau is judged by the rule "under
  --plateau-points top-1 gained over the last 20 % of its budget".

    python bench/learning_efficiency.py --quick                     # ~8 min on 2 CPU cores
    python bench/learning_efficiency.py --dataset emoji --seeds 3   # the full set of methods, hours
    python bench/learning_efficiency.py --ablations                  # + filter ratio, chunks, scores, noise
    python bench/learning_efficiency.py --regime capped --sweep --out runs/bench/paper-sweep   # uniform-only sweep
    python bench/learning_efficiency.py --regime capped --hparams runs/bench/paper-sweep/sweep.json \
        --out runs/bench/capped                                       # the capped regime (hours; docs/results.md)
    python bench/learning_efficiency.py --regime paper --uniform-steps 600 --experiments prepare \
        --out runs/bench/paper                     # data, reference, cache; then (two processes can share them):
    python bench/learning_efficiency.py --regime paper --uniform-steps 600 --experiments main,reference,batch \
        --out runs/bench/paper                                        # the paper's count (docs/results.md)

The sweep (--sweep) trains uniform alone on the regime's budget and pool for each value of learning rate,
warmup, weight decay and batch size in turn (a coordinate sweep: each knob's best, by top-1 on a held-out
validation split generated with another seed, is kept for the next knob); it never reads the eval split.
--hparams then sets every method's optimiser and batch size from its result.

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

import torch

from flexi_jest import efficiency, flops
from flexi_jest.checkpoint import load_model
from flexi_jest.config import (
    METHOD_PRESETS,
    MODEL_PRESETS,
    CacheReferenceConfig,
    CacheReferenceResult,
    MakeDataConfig,
    ModelConfig,
    NoiseConfig,
    OptimConfig,
    TrainLearnerConfig,
    TrainReferenceConfig,
    TrainResult,
)
from flexi_jest.data.make import make_data
from flexi_jest.data.noise import SAMPLE_KINDS
from flexi_jest.evaluate import evaluate_model
from flexi_jest.flops import learner_step_flops  # noqa: F401  (re-exported: tests/test_bench.py)
from flexi_jest.reference_cache import ReferenceCache, cache_reference
from flexi_jest.train import train_learner, train_reference

# name -> learner config fields (tiny model: patch 8 is the paper's 16, patch 16 its 32). A method with its own
# filter_ratio keeps the learner's sub-batch and scales its super-batch (the paper's filter-ratio sweep).
METHODS: dict[str, dict[str, Any]] = {
    "uniform": METHOD_PRESETS["uniform"],
    "offline-filter": METHOD_PRESETS["offline-filter"],  # DataComp's CLIP-score top 30 %
    "offline-filter-k20": {"method": "offline-filter", "offline_keep_ratio": 0.2},  # filter 80 %'s keep rate
    "independent-learnability": {"method": "independent", "score": "learnability"},
    "independent-hard_learner": {"method": "independent", "score": "hard_learner"},
    "independent-easy_reference": {"method": "independent", "score": "easy_reference"},
    "joint-learnability": METHOD_PRESETS["jest"],
    "joint-learnability-f50": {"method": "joint", "score": "learnability", "filter_ratio": 0.5},
    "joint-learnability-f90": {"method": "joint", "score": "learnability", "filter_ratio": 0.9},
    "joint-hard_learner": {"method": "joint", "score": "hard_learner"},
    "joint-easy_reference": {"method": "joint", "score": "easy_reference"},
    "flexi-jest": METHOD_PRESETS["flexi-jest"],
    "filter+jest": METHOD_PRESETS["filter+jest"],
}
DEFAULT_METHODS = [m for m in METHODS if m not in ("offline-filter-k20", "joint-learnability-f50",
                                                   "joint-learnability-f90")]
QUICK_METHODS = ["uniform", "joint-learnability", "flexi-jest", "offline-filter"]
CAPPED_METHODS = ["uniform", "joint-learnability-f50", "joint-learnability", "joint-learnability-f90", "flexi-jest",
                  "offline-filter", "offline-filter-k20", "independent-easy_reference"]
PAPER_METHODS = ["uniform", "offline-filter", "offline-filter-k20", "independent-learnability", "joint-learnability",
                 "flexi-jest", "filter+jest"]
REGIME_METHODS = {"capped": CAPPED_METHODS, "paper": PAPER_METHODS}
BASE_FILTER = 0.8  # the filter ratio of --super-batch; sub-batch = super-batch x (1 - 0.8)
REFERENCE_BATCH = 128
CAPPED_REFERENCE_SHARE = 0.10  # the capped regime: the reference's training at most this share of uniform's budget


def method_fields(name: str, super_batch: int) -> dict[str, Any]:
    """The learner config fields of a method: a method with its own filter ratio keeps the sub-batch of
    super_batch at BASE_FILTER and draws a super-batch of sub / (1 - its ratio)."""
    fields = dict(METHODS[name])
    if "filter_ratio" in fields:
        sub = round(super_batch * (1 - BASE_FILTER))
        fields["super_batch_size"] = round(sub / (1 - fields["filter_ratio"]))
    return fields


def draws_per_step(cfg: TrainLearnerConfig) -> int:
    """Pool samples one learner step draws: the sub-batch for uniform and the offline filter, else the super-batch."""
    return cfg.sub_batch_size if cfg.method in ("uniform", "offline-filter") else cfg.super_batch_size


def kept_fraction(cfg: TrainLearnerConfig) -> float:
    """The fraction of the pool a method draws from: the offline filter's (or the pre-filter's) keep ratio, else 1."""
    if cfg.method == "offline-filter":
        return cfg.offline_keep_ratio
    return cfg.prefilter_keep_ratio or 1.0


def repetition(cfg: TrainLearnerConfig, steps: int, pool_size: int) -> float:
    """How many times a run draws each pool sample on average (the offline filter: each kept sample)."""
    return steps * draws_per_step(cfg) / (pool_size * kept_fraction(cfg))


def trained_on(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """What a method trained on, mean over seeds: the share of each sample kind (SAMPLE_KINDS) in what it
    selected and in what it drew, over the whole run and over its first and last fifth of steps, and the mean own
    score (learnability, ...) of the selected examples against the super-batch's."""
    def mean_of(key: str, part: str = "all") -> float:
        values = [r["selection_parts"][part].get(key) for r in rs if "selection_parts" in r]
        values = [v for v in values if v is not None]
        return statistics.mean(values) if values else math.nan

    out: dict[str, Any] = {}
    for part in ("all", "first_fifth", "last_fifth"):
        out[part] = {f"{side}_{kind}": mean_of(f"{side}_{kind}", part)
                     for side in ("selected", "drawn") for kind in SAMPLE_KINDS}
        out[part].update(score_selected_mean=mean_of("score_selected_mean", part),
                         score_superbatch_mean=mean_of("score_superbatch_mean", part))
    return out


def summarize(runs: dict[str, list[dict[str, Any]]], metric: str) -> dict[str, Any]:
    """efficiency.summarize over each method's seeds (FLOPs and, where recorded, steps to uniform's final metric,
    under both accountings, and the break-even learner count), plus what the benchmark also reports per method:
    steps, mean total FLOPs, final retrieval R@1, what it trained on (noise kinds, hard negatives, scores), its
    pool repetition, and its ratios against the offline filter when it ran."""
    curves = {name: [r["curve"] for r in rs] for name, rs in runs.items()}
    step_curves = {name: [r["steps_curve"] for r in rs] for name,
                   rs in runs.items() if all("steps_curve" in r for r in rs)}
    shares = {name: rs[0].get("reference_share_flops", 0.0) for name, rs in runs.items()}
    summary = efficiency.summarize(curves, metric, shares, step_curves=step_curves)
    for name, rs in runs.items():
        summary["methods"][name].update(
            steps=rs[0]["steps"], total_flops=statistics.mean(r["total_flops"] for r in rs),
            learner_flops=statistics.mean(r["total_flops"] - r.get("reference_share_flops", 0.0) for r in rs),
            final_retrieval_r1=statistics.mean(r.get("final_r1", math.nan) for r in rs),
            noisy_fraction_selected=statistics.mean(
                r["selection"].get("noisy_fraction_selected", math.nan) for r in rs),
            trained_on=trained_on(rs))
        if "repetition" in rs[0]:
            summary["methods"][name]["repetition"] = rs[0]["repetition"]
    if "offline-filter" in runs:
        offline = efficiency.summarize(curves, metric, shares, baseline="offline-filter", step_curves=step_curves)
        summary["offline_filter_target"] = offline["target"]
        for name, info in offline["methods"].items():
            summary["methods"][name]["vs_offline_filter"] = {  # the offline filter's final metric as the target
                "flops_to_target": info["flops_to_target"], "flops_ratio": info["flops_ratio_vs_uniform"],
                "flops_ratio_learner_only": info["flops_ratio_vs_uniform_learner_only"],
                "steps_to_target": info.get("steps_to_target"), "steps_ratio": info.get("steps_ratio_vs_uniform"),
                "accountings": info["accountings"], "break_even_runs": info["break_even_runs"]}
    return summary


def plot(runs: dict[str, list[dict[str, Any]]], summary: dict[str, Any], out: Path, title: str) -> list[str]:
    """accuracy_vs_flops.png (the pipeline's report draws the same figure) and flops_ratio.png under out."""
    curves_png, ratio_png = out / "accuracy_vs_flops.png", out / "flops_ratio.png"
    efficiency.figure({name: [r["curve"] for r in rs] for name, rs in runs.items()}, summary, title).savefig(
        curves_png, dpi=110)
    efficiency.ratio_figure(summary).savefig(ratio_png, dpi=110)
    return [str(curves_png), str(ratio_png)]


def finished_run(out_dir: Path, steps: int, data: dict[str, Any] | None = None) -> TrainResult | None:
    """The result of a run this benchmark already finished (same directory, same steps, and the same `data`
    fields of its config: pool, reference cache, optimiser): a rerun of the benchmark after an interruption
    continues where it stopped instead of training again; a run on other data is trained again."""
    path = out_dir / "result.json"
    if not path.exists():
        return None
    result = TrainResult.model_validate_json(path.read_text())
    config = json.loads((out_dir / "run_config.json").read_text()) if (out_dir / "run_config.json").exists() else {}
    same_data = all(config.get("config", config).get(k) == v for k, v in (data or {}).items())
    return result if result.steps == steps and same_data else None


def model_config(args: argparse.Namespace) -> ModelConfig:
    return MODEL_PRESETS[args.model]


def make_splits(args: argparse.Namespace, out: Path, noise_rate: float, pool_size: int) -> Path:
    """The dataset (curated, pool, eval) at this noise rate and pool size, generated once under out/data."""
    model = model_config(args)
    preset = "" if args.model == "tiny" else f"-{args.model}"
    data_dir = out / "data" / (f"{args.dataset}{preset}-c{args.curated}-p{pool_size}-e{args.eval_size}"
                               f"-noise{int(noise_rate * 100)}")
    if not (data_dir / "eval" / "manifest.json").exists():
        make_data(MakeDataConfig(dataset=args.dataset, out_dir=str(data_dir), seed=0, curated_size=args.curated,
                                 pool_size=pool_size, eval_size=args.eval_size, image_size=model.image_size,
                                 samples_per_shard=args.samples_per_shard, noise=NoiseConfig.at_rate(noise_rate)))
    return data_dir


def validation_split(args: argparse.Namespace, out: Path) -> str:
    """A held-out validation split for the sweep: the generator's eval split drawn with another seed (never the
    eval split the results report)."""
    model = model_config(args)
    data_dir = out / "data" / f"{args.dataset}-{args.model}-validation-e{args.eval_size}-seed{args.validation_seed}"
    if not (data_dir / "eval" / "manifest.json").exists():
        make_data(MakeDataConfig(dataset=args.dataset, out_dir=str(data_dir), seed=args.validation_seed,
                                 curated_size=1, pool_size=1, eval_size=args.eval_size, image_size=model.image_size))
    return str(data_dir / "eval")


def reference_and_cache(args: argparse.Namespace, out: Path, data_dir: Path, reference_steps: int
                        ) -> tuple[TrainResult, CacheReferenceResult, dict[str, Any]]:
    """The reference (trained once per dataset, step count and optimiser, shared by every experiment on it), its
    cache of the pool at --cache-patch (reused when the same reference made it), and what the report says of it.

    The paper regime trains it for --reference-epochs epochs of the curated split, evaluating on the held-out
    validation split (never the eval split) after each epoch, and judges saturation by the plateau rule: its
    validation top-1 rose by less than --plateau-points over the last 20 % of its epochs. Its top-1 on the eval
    split, the one the learners are judged on, is measured once at the end."""
    model = model_config(args)
    paper = args.regime == "paper"
    epoch_steps = max(1, args.curated // REFERENCE_BATCH)
    name = f"reference-s{reference_steps}" + (f"-lr{args.reference_optim.lr:g}" if paper else "")
    reference_dir = data_dir / name
    if (reference_dir / "result.json").exists():
        reference = TrainResult.model_validate_json((reference_dir / "result.json").read_text())
    else:
        extra = dict(eval_every=epoch_steps, eval_data=[validation_split(args, out)], eval_max_samples=args.eval_size,
                     optim=args.reference_optim, checkpoint_every=10**6) if paper else {}
        reference = train_reference(TrainReferenceConfig(
            data=str(data_dir / "curated"), out_dir=str(reference_dir), model=model, steps=reference_steps,
            batch_size=REFERENCE_BATCH, progress=False, **extra))
    info: dict[str, Any] = {"reference_steps": reference_steps, "reference_epochs": reference_steps / epoch_steps,
                            "reference_training_flops": reference.flops.reference_training}
    if paper:
        eval_path = reference_dir / "eval_top1.json"
        if not eval_path.exists():
            net, _ = load_model(reference.checkpoint, "cpu")
            metrics = evaluate_model(net, [str(data_dir / "eval")], max_samples=args.eval_size)
            eval_path.write_text(json.dumps({key: m.model_dump() for key, m in metrics.items()}))
        info["reference_top1"] = json.loads(eval_path.read_text())[args.dataset]["top1"]
        validation = efficiency.curve(reference.metrics_path, f"{args.dataset}.top1", "step")
        gain = efficiency.gain_over_last(validation, 0.2) if len(validation) >= 2 else math.nan
        info.update(reference_validation_curve=[(step / epoch_steps, top1) for step, top1 in validation],
                    reference_saturation={
                        "rule": f"validation top-1 rose by less than {args.plateau_points} over the last 20 % of its "
                                "epochs", "gain_over_last_20_percent": gain, "saturated": gain < args.plateau_points})
    patch = args.cache_patch or model.patch_size
    cache_dir = reference_dir / f"cache-p{patch}"
    if (cache_dir / "manifest.json").exists() and \
            ReferenceCache(str(cache_dir)).manifest["reference_sha256"] == reference.checkpoint_sha256:
        manifest = ReferenceCache(str(cache_dir)).manifest
        cache = CacheReferenceResult(cache_dir=str(cache_dir), reference_sha256=manifest["reference_sha256"],
                                     num_samples=manifest["num_samples"], num_shards=len(manifest["shards"]),
                                     skipped=manifest["skipped"], seconds=0.0, flops=manifest["flops"])
    else:
        cache = cache_reference(CacheReferenceConfig(reference=reference.checkpoint, pool=str(data_dir / "pool"),
                                                     out_dir=str(cache_dir), patch_size=patch))
    info["reference_caching_flops"] = cache.flops
    return reference, cache, info


def probe_config(args: argparse.Namespace, name: str, base: dict[str, Any]) -> TrainLearnerConfig:
    """A method's config without its steps (for its step FLOPs and draws)."""
    return TrainLearnerConfig(**{**base, **method_fields(name, args.super_batch), "out_dir": "unused", "steps": 1})


def regime_plan(args: argparse.Namespace, methods: list[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """The budget, reference steps and pool size of the paper or the capped regime, from --uniform-steps: the
    budget is uniform's learner FLOPs at --uniform-steps; the pool is large enough that no method draws a sample
    more than --max-repetition times (each method's steps counted on the learner budget: for the capped regime,
    which also charges the reference, an upper bound).

    paper: the reference trains --reference-epochs epochs of the curated split (the paper trains it to
    saturation; its cost is reported, not taken from the learners' budget). capped: it trains for at most 10 % of
    the budget (--reference-steps: by default the most that fits)."""
    model = model_config(args)
    batch = args.budget_super_batch  # the batch the regime was asked for: the sweep's batches keep its budget and pool
    base = dict(pool="unused", reference_cache="unused", model=model, super_batch_size=batch,
                filter_ratio=BASE_FILTER, n_chunks=args.chunks, **overrides)

    def planned(name: str) -> TrainLearnerConfig:
        return TrainLearnerConfig(**{**base, **method_fields(name, batch), "out_dir": "unused", "steps": 1})

    budget = args.uniform_steps * flops.learner_step_flops(planned("uniform"), model.embed_dim)
    if args.regime == "paper":
        reference_steps = args.reference_steps or max(1, round(args.reference_epochs * args.curated / REFERENCE_BATCH))
    else:
        reference_step = flops.training_step_flops(model, REFERENCE_BATCH, [model.patch_size])
        most = int(CAPPED_REFERENCE_SHARE * budget // reference_step)
        reference_steps = args.reference_steps or most
        if reference_steps > most:
            raise SystemExit(f"--reference-steps {reference_steps}: the capped regime's reference trains for at most "
                             f"{CAPPED_REFERENCE_SHARE:.0%} of uniform's budget, i.e. {most} steps at batch "
                             f"{REFERENCE_BATCH}")
        if reference_steps < 1:
            raise SystemExit(
                f"--uniform-steps {args.uniform_steps}: 10 % of that budget is less than one reference step")
    pool = args.pool
    if not pool:  # sized for every method of the regime's run, so that the sweep's uniform runs share its pool
        needed = 0.0
        for name in dict.fromkeys([*methods, *args.pool_methods]):
            cfg = planned(name)
            steps = budget / flops.learner_step_flops(cfg, model.embed_dim)
            needed = max(needed, steps * draws_per_step(cfg) / (kept_fraction(cfg) * args.max_repetition))
        pool = int(math.ceil(needed / args.samples_per_shard) * args.samples_per_shard)
    return {"budget": budget, "reference_steps": reference_steps, "pool": pool}


def selection_parts(metrics_path: str) -> dict[str, dict[str, float]]:
    """The selection statistics a run logged (what it drew and selected, by sample kind; the scores), averaged
    over all its logged steps and over the first and the last fifth of them."""
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines()]
    records = [r for r in records if "noisy_fraction_selected" in r]
    keys = sorted({k for r in records for k in r if k.startswith(("selected_", "drawn_", "score_"))})
    fifth = max(1, len(records) // 5)

    def mean(part: list[dict[str, Any]]) -> dict[str, float]:
        return {k: statistics.mean(r[k] for r in part if k in r) for k in keys if any(k in r for r in part)}

    return {"all": mean(records), "first_fifth": mean(records[:fifth]), "last_fifth": mean(records[-fifth:])}


def run_experiment(args: argparse.Namespace, out: Path, methods: list[str], noise_rate: float,
                   overrides: dict[str, Any], tag: str,
                   reuse: dict[str, list[dict[str, Any]]] | None = None,
                   reference_steps: int | None = None, write: bool = True) -> dict[str, Any]:
    """Data at this noise rate -> reference -> cache -> every method x seed at one FLOP budget.
    `reuse`: runs of another experiment that are identical here (same data and budget), not rerun.
    `reference_steps`: train the reference for these steps instead of the regime's (the reference-strength
    diagnostic). `write=False`: only train, and return {"runs": {method: [run, ...]}} (no summary, no files)."""
    model = model_config(args)
    plan = regime_plan(args, methods, overrides) if args.regime in REGIME_METHODS else None
    pool_size = plan["pool"] if plan else args.pool
    reference_steps = reference_steps or (plan["reference_steps"] if plan else args.reference_steps)
    data_dir = make_splits(args, out, noise_rate, pool_size)
    reference, cache, reference_info = reference_and_cache(args, out, data_dir, reference_steps)
    reference_share = reference.flops.reference_training + cache.flops
    learner_budget = args.regime == "paper"  # the paper's count: every method gets uniform's learner FLOPs
    eval_data = [validation_split(args, out)] if args.sweep else [str(data_dir / "eval")]
    base = dict(pool=str(data_dir / "pool"), reference_cache=cache.cache_dir, reference_sha256=cache.reference_sha256,
                reference_training_flops=reference.flops.reference_training, reference_caching_flops=cache.flops,
                model=model, super_batch_size=args.super_batch, filter_ratio=BASE_FILTER, n_chunks=args.chunks,
                progress=False,
                eval_data=eval_data, eval_max_samples=args.eval_size, log_every=10, checkpoint_every=10**6,
                optim=args.optim)
    base.update(overrides)
    if plan:  # the budget: uniform at --uniform-steps (its learner FLOPs)
        budget = plan["budget"]
    else:  # the budget: the joint-learnability run at --jest-steps, reference share included
        budget = reference_share + args.jest_steps * flops.learner_step_flops(
            probe_config(args, "joint-learnability", base), model.embed_dim)
    runs: dict[str, list[dict[str, Any]]] = dict(reuse or {})
    for name in [m for m in methods if m not in runs]:
        for seed in range(args.seeds):
            fields = {**base, **method_fields(name, args.super_batch), "seed": seed,
                      "out_dir": str(out / tag / name / f"seed{seed}"), "steps": 1}
            probe = TrainLearnerConfig(**fields)
            filtered = probe.method == "offline-filter" or probe.prefilter_keep_ratio is not None
            share = reference_share + (flops.offline_filter_flops(cache.num_samples, model.embed_dim)
                                       if filtered else 0.0)
            steps = flops.steps_for_budget(budget, probe, 0.0 if learner_budget else share, model.embed_dim)
            fields.update(steps=steps, eval_every=max(1, steps // args.eval_points), overwrite=True)
            started = time.perf_counter()
            data = {**{k: fields[k] for k in ("pool", "reference_cache")},  # what a reused run must share
                    "optim": json.loads(fields["optim"].model_dump_json())}
            result = finished_run(Path(fields["out_dir"]), steps, data) or train_learner(TrainLearnerConfig(**fields))
            metric = f"{args.dataset}.top1"
            r1 = efficiency.curve(result.metrics_path, f"{args.dataset}.image_to_text_r1")
            runs.setdefault(name, []).append({
                "seed": seed, "steps": steps, "total_flops": result.total_flops,
                "seconds": time.perf_counter() - started,
                "curve": efficiency.curve(result.metrics_path, metric),
                "steps_curve": efficiency.curve(result.metrics_path, metric, "step"), "selection": result.selection,
                "final_r1": r1[-1][1] if r1 else math.nan, "repetition": repetition(probe, steps, cache.num_samples),
                "selection_parts": selection_parts(result.metrics_path),
                "reference_share_flops": share if flops.uses_reference(probe) else 0.0})
            print(f"[{tag}] {name} seed {seed}: {steps} steps, {result.total_flops / 1e9:.0f} GFLOP, "
                  f"top1 {runs[name][-1]['curve'][-1][1]:.3f}, {time.perf_counter() - started:.0f} s", file=sys.stderr)
    runs = {name: runs[name] for name in methods if name in runs}
    if not write:
        return {"runs": runs}
    summary = summarize(runs, f"{args.dataset}.top1")
    summary.update(
        budget_flops=budget, reference_share_flops=reference_share, noise_rate=noise_rate, overrides=dict(overrides),
        regime=args.regime, model=args.model, pool_size=cache.num_samples,
        reference_training_share=reference.flops.reference_training / budget,
        reference_caching_share=cache.flops / budget, reference_share_of_budget=reference_share / budget,
        cache_patch=args.cache_patch or model.patch_size, eval_size=args.eval_size,
        budget_accounting="learner" if learner_budget else "charged", **reference_info,
        pool_repetition_max=max(m.get("repetition", 0.0) for m in summary["methods"].values()))
    if "uniform" in runs and len(summary["methods"]["uniform"]["mean_curve"]) >= 2:
        gain = efficiency.gain_over_last(summary["methods"]["uniform"]["mean_curve"], 0.2)
        summary["uniform_plateau"] = {
            "rule": f"uniform's seed-mean top-1 rose by less than {args.plateau_points} over the last 20 % of its "
                    f"budget",
            "gain_over_last_20_percent": gain, "plateaued": gain < args.plateau_points}
    (out / tag).mkdir(parents=True, exist_ok=True)
    summary["plots"] = plot(runs, summary, out / tag, f"{args.dataset}, pool noise {noise_rate:.0%} ({tag})")
    (out / tag / "runs.json").write_text(json.dumps(runs, indent=1))
    return summary


def stored_runs(args: argparse.Namespace, out: Path, methods: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The runs of --reuse-runs for the methods of this invocation, checked first: the first seed of the first
    stored method is trained again here (or read back, when this --out already holds it) and its eval curve must
    equal the stored one, else the stored runs came from other data, another reference or other code and are
    refused. Only methods stored with this invocation's --seeds seeds are reused; the rest are trained."""
    path = Path(args.reuse_runs)
    stored = {name: runs for name, runs in json.loads(path.read_text()).items()
              if name in methods and len(runs) == args.seeds}
    if not stored:
        raise SystemExit(f"--reuse-runs {path}: no method of {methods} stored with {args.seeds} seeds")
    name = next(iter(stored))
    seeds, args.seeds = args.seeds, 1
    try:
        check = run_experiment(args, out, [name], args.noise, {}, "main", write=False)
    finally:
        args.seeds = seeds
    again, kept = check["runs"][name][0], stored[name][0]
    same = again["steps"] == kept["steps"] and len(again["curve"]) == len(kept["curve"]) and all(
        math.isclose(a, b, rel_tol=1e-9) and math.isclose(x, y, abs_tol=1e-9)
        for (a, x), (b, y) in zip(again["curve"], kept["curve"]))
    if not same:
        raise SystemExit(f"--reuse-runs {path}: {name} seed 0 trained again gives {again['curve'][-1]} at "
                         f"{again['steps']} steps, the stored run {kept['curve'][-1]} at {kept['steps']}: the stored "
                         "runs are from other data, reference or code, so none is reused")
    print(f"[main] reusing {sorted(stored)} from {path}: {name} seed 0 reproduced its stored curve", file=sys.stderr)
    return stored


def batch_diagnostic(args: argparse.Namespace, out: Path, pool_size: int) -> dict[str, Any]:
    """Uniform and joint learnability at sub-batch 128 (the main experiment's) and --diagnostic-sub-batch on the
    main experiment's pool and reference, at --diagnostic-fraction of its budget, each sub-batch's uniform steps
    scaled so that every run sees the same number of examples (its FLOP budget stays about the same). The
    question: at a fixed number of examples seen, does JEST's per-iteration gain grow with the sub-batch?
    Methods: those of this invocation among uniform and joint learnability (both when it names neither)."""
    sub = round(args.super_batch * (1 - BASE_FILTER))
    methods = [m for m in ("uniform",
                           "joint-learnability") if m in args.methods_list] or ["uniform", "joint-learnability"]
    saved = (args.super_batch, args.budget_super_batch, args.uniform_steps, args.pool)
    steps = max(1, round(args.uniform_steps * args.diagnostic_fraction))
    report = {}
    try:
        for sub_batch in dict.fromkeys([sub, args.diagnostic_sub_batch]):
            args.super_batch = args.budget_super_batch = round(sub_batch / (1 - BASE_FILTER))
            args.uniform_steps, args.pool = max(1, round(steps * sub / sub_batch)), pool_size
            report[f"sub_batch_{sub_batch}"] = run_experiment(
                args, out, methods, args.noise, {}, f"sub-batch{sub_batch}-x{args.diagnostic_fraction:g}")
            args.super_batch, args.budget_super_batch, args.uniform_steps, args.pool = saved
    finally:
        args.super_batch, args.budget_super_batch, args.uniform_steps, args.pool = saved
    return report


SWEEP_KNOBS = ("lr", "warmup_steps", "weight_decay", "batch")


def sweep(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Uniform alone on the regime's budget, one knob at a time (in SWEEP_KNOBS order), each knob's best value by
    top-1 on the held-out validation split kept for the next. Returns the table and the chosen values."""
    grid = {"lr": args.sweep_lr, "warmup_steps": args.sweep_warmup, "weight_decay": args.sweep_weight_decay,
            "batch": args.sweep_batch}
    best = {"lr": args.optim.lr, "warmup_steps": args.optim.warmup_steps, "weight_decay": args.optim.weight_decay,
            "batch": round(args.super_batch * (1 - BASE_FILTER))}
    rows: list[dict[str, Any]] = []
    default_super = args.super_batch
    for knob in SWEEP_KNOBS:
        scored = []
        for value in grid[knob]:
            setting = {**best, knob: value}
            args.optim = OptimConfig(lr=setting["lr"], warmup_steps=setting["warmup_steps"],
                                     weight_decay=setting["weight_decay"])
            args.super_batch = round(setting["batch"] / (1 - BASE_FILTER))
            tag = "sweep/" + "-".join(f"{k}{setting[k]:g}" for k in SWEEP_KNOBS)
            experiment = run_experiment(args, out, ["uniform"], args.noise, {}, tag)
            uniform = experiment["methods"]["uniform"]
            rows.append({"knob": knob, **setting, "steps": uniform["steps"], "validation_top1": uniform["final_metric"],
                         "validation_top1_std": uniform["final_metric_std"]})
            scored.append((uniform["final_metric"], value))
            print(f"[sweep] {knob}={value:g}: validation top-1 {uniform['final_metric']:.3f}", file=sys.stderr)
            args.super_batch = default_super
        best[knob] = max(scored, key=lambda item: item[0])[1]
    return {"rows": rows, "best": best, "metric": f"{args.dataset}.top1 on the validation split (seed "
            f"{args.validation_seed}), never the eval split",
            "budget": "uniform's at --uniform-steps at the default batch"}


def sweep_table(result: dict[str, Any]) -> str:
    lines = ["| knob | lr | warmup | weight decay | batch | steps | validation top-1 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['knob']} | {r['lr']:g} | {r['warmup_steps']} | {r['weight_decay']:g} | {r['batch']} | "
                     f"{r['steps']} | {r['validation_top1']:.3f} ± {r['validation_top1_std']:.3f} |")
    best = result["best"]
    lines.append(f"\nchosen: lr {best['lr']:g}, warmup {best['warmup_steps']}, weight decay {best['weight_decay']:g}, "
                 f"batch {best['batch']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the regime's defaults, --quick and --hparams applied."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 methods, 2 seeds, small pool: ~8 min on 2 cores")
    parser.add_argument("--regime", default="default", choices=["default", "paper", "capped"],
                        help="paper: the paper's count (uniform's learner FLOPs for every learner, the reference "
                        "trained to saturation and cached, not charged), an unrepeated pool; capped: uniform's "
                        "budget, the reference at most 10 %% of it and charged")
    parser.add_argument("--dataset", default="shapes", choices=["shapes", "emoji"])
    parser.add_argument("--model", default="tiny", choices=["tiny", "small"],
                        help="the learner's and reference's preset")
    parser.add_argument("--methods", default=None, help=f"comma-separated from {sorted(METHODS)} (default: all but the "
                        "filter-ratio variants; paper and capped regimes: their own lists)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--noise", type=float, default=0.6, help="pool noise rate")
    parser.add_argument("--jest-steps", type=int, default=300,
                        help="default regime's budget: joint learnability's steps")
    parser.add_argument("--uniform-steps", type=int, default=6000, help="paper regime's budget: uniform's steps")
    parser.add_argument("--super-batch", type=int, default=640, help="super-batch at filter 80 %% (sub-batch: a fifth)")
    parser.add_argument("--chunks", type=int, default=16, help="n_chunks of joint selection (at most the sub-batch)")
    parser.add_argument("--reference-steps", type=int, default=None,
                        help="default 300; paper regime: --reference-epochs; capped: the most within 10 %% of the "
                             "budget")
    parser.add_argument("--reference-epochs", type=float, default=10.0,
                        help="paper regime: epochs of the curated split the reference trains (the paper's ~10)")
    parser.add_argument("--reference-lr", type=float, default=None, help="the reference's lr (default: the learners')")
    parser.add_argument("--lr", type=float, default=None, help="the learners' lr (default: OptimConfig's, swept)")
    parser.add_argument("--experiments", default="main", help="comma-separated from prepare (data, reference and "
                        "cache only), main, reference (the reference-strength diagnostic: --diagnostic-epochs), batch "
                        "(the batch-size diagnostic: --diagnostic-sub-batch)")
    parser.add_argument("--diagnostic-epochs", type=float, nargs="+", default=[1.0, 3.0],
                        help="reference diagnostic: joint learnability with a reference trained for these epochs")
    parser.add_argument("--diagnostic-sub-batch", type=int, default=512,
                        help="batch diagnostic: uniform and joint learnability at this sub-batch, same examples seen")
    parser.add_argument("--diagnostic-seeds", type=int, default=None, help="seeds of the diagnostics (default --seeds)")
    parser.add_argument("--diagnostic-fraction", type=float, default=1.0,
                        help="batch diagnostic: the share of the main experiment's budget (examples seen) it runs at")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of this process (0: torch's default)")
    parser.add_argument("--cache-patch", type=int, default=None,
                        help="patch size of the reference's caching pass (default: its base; paper regime: 16)")
    parser.add_argument("--curated", type=int, default=None, help="curated samples (default 2000; paper regime 20000)")
    parser.add_argument("--pool", type=int, default=None, help="pool samples (default 20000; paper regime: 0 = enough "
                        "for --max-repetition)")
    parser.add_argument("--max-repetition", type=float, default=2.0,
                        help="paper regime: pool draws per sample, at most")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--eval-size", type=int, default=None, help="eval images (default 500; paper regime 5000)")
    parser.add_argument("--eval-points", type=int, default=10)
    parser.add_argument("--plateau-points", type=float, default=0.01, help="the plateau rule's top-1 gain")
    parser.add_argument("--ablations", action="store_true", help="filter ratio, chunks, scores and noise ablations")
    parser.add_argument("--sweep", action="store_true", help="uniform-only hyperparameter sweep on a validation split")
    parser.add_argument("--sweep-lr", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3, 4e-3])
    parser.add_argument("--sweep-warmup", type=int, nargs="+", default=[20, 200])
    parser.add_argument("--sweep-weight-decay", type=float, nargs="+", default=[1e-4, 1e-2, 1e-1])
    parser.add_argument("--sweep-batch", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--validation-seed", type=int, default=1)
    parser.add_argument("--hparams", default=None, help="a --sweep's sweep.json: every method uses its chosen values")
    parser.add_argument("--reuse-runs", default=None,
                        help="a runs.json of an earlier invocation on the same data, reference and code (e.g. "
                             "docs/results/paper-count.runs.json): its methods are taken as finished in the main "
                             "experiment, once the first seed of its first method, trained again, reproduces its "
                             "stored curve")
    parser.add_argument("--out", default="runs/bench/learning_efficiency")
    args = parser.parse_args(argv)
    paper = args.regime in REGIME_METHODS  # the paper and the capped regimes share their data rules
    args.reference_steps = args.reference_steps if args.reference_steps is not None else (None if paper else 300)
    args.curated = args.curated if args.curated is not None else (20000 if paper else 2000)
    args.pool = args.pool if args.pool is not None else (0 if paper else 20000)
    args.cache_patch = args.cache_patch if args.cache_patch is not None else (16 if paper else None)
    args.eval_size = args.eval_size or (5000 if args.regime == "paper" else 500)
    if args.quick:
        args.seeds, args.jest_steps, args.super_batch = 2, 60, 320
        args.reference_steps, args.curated, args.pool, args.eval_size, args.eval_points = 150, 1000, 6000, 300, 6
    args.optim = OptimConfig()
    if args.hparams:
        chosen = json.loads(Path(args.hparams).read_text())["best"]
        args.optim = OptimConfig(lr=chosen["lr"], warmup_steps=chosen["warmup_steps"],
                                 weight_decay=chosen["weight_decay"])
        args.super_batch = round(chosen["batch"] / (1 - BASE_FILTER))
    if args.lr:
        args.optim = args.optim.model_copy(update={"lr": args.lr})
    args.reference_optim = args.optim.model_copy(update={"lr": args.reference_lr}) if args.reference_lr else args.optim
    methods = args.methods.split(",") if args.methods else (
        QUICK_METHODS if args.quick else REGIME_METHODS[args.regime] if paper else DEFAULT_METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; expected some of {sorted(METHODS)}")
    # the paper regime's pool is sized for the whole regime, whichever methods this invocation runs: two
    # invocations with different --methods (e.g. in parallel) plan the same data and share its runs
    pool_methods = list(dict.fromkeys([*REGIME_METHODS[args.regime], *methods])) if paper else methods
    args.methods_list, args.pool_methods, args.budget_super_batch = methods, pool_methods, args.super_batch
    return args


def main() -> None:
    args = parse_args()
    methods = args.methods_list
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"benchmark": "learning_efficiency", "dataset": args.dataset, "quick": args.quick,
                              "seeds": args.seeds, "eval_size": args.eval_size,
                              "args": {k: v for k, v in vars(args).items() if k not in ("optim", "reference_optim")},
                              "optim": args.optim.model_dump(), "reference_optim": args.reference_optim.model_dump()}
    if args.sweep:
        report["sweep"] = sweep(args, out)
        (out / "sweep.json").write_text(json.dumps(report["sweep"], indent=1))
        (out / "sweep.md").write_text(sweep_table(report["sweep"]) + "\n")
        report["seconds"] = time.perf_counter() - started
        (out / "summary.json").write_text(json.dumps(report, indent=1))
        print(json.dumps(report, indent=1))
        return
    experiments = args.experiments.split(",")
    if "prepare" in experiments:  # data, reference and cache, before parallel invocations share them
        plan = (regime_plan(args, methods, {}) if args.regime in REGIME_METHODS
                else {"pool": args.pool, "reference_steps": args.reference_steps})
        data_dir = make_splits(args, out, args.noise, plan["pool"])
        report["prepare"] = reference_and_cache(args, out, data_dir, plan["reference_steps"])[2]
        if args.regime == "paper":
            for epochs in args.diagnostic_epochs if "reference" in experiments else []:
                reference_and_cache(args, out, data_dir, round(epochs * args.curated / REFERENCE_BATCH))
    if "main" in experiments:
        reuse = stored_runs(args, out, methods) if args.reuse_runs else None
        report["main"] = run_experiment(args, out, methods, args.noise, {}, "main", reuse=reuse)
    main_seeds, args.seeds = args.seeds, args.diagnostic_seeds or args.seeds
    if "reference" in experiments:  # JEST's gain as the reference trains longer (the main experiment: the longest)
        main_runs = out / "main" / "runs.json"
        uniform = json.loads(main_runs.read_text()).get("uniform") if main_runs.exists() else None  # reused
        uniform = uniform if uniform and len(uniform) == main_seeds else None
        report["reference_diagnostic"] = {
            f"epochs_{epochs:g}": run_experiment(
                args, out, ["uniform", "joint-learnability"] if uniform else ["joint-learnability"], args.noise, {},
                f"reference-epochs{epochs:g}", reuse={"uniform": uniform} if uniform else None,
                reference_steps=round(epochs * args.curated / REFERENCE_BATCH))
            for epochs in args.diagnostic_epochs}
    if "batch" in experiments:  # the same examples seen at a larger sub-batch: does the per-iteration gain grow?
        pool = regime_plan(args, methods, {})["pool"] if args.regime in REGIME_METHODS else args.pool
        report["batch_diagnostic"] = batch_diagnostic(args, out, pool)
    args.seeds = main_seeds
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
