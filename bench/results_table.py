"""Markdown tables from a learning_efficiency summary.json (for docs/results.md).

    python bench/results_table.py runs/bench/learning_efficiency/summary.json
"""

import json
import sys


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
              f"{experiment['reference_caching_share']:.1%} of the budget (cache at patch {experiment['cache_patch']}); "
              f"pool {experiment['pool_size']:,}, drawn at most {experiment['pool_repetition_max']:.2f}× per sample")
    lines = [shares]
    plateau = experiment.get("uniform_plateau")
    if plateau:
        lines.append(f"uniform's plateau rule ({plateau['rule']}): gain {plateau['gain_over_last_20_percent']:+.3f}, "
                     f"{'plateaued' if plateau['plateaued'] else 'NOT plateaued'}")
    lines += ["", "| method | steps | repetition | steps to target | iterations ratio vs uniform | FLOPs ratio vs uniform "
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
                     + " | ".join([ratio(joint, "flops_ratio_vs_uniform"), ratio(joint, "flops_ratio_vs_uniform_learner_only"),
                                   ratio(flexi, "flops_ratio_vs_uniform"), ratio(flexi, "flops_ratio_vs_uniform_learner_only")])
                     + " |")
    return "\n".join(lines)


def main() -> None:
    report = json.load(open(sys.argv[1]))
    if "sweep" in report:
        print(json.dumps(report["sweep"]["best"]))
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
