"""The paper's "fewer iterations" read from a learning_efficiency run's curves (runs.json), two markdown tables:
each method's seed-mean top-1 at its last step against uniform's at the same step, and the steps uniform needs
to reach each method's final top-1 over the method's own steps (linear between uniform's evaluations).

    python bench/iterations_table.py runs/bench/paper/main/runs.json
"""

import json
import sys

runs = json.load(open(sys.argv[1]))
def mean_curve(curves):
    n = min(len(c) for c in curves)
    return [(curves[0][i][0], sum(c[i][1] for c in curves) / len(curves)) for i in range(n)]
def at(curve, x):
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return y0 + (x - x0) / (x1 - x0) * (y1 - y0) if x1 > x0 else y0
    return curve[-1][1] if x > curve[-1][0] else curve[0][1]
uniform = mean_curve([r["steps_curve"] for r in runs["uniform"]])
print("| method | steps | its final top-1 | uniform's top-1 at that step | uniform's peak top-1 (step) |")
print("|---|---:|---:|---:|---:|")
peak = max(uniform, key=lambda p: p[1])
for name, rs in runs.items():
    curve = mean_curve([r["steps_curve"] for r in rs])
    last_step, final = curve[-1]
    print(f"| {name} | {last_step:.0f} | {final:.3f} | {at(uniform, last_step):.3f} | {peak[1]:.3f} ({peak[0]:.0f}) |")

def steps_to(curve, target):
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if y0 < target <= y1:
            return x0 + (target - y0) / (y1 - y0) * (x1 - x0)
    return curve[0][0] if curve[0][1] >= target else None
print()
print("| method | steps | its final top-1 | uniform's steps to that top-1 | iterations ratio (uniform's / the method's) |")
print("|---|---:|---:|---:|---:|")
for name, rs in runs.items():
    curve = mean_curve([r["steps_curve"] for r in rs])
    last_step, final = curve[-1]
    u = steps_to(uniform, final)
    print(f"| {name} | {last_step:.0f} | {final:.3f} | {'never' if u is None else f'{u:.0f}'} | "
          f"{'-' if u is None else f'{u / last_step:.2f}x'} |")
