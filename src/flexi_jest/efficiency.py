"""Learning efficiency: an eval metric against total training FLOPs, and what each method pays to reach a target.

A run's curve is [(total_flops, metric)] at each evaluation its training made (metrics.jsonl records with
an "eval" entry; total_flops = scoring + training + the reference's share, docs/method.md). Per method (several
seeds = several curves) the summary holds:

    final_metric            metric at the end of the seed-mean curve (with the spread over seeds)
    flops_to_target         total FLOPs at which the seed-mean curve first reaches the target (None: never)
    flops_ratio_vs_uniform  uniform's FLOPs to reach its own final metric / this method's (> 1: cheaper)
    steps_to_target         with step curves: training steps (iterations) to first reach it, and the ratio

The benchmark (bench/learning_efficiency.py) and the pipeline's method comparison both use these
functions and `figure`, so a pipeline run's report shows the same plot as the benchmark.
"""

import json
import math
import statistics
from typing import Any

from flexi_jest import storage

Curve = list[tuple[float, float]]


def curve(metrics_path: str, metric: str, x: str = "total_flops") -> Curve:
    """[(x, metric)] at each evaluation of a run, from its metrics.jsonl (local path or s3://); x is "total_flops"
    (the default) or "step" (iterations)."""
    points = []
    for line in storage.read_bytes(metrics_path).decode().splitlines():
        record = json.loads(line)
        if metric in record.get("eval", {}):
            points.append((float(record[x]), float(record["eval"][metric])))
    return points


def flops_to_reach(points: Curve, target: float) -> float | None:
    """Total FLOPs at which the curve first reaches target (linear between evaluations); None if never."""
    previous = None
    for x, y in points:
        if y >= target:
            if previous is None or previous[1] >= target:
                return x
            x0, y0 = previous
            return x0 + (target - y0) / (y - y0) * (x - x0)
        previous = (x, y)
    return None


def gain_over_last(points: Curve, fraction: float = 0.2) -> float:
    """How much the metric rose over the last `fraction` of the curve's x range (final value minus the value at
    x_end - fraction * (x_end - x_start), linear between evaluations): the plateau rule's quantity."""
    if len(points) < 2:
        raise ValueError("a plateau needs a curve of at least two evaluations")
    start, end = points[0][0], points[-1][0]
    at = end - fraction * (end - start)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= at <= x1:
            value = y0 if x1 == x0 else y0 + (at - x0) / (x1 - x0) * (y1 - y0)
            return points[-1][1] - value
    return points[-1][1] - points[0][1]


def break_even_runs(method_cost: float, method_fixed: float, baseline_cost: float, baseline_fixed: float = 0.0
                    ) -> int | None:
    """How many learner runs on one pool and reference it takes before the method's total, charged, falls below the
    baseline's: the smallest N with N * method_cost + method_fixed < N * baseline_cost + baseline_fixed, where
    *_cost is a run's learner FLOPs (to the target) and *_fixed what is paid once whatever the number of runs (the
    reference's training and its caching pass). None: never (the method's learner FLOPs are not lower)."""
    if method_cost >= baseline_cost:
        return None
    return max(1, math.floor((method_fixed - baseline_fixed) / (baseline_cost - method_cost)) + 1)


def mean_curve(curves: list[Curve]) -> Curve:
    """Seed-mean curve. A method's seeds run the same steps and evaluate at the same FLOPs, so the
    points line up; where they do not (a different length), the common prefix is averaged."""
    length = min(len(c) for c in curves)
    return [(statistics.mean(c[i][0] for c in curves), statistics.mean(c[i][1] for c in curves)) for i in range(length)]


