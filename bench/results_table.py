"""Markdown tables from a learning_efficiency summary.json (for docs/results.md).

    python bench/results_table.py runs/bench/learning_efficiency/summary.json
"""

import json
import math
import statistics
import sys
from pathlib import Path


def fmt_flops(value: float | None) -> str:
    return "never" if value is None else f"{value / 1e9:,.0f}"


def table(experiment: dict) -> str:
    lines = [
        f"target (uniform's final {experiment['metric']}): {experiment['target']:.3f}; budget "
        f"{experiment['budget_flops'] / 1e9:,.0f} GFLOP, of which the reference's share "
        f"{experiment['reference_share_flops'] / 1e9:,.0f} GFLOP (charged to the methods that use it); pool noise "
        f"{experiment['noise_rate']:.0%}",
        "",
        "| method | steps | final top-1 (mean ± sd over seeds) | per seed | final R@1 (image→text) | GFLOP to target "
        "| FLOPs ratio vs uniform | same, reference share left out | noisy share trained on |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in experiment["methods"].items():
        ratio = "never reaches it" if m["flops_ratio_vs_uniform"] is None else f"{m['flops_ratio_vs_uniform']:.2f}×"
        learner_only = m.get("flops_ratio_vs_uniform_learner_only")
        learner_only = "–" if learner_only is None else f"{learner_only:.2f}×"
        r1 = m.get("final_retrieval_r1")
        r1 = "–" if r1 is None or r1 != r1 else f"{r1:.3f}"
        seeds = ", ".join(f"{v:.3f}" for v in m["final_metric_per_seed"])
        noisy = m["noisy_fraction_selected"]
        lines.append(f"| {name} | {m['steps']} | {m['final_metric']:.3f} ± {m['final_metric_std']:.3f} | {seeds} | "
                     f"{r1} | {fmt_flops(m['flops_to_target'])} | {ratio} | {learner_only} | {noisy:.2f} |")
    return "\n".join(lines)


def times(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}×"


def evidence_table(experiment: dict) -> str:
    """The regime's questions per method: steps (iterations) and total FLOPs to uniform's final top-1, the
    ratios charged and amortised, the same against the offline filter, and the pool's repetition."""
    shares = (f"reference training {experiment['reference_training_share']:.1%} and caching pass "
              f"{experiment['reference_caching_share']:.1%} of the budget (cache at patch "
              f"{experiment['cache_patch']}); "
              f"pool {experiment['pool_size']:,}, drawn at most {experiment['pool_repetition_max']:.2f}× per sample")
    lines = [shares]
    plateau = experiment.get("uniform_plateau")
    if plateau:
        lines.append(f"uniform's plateau rule ({plateau['rule']}): gain {plateau['gain_over_last_20_percent']:+.3f}, "
                     f"{'plateaued' if plateau['plateaued'] else 'NOT plateaued'}")
    lines += ["",
              "| method | steps | repetition | steps to target | iterations ratio vs uniform | FLOPs ratio vs uniform "
              "(charged) | amortised | vs offline-filter: iterations | FLOPs (charged) | amortised |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in experiment["methods"].items():
        offline = m.get("vs_offline_filter", {})
        steps_to = m.get("steps_to_target")
        lines.append(
            f"| {name} | {m['steps']} | {m.get('repetition', float('nan')):.2f} | "
            f"{'never' if steps_to is None else f'{steps_to:,.0f}'} | {times(m.get('steps_ratio_vs_uniform'))} | "
            f"{times(m['flops_ratio_vs_uniform'])} | {times(m.get('flops_ratio_vs_uniform_learner_only'))} | "
            f"{times(offline.get('steps_ratio'))} | {times(offline.get('flops_ratio'))} | "
            f"{times(offline.get('flops_ratio_learner_only'))} |")
    return "\n".join(lines)


def ratio(m: dict | None, key: str) -> str:
    if m is None:
        return "–"
    return "never" if m.get(key) is None else f"{m[key]:.2f}×"


def final(m: dict | None) -> str:
    return "–" if m is None else f"{m['final_metric']:.3f} ± {m['final_metric_std']:.3f}"


def ablation_table(report: dict) -> str:
    """One row per experiment (the main one first): final top-1 per method and the FLOPs ratios vs uniform."""
    methods = ["uniform", "independent-learnability", "joint-learnability", "flexi-jest"]
    lines = ["| experiment | " + " | ".join(f"{m} top-1" for m in methods)
             + " | joint ratio | joint ratio, ref. share left out | flexi ratio | flexi ratio, ref. share left out |",
             "|---|" + "---:|" * (len(methods) + 4)]
    experiments = {"main (filter 0.8, 16 chunks, noise 0.6)": report["main"], **report.get("ablations", {})}
    for name, experiment in experiments.items():
        got = experiment["methods"]
        joint, flexi = got.get("joint-learnability"), got.get("flexi-jest")
        lines.append(f"| {name} | " + " | ".join(final(got.get(m)) for m in methods) + " | "
                     + " | ".join([ratio(joint, "flops_ratio_vs_uniform"),
                                   ratio(joint, "flops_ratio_vs_uniform_learner_only"),
                                   ratio(flexi, "flops_ratio_vs_uniform"),
                                   ratio(flexi, "flops_ratio_vs_uniform_learner_only")])
                     + " |")
    return "\n".join(lines)


# ---- the paper regime (--regime paper): the learner count, everything charged, why -------------------------------


def spread(values: list[float | None]) -> str:
    """mean ± sd (sample) of the values that are not None, and how many of them there are, or 'never'."""
    got = [v for v in values if v is not None]
    if not got:
        return "never"
    sd = statistics.stdev(got) if len(got) > 1 else 0.0
    return f"{statistics.mean(got):,.0f} ± {sd:,.0f}" + (
        "" if len(got) == len(values) else f" ({len(got)}/{len(values)})")


def difference(a: dict, b: dict) -> tuple[float, float]:
    """(mean of a's final metric - b's, the standard error of that difference over seeds)."""
    def se2(m: dict) -> float:
        seeds = m["final_metric_per_seed"]
        return statistics.variance(seeds) / len(seeds) if len(seeds) > 1 else 0.0
    return (statistics.mean(a["final_metric_per_seed"]) - statistics.mean(b["final_metric_per_seed"]),
            math.sqrt(se2(a) + se2(b)))


def reference_lines(experiment: dict) -> list[str]:
    saturation = experiment.get("reference_saturation", {})
    return [
        f"- reference: {experiment['reference_epochs']:g} epochs of the curated split ({experiment['reference_steps']} "
        f"steps at batch 128), top-1 {experiment['reference_top1']:.3f} on the eval split",
        f"- reference training: {experiment['reference_training_flops'] / 1e9:,.0f} GFLOP "
        f"({experiment['reference_training_share']:.0%} of uniform's learner budget)",
        f"- reference caching pass over the pool: {experiment['reference_caching_flops'] / 1e9:,.0f} GFLOP "
        f"({experiment['reference_caching_share']:.0%}; at patch {experiment['cache_patch']})",
        f"- saturation ({saturation.get('rule', '?')}): validation gain "
        f"{saturation.get('gain_over_last_20_percent', 0):+.3f}, "
        f"{'saturated' if saturation.get('saturated') else 'NOT saturated'}; validation top-1 by epoch: "
        + ", ".join(f"{top1:.3f}" for _, top1 in experiment.get("reference_validation_curve", [])),
        f"- pool {experiment['pool_size']:,}, drawn at most {experiment['pool_repetition_max']:.2f}× per sample; eval "
        f"split {experiment['eval_size']:,} images (binomial s.e. at top-1 {experiment['target']:.2f}: "
        f"±{math.sqrt(experiment['target'] * (1 - experiment['target']) / experiment['eval_size']):.4f})",
    ]


def accounting(m: dict, name: str) -> dict:
    return next(a for a in m["accountings"] if a["accounting"] == name)


def paper_tables(experiment: dict) -> str:
    """The headline (the paper's count), everything charged with the break-even, the significance of each
    difference, and what each method trained on."""
    methods = experiment["methods"]
    uniform, offline = methods.get("uniform"), methods.get("offline-filter")
    lines = reference_lines(experiment)
    plateau = experiment.get("uniform_plateau")
    if plateau:
        lines.append(f"- uniform's plateau rule ({plateau['rule']}): gain {plateau['gain_over_last_20_percent']:+.3f}, "
                     f"{'plateaued' if plateau['plateaued'] else 'NOT plateaued'}")
    lines += ["", f"**Learner FLOPs (reference cached: the paper's count).** Target: uniform's final top-1, "
              f"{experiment['target']:.3f}; budget {experiment['budget_flops'] / 1e9:,.0f} GFLOP of learner FLOPs "
              "each.",
              "",
              "| method | steps | final top-1 (mean ± sd) | steps to target (mean ± sd over seeds) | iterations ratio "
              "| learner GFLOP to target | learner FLOPs ratio | vs offline filter: iterations | learner FLOPs |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in methods.items():
        learner = accounting(m, "learner")
        vs = m.get("vs_offline_filter", {})
        vs_learner = accounting(vs, "learner") if vs.get("accountings") else {}
        lines.append(f"| {name} | {m['steps']} | {m['final_metric']:.3f} ± {m['final_metric_std']:.3f} | "
                     f"{spread(m.get('steps_to_target_per_seed', []))} | {times(learner['steps_ratio'])} | "
                     f"{fmt_flops(learner['flops_to_target'])} | {times(learner['flops_ratio'])} | "
                     f"{times(vs_learner.get('steps_ratio'))} | {times(vs_learner.get('flops_ratio'))} |")
    lines += ["", "**All FLOPs (reference training and caching charged).** Break-even: learner runs on this pool and "
              "reference before the method's all-FLOPs total falls below the baseline's.", "",
              "| method | all GFLOP to target | all FLOPs ratio | break-even vs uniform | vs offline filter: all FLOPs "
              "ratio | break-even vs offline filter |", "|---|---:|---:|---:|---:|---:|"]
    for name, m in methods.items():
        charged = accounting(m, "charged")
        vs = m.get("vs_offline_filter", {})
        vs_charged = accounting(vs, "charged") if vs.get("accountings") else {}
        def even(runs: int | None, reached: bool, baseline: str) -> str:
            if name == baseline:
                return "–"
            return "never" if runs is None or not reached else f"{runs} run{'s' if runs > 1 else ''}"
        filter_reached = vs_charged.get("flops_to_target") is not None
        lines.append(f"| {name} | {fmt_flops(charged['flops_to_target'])} | {times(charged['flops_ratio'])} | "
                     f"{even(m.get('break_even_runs'), charged['flops_to_target'] is not None, 'uniform')} | "
                     f"{times(vs_charged.get('flops_ratio'))} | "
                     f"{even(vs.get('break_even_runs'), filter_reached, 'offline-filter')} |")
    lines += ["", "**Differences in final top-1** (mean over seeds; s.e. of the difference over seeds; "
              "significant: |difference| > 2 s.e.)", "", "| method | − uniform | significant | − offline filter | "
              "significant |", "|---|---:|---|---:|---|"]
    for name, m in methods.items():
        cells = []
        for base in (uniform, offline):
            if base is None or base is m:
                cells += ["–", "–"]
                continue
            diff, se = difference(m, base)
            cells += [f"{diff:+.3f} ± {se:.3f}", "yes" if abs(diff) > 2 * se else "no"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "joint-learnability" in methods and "independent-learnability" in methods:  # the paper's ablation
        diff, se = difference(methods["joint-learnability"], methods["independent-learnability"])
        lines += ["", f"Joint − independent learnability: {diff:+.3f} ± {se:.3f} "
                      f"({'significant' if abs(diff) > 2 * se else 'not significant'})."]
    kinds = ["clean", "hard_negative", "mismatched", "uninformative", "corrupted", "blank", "near_duplicate"]
    lines += ["", "**What each method trained on** (share of the selected sub-batches, mean over seeds and steps; "
              "noisy share in the first → last fifth of training; mean own score of the selected examples against "
              "the super-batch's)", "",
              "| method | " + " | ".join(kinds) + " | noisy, first → last fifth | score selected / super-batch |",
              "|---|" + "---:|" * (len(kinds) + 2)]
    for name, m in methods.items():
        parts = m.get("trained_on", {})
        every = parts.get("all", {})
        noisy = lambda part: 1 - parts.get(part, {}).get("selected_clean", math.nan) - parts.get(  # noqa: E731
            part, {}).get("selected_hard_negative", math.nan)
        score = (
            f"{every.get('score_selected_mean', math.nan):+.3f} / {every.get('score_superbatch_mean', math.nan):+.3f}"
                 if every.get("score_selected_mean") == every.get("score_selected_mean") else "–")
        lines.append(f"| {name} | " + " | ".join(f"{every.get(f'selected_{k}', math.nan):.3f}" for k in kinds)
                     + f" | {noisy('first_fifth'):.3f} → {noisy('last_fifth'):.3f} | {score} |")
    return "\n".join(lines)


def diagnostic_tables(report: dict) -> str:
    """The reference-strength diagnostic (joint learnability with references trained for fewer epochs) and the
    batch-size diagnostic (the same examples seen at a larger sub-batch)."""
    lines = []
    main = report["main"]
    if report.get("reference_diagnostic"):
        rows = [(main["reference_epochs"], main)] + sorted(
            ((e["reference_epochs"], e) for e in report["reference_diagnostic"].values()), key=lambda r: r[0])
        lines += ["**Reference strength** (joint learnability, filter 80 %, on references trained for fewer epochs; "
                  "uniform's runs are the main experiment's)", "",
                  "| reference epochs | reference top-1 | joint top-1 (mean ± sd) | − uniform (± s.e.) | significant | "
                  "uniform's steps to joint's final top-1 / joint's (iterations gain) | joint's noisy share, first → "
                  "last fifth |", "|---:|---:|---:|---:|---|---:|---:|"]
        for epochs, experiment in sorted(rows, key=lambda r: r[0]):
            joint = experiment["methods"]["joint-learnability"]
            diff, se = difference(joint, main["methods"]["uniform"])
            runs_path = report.get("runs_paths", {}).get(f"reference_{epochs:.1f}")
            gain = iterations_gain(runs_path) if runs_path else "–"
            parts = joint.get("trained_on", {})
            noisy = lambda part: 1 - parts.get(part, {}).get("selected_clean", math.nan) - parts.get(  # noqa: E731
                part, {}).get("selected_hard_negative", math.nan)
            lines.append(f"| {epochs:.1f} | {experiment['reference_top1']:.3f} | {joint['final_metric']:.3f} ± "
                         f"{joint['final_metric_std']:.3f} | {diff:+.3f} ± {se:.3f} | "
                         f"{'yes' if abs(diff) > 2 * se else 'no'} | {gain} | "
                         f"{noisy('first_fifth'):.3f} → {noisy('last_fifth'):.3f} |")
    if report.get("batch_diagnostic"):
        fraction = report.get("batch_diagnostic_fraction", report["args"].get("diagnostic_fraction", 1.0))
        lines += ["", f"**Sub-batch size** (the same examples seen, {fraction:g} of the main experiment's: uniform's "
                  "steps scaled by the sub-batch; learner FLOPs about equal)", "",
                  "| sub-batch | uniform steps | uniform top-1 | joint steps | joint top-1 | uniform's steps to "
                  "joint's "
                  "final top-1 / joint's (iterations gain) | learner FLOPs ratio |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for label, experiment in report["batch_diagnostic"].items():
            uniform, joint = experiment["methods"]["uniform"], experiment["methods"]["joint-learnability"]
            runs_path = report.get("runs_paths", {}).get(label)
            gain = iterations_gain(runs_path) if runs_path else "–"
            lines.append(f"| {label.rsplit('_', 1)[-1]} | {uniform['steps']} | {uniform['final_metric']:.3f} ± "
                         f"{uniform['final_metric_std']:.3f} | {joint['steps']} | {joint['final_metric']:.3f} ± "
                         f"{joint['final_metric_std']:.3f} | {gain} | "
                         f"{times(accounting(joint, 'learner')['flops_ratio'])} |")
    return "\n".join(lines)


def iterations_gain(runs_path: str) -> str:
    """uniform's steps (seed-mean step curve, linear between evaluations) to reach joint's final top-1, over
    joint's steps: the per-iteration gain whether or not joint reaches uniform's final value."""
    from flexi_jest.efficiency import flops_to_reach, mean_curve
    if not Path(runs_path).exists():  # a summary kept without its runs (docs/results: the runs are not stored)
        return "–"
    runs = json.load(open(runs_path))
    uniform = mean_curve([r["steps_curve"] for r in runs["uniform"]])
    joint = mean_curve([r["steps_curve"] for r in runs["joint-learnability"]])
    steps = flops_to_reach(uniform, joint[-1][1])
    return "never" if steps is None else f"{steps:.0f} / {joint[-1][0]:.0f} = {steps / joint[-1][0]:.2f}×"

def main() -> None:
    report = json.load(open(sys.argv[1]))
    if "sweep" in report:
        print(json.dumps(report["sweep"]["best"]))
        return
    if report["main"].get("regime") == "paper":
        out = Path(report["args"]["out"])
        fraction = report.get("batch_diagnostic_fraction", report["args"].get("diagnostic_fraction", 1.0))
        report["runs_paths"] = {key: str(out / f"sub-batch{key.rsplit('_', 1)[-1]}-x{fraction:g}" / "runs.json")
                                for key in report.get("batch_diagnostic", {})}
        if report.get("reference_diagnostic"):  # each reference's runs.json holds uniform (reused) beside joint
            report["runs_paths"].update({f"reference_{e['reference_epochs']:.1f}": str(
                out / f"reference-epochs{key.split('_', 1)[1]}" / "runs.json")
                for key, e in report["reference_diagnostic"].items()})
            main_key = f"reference_{report['main']['reference_epochs']:.1f}"
            report["runs_paths"][main_key] = str(out / "main" / "runs.json")
        print(paper_tables(report["main"]))
        print()
        print(diagnostic_tables(report))
        return
    print(table(report["main"]))
    if "pool_repetition_max" in report["main"]:
        print()
        print(evidence_table(report["main"]))
    if report.get("ablations"):
        print("\n### Ablations at a glance\n")
        print(ablation_table(report))
    for name, experiment in report.get("ablations", {}).items():
        print(f"\n### {name}\n")
        print(table(experiment))


if __name__ == "__main__":
    main()
