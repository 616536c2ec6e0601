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


def main() -> None:
    report = json.load(open(sys.argv[1]))
    print(table(report["main"]))
    for name, experiment in report.get("ablations", {}).items():
        print(f"\n### {name}\n")
        print(table(experiment))


if __name__ == "__main__":
    main()