def summarize(curves: dict[str, list[Curve]], metric: str, reference_share: dict[str, float] | None = None,
              baseline: str = "uniform", step_curves: dict[str, list[Curve]] | None = None) -> dict[str, Any]:
    """Per method (name -> one curve per seed): final metric and its spread, FLOPs to first reach the baseline's
    final metric, and the baseline's FLOPs to reach it divided by the method's (> 1: the method is cheaper).
    reference_share: per method, the reference's FLOPs inside its total; the ratio is also given with them
    left out (a reference amortised over many learners). step_curves: the same evaluations against training
    steps (curve(..., x="step")); with them, the steps (iterations) to the target and the baseline's steps to
    it divided by the method's (the paper's "fewer iterations"). Without the baseline among the methods, the
    target and ratios are None."""
    reference_share = reference_share or {}
    step_means = {name: mean_curve(cs) for name, cs in (step_curves or {}).items() if cs and all(cs)}
    means = {name: mean_curve(cs) for name, cs in curves.items() if cs and all(cs)}
    target = means[baseline][-1][1] if baseline in means else None
    baseline_cost = flops_to_reach(means[baseline], target) if target is not None else None
    baseline_steps = (flops_to_reach(step_means[baseline], target) if target is not None and baseline in step_means
                      else None)
    methods = {}
    for name, mean in means.items():
        finals = [c[-1][1] for c in curves[name]]
        cost = flops_to_reach(mean, target) if target is not None else None
        share = reference_share.get(name, 0.0)
        methods[name] = {
            "final_metric": mean[-1][1],
            "final_metric_std": statistics.pstdev(finals),
            "final_metric_per_seed": finals,
            "total_flops": mean[-1][0],
            "flops_to_target": cost,
            "flops_to_target_per_seed": [flops_to_reach(c, target) if target is not None else None
                                         for c in curves[name]],
            "flops_ratio_vs_uniform": (baseline_cost / cost) if cost and baseline_cost else None,
            "reference_share_flops": share,
            "flops_ratio_vs_uniform_learner_only": (baseline_cost / (cost - share))
            if cost and baseline_cost and cost > share else None,
            "mean_curve": mean,
        }
        steps = None
        if name in step_means:
            steps = flops_to_reach(step_means[name], target) if target is not None else None
            methods[name].update(
                steps_to_target=steps,
                steps_to_target_per_seed=[flops_to_reach(c, target) if target is not None else None
                                          for c in step_curves[name]],
                steps_ratio_vs_uniform=(baseline_steps / steps) if steps and baseline_steps else None)
        baseline_share = reference_share.get(baseline, 0.0)
        methods[name]["accountings"] = accountings(cost, share, baseline_cost, baseline_share, steps, baseline_steps)
        learner_cost = cost - share if cost is not None and cost > share else None
        methods[name]["break_even_runs"] = (
            break_even_runs(learner_cost, share, baseline_cost - baseline_share, baseline_share)
            if learner_cost is not None and baseline_cost is not None else None)
    return {"metric": metric, "baseline": baseline, "target": target, "uniform_flops_to_target": baseline_cost,
            "methods": methods}


def accountings(cost: float | None, share: float, baseline_cost: float | None, baseline_share: float,
                steps: float | None = None, baseline_steps: float | None = None) -> list[dict[str, Any]]:
    """A method's cost to the target under both accountings (docs/method.md), one dict each with its name:
    "learner" (the paper's count: its scoring and training only, the reference's cached embeddings free) and
    "charged" (the reference's training, its caching pass and the offline filter's cosines added once). cost and
    baseline_cost are charged totals to the target (None: never reached); share, baseline_share the reference's
    FLOPs inside them. The iterations ratio is the same in both (a step is a step)."""
    out = []
    for accounting, own, base in (("learner", share, baseline_share), ("charged", 0.0, 0.0)):
        mine = cost - own if cost is not None and cost > own else None
        theirs = baseline_cost - base if baseline_cost is not None and baseline_cost > base else None
        out.append({"accounting": accounting, "flops_to_target": mine,
                    "flops_ratio": theirs / mine if mine and theirs else None,
                    "steps_ratio": baseline_steps / steps if steps and baseline_steps else None})
    return out


def figure(curves: dict[str, list[Curve]], summary: dict[str, Any], title: str):
    """Metric against total FLOPs: one line per method (its seed mean), a band over its seeds (min to max),
    and the baseline's final metric as a dotted line. Returns a matplotlib Figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axis = plt.subplots(figsize=(7, 4.5))
    for name, info in summary["methods"].items():
        mean = info["mean_curve"]
        xs = [p[0] for p in mean]
        axis.plot(xs, [p[1] for p in mean], marker=".", label=name)
        if len(curves[name]) > 1:
            values = np.array([[c[i][1] for i in range(len(mean))] for c in curves[name]])
            axis.fill_between(xs, values.min(axis=0), values.max(axis=0), alpha=0.2)
    if summary["target"] is not None:
        axis.axhline(summary["target"], color="grey", linestyle=":", label=f"{summary['baseline']} final")
    axis.set_xlabel("total training FLOPs (scoring + training + reference share)")
    axis.set_ylabel(summary["metric"])
    axis.set_title(title)
    axis.legend(fontsize=8)
    fig.tight_layout()
    return fig


def ratio_figure(summary: dict[str, Any]):
    """Bar chart of each method's FLOPs-to-target ratio vs the baseline (0: never reached)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 3.5))
    names = list(summary["methods"])
    ratios = [summary["methods"][n]["flops_ratio_vs_uniform"] or 0.0 for n in names]
    axis.bar(range(len(names)), ratios)
    axis.axhline(1.0, color="grey", linestyle=":")
    axis.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    axis.set_ylabel(f"FLOPs-to-target ratio vs {summary['baseline']}\n(> 1: cheaper; 0: never reached)")
    fig.tight_layout()
    return fig

