"""The paper's "fewer iterations" read from a learning_efficiency run's curves (runs.json), two markdown tables:
each method's seed-mean top-1 at its last step against uniform's at the same step, and the steps uniform needs
to reach each method's final top-1 over the method's own steps (linear between uniform's evaluations).

    python bench/iterations_table.py runs/bench/paper/main/runs.json
"""

import json
import sys

from flexi_jest.efficiency import Curve, flops_to_reach, mean_curve


def value_at(curve: Curve, x: float) -> float:
    """The curve's metric at x (linear between evaluations; its end values outside them)."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return y0 + (x - x0) / (x1 - x0) * (y1 - y0) if x1 > x0 else y0
    return curve[-1][1] if x > curve[-1][0] else curve[0][1]


def main() -> None:
    runs = json.load(open(sys.argv[1]))
    curves = {name: mean_curve([r["steps_curve"] for r in rs]) for name, rs in runs.items()}
    uniform = curves["uniform"]
    peak = max(uniform, key=lambda p: p[1])
    print("| method | steps | its final top-1 | uniform's top-1 at that step | uniform's peak top-1 (step) |")
    print("|---|---:|---:|---:|---:|")
    for name, curve in curves.items():
        last_step, final = curve[-1]
        print(f"| {name} | {last_step:.0f} | {final:.3f} | {value_at(uniform, last_step):.3f} | "
              f"{peak[1]:.3f} ({peak[0]:.0f}) |")
    print()
    print(
        "| method | steps | its final top-1 | uniform's steps to that top-1 | iterations ratio (uniform's / the "
        "method's) |")
    print("|---|---:|---:|---:|---:|")
    for name, curve in curves.items():
        last_step, final = curve[-1]
        steps = flops_to_reach(uniform, final)  # x-agnostic: here x is the step
        print(f"| {name} | {last_step:.0f} | {final:.3f} | {'never' if steps is None else f'{steps:.0f}'} | "
              f"{'-' if steps is None else f'{steps / last_step:.2f}x'} |")


if __name__ == "__main__":
    main()
