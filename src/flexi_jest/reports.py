"""The stages' reports: a model's training curve and evaluation, and the methods compared, as figures and HTML.

plot_training draws a learner's loss against total FLOPs (matplotlib, headless); write_html_report and
write_comparison_report write single self-contained HTML files (the figure inline), the KFP components' HTML
outputs. Pure of MLflow: the stages log the figures through tracking.
"""

import json
from html import escape
from pathlib import Path
from typing import Any

from flexi_jest import storage
from flexi_jest.config import EvaluateResult


def headline_metric(result: EvaluateResult) -> tuple[str, float]:
    """The first eval set's top-1 (its image->text R@1 without labels): the metric the method comparison
    draws (the learners' evaluations during training are on that set)."""
    from flexi_jest.evaluate import champion
    return champion(result)


def plot_training(method: str, result: EvaluateResult, training: dict[str, Any] | None):
    """Training loss against total FLOPs, with the final eval metric in the title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, value = headline_metric(result)
    figure, axis = plt.subplots(figsize=(6, 4))
    if training is not None and storage.exists(training["metrics_path"]):
        history = [json.loads(line) for line in storage.read_bytes(training["metrics_path"]).decode().splitlines()]
        axis.plot([h["total_flops"] for h in history], [h["loss"] for h in history], label=f"{method} training loss")
        axis.set_xlabel("total training FLOPs (scoring + training + reference share)")
        axis.set_ylabel("loss")
        axis.legend()
    axis.set_title(f"{method}: {metric} = {value:.3f}")
    figure.tight_layout()
    return figure


def figure_html(figure) -> str:
    """A matplotlib figure as an inline <img> (the reports are single self-contained HTML files)."""
    import base64
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return f"<img src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'/>"


def write_html_report(path: str, method: str, result: EvaluateResult, training: dict[str, Any] | None, figure) -> None:
    fmt = lambda value, why: f"{value:.3f}" if value is not None else f"- ({escape(why or '')})"  # noqa: E731
    rows = "".join(
        f"<tr><td>{escape(name)}</td><td>{escape(m.layout or '')}</td><td>{m.num_samples}</td>"
        f"<td>{fmt(m.top1, m.classification_skipped)}</td><td>{fmt(m.image_to_text_r1, m.retrieval_skipped)}</td>"
        f"<td>{fmt(m.text_to_image_r1, m.retrieval_skipped)}</td></tr>"
        for name, m in result.splits.items()
    )
    champion = (f"<p>champion metric: {escape(result.champion_metric)} = {result.champion_value:.4f}</p>"
                if result.champion_metric and result.champion_value is not None else "")
    flops = f"<p>total training FLOPs: {training['total_flops']:.3e}</p>" if training else ""
    Path(path).write_text(
        f"<html><body><h2>flexi-jest zero-shot evaluation: {method}</h2>{flops}{champion}"
        f"<table border=1><tr><th>eval set</th><th>layout</th><th>samples</th><th>top-1</th><th>i2t R@1</th>"
        f"<th>t2i R@1</th></tr>{rows}</table>"
        f"{figure_html(figure)}</body></html>"
    )


def write_comparison_report(path: str, summary: dict[str, Any], figure) -> None:
    """HTML: the methods' table (final metric, FLOPs, steps and FLOPs to the baseline's final metric, the ratios
    under both accountings, learner FLOPs and all FLOPs, and the break-even learner count), the reference's own
    metric, and the plot."""
    fmt = lambda v, spec: format(v, spec) if v is not None else "never" if spec == ".3e" else "-"  # noqa: E731
    rows = "".join(
        f"<tr><td>{escape(name)}</td><td>{info['final_metric']:.3f}</td><td>{info['total_flops']:.3e}</td>"
        f"<td>{fmt(info.get('steps_to_target'), '.0f')}</td><td>{fmt(info['flops_to_target'], '.3e')}</td>"
        f"<td>{fmt(info.get('flops_ratio_vs_uniform_learner_only'), '.2f')}</td>"
        f"<td>{fmt(info['flops_ratio_vs_uniform'], '.2f')}</td>"
        f"<td>{fmt(info.get('break_even_runs'), 'd')}</td></tr>"
        for name, info in summary["methods"].items())
    target = f"{summary['target']:.3f}" if summary["target"] is not None else "(no baseline ran)"
    reference = (f"<p>the reference's own {escape(summary['metric'])}: {summary['reference']['final_metric']:.3f}</p>"
                 if "reference" in summary else "")
    Path(path).write_text(
        f"<html><body><h2>flexi-jest: methods compared</h2><p>{escape(summary['metric'])}; target = the "
        f"{escape(summary['baseline'])} baseline's final value, {target}</p>{reference}<table border=1><tr>"
        f"<th>method</th><th>final</th><th>total FLOPs</th><th>steps to target</th><th>FLOPs to target</th>"
        f"<th>learner FLOPs ratio vs {escape(summary['baseline'])} (reference cached: the paper's count)</th>"
        f"<th>all FLOPs ratio (reference training and caching charged)</th>"
        f"<th>break-even learner runs</th></tr>"
        f"{rows}</table>{figure_html(figure)}</body></html>")
