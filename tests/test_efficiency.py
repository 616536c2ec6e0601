"""Curves of an eval metric against total FLOPs, FLOPs to a target, ratios and the plot (flexi_jest.efficiency)."""

import json

import pytest

from flexi_jest import efficiency


def test_curve_reads_the_evaluations_of_a_run(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "loss": 2.0, "total_flops": 10.0},
               {"step": 2, "loss": 1.5, "total_flops": 20.0,
                "eval": {"shapes.top1": 0.25, "shapes.image_to_text_r1": 0.1}},
               {"step": 3, "loss": 1.0, "total_flops": 30.0},
               {"step": 4, "loss": 0.9, "total_flops": 40.0, "eval": {"shapes.top1": 0.5}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert efficiency.curve(str(path), "shapes.top1") == [(20.0, 0.25), (40.0, 0.5)]
    assert efficiency.curve(str(path), "shapes.image_to_text_r1") == [(20.0, 0.1)]
    assert efficiency.curve(str(path), "emoji.top1") == []


def test_flops_to_reach_interpolates_and_reports_never():
    points = [(1.0, 0.1), (2.0, 0.3), (3.0, 0.5)]
    assert efficiency.flops_to_reach(points, 0.4) == pytest.approx(2.5)
    assert efficiency.flops_to_reach(points, 0.05) == 1.0
    assert efficiency.flops_to_reach(points, 0.6) is None


def test_summary_ratios_against_uniform():
    curves = {"uniform": [[(1, 0.1), (2, 0.2), (4, 0.5)], [(1, 0.1), (2, 0.2), (4, 0.3)]],
              "jest": [[(1, 0.2), (2, 0.4), (4, 0.5)]],
              "bad": [[(1, 0.0), (2, 0.1), (4, 0.2)]]}
    summary = efficiency.summarize(curves, "top1", {"jest": 1.0})
    assert summary["target"] == pytest.approx(0.4)  # the seed-mean curve's final value
    assert summary["uniform_flops_to_target"] == pytest.approx(4.0)
    uniform, jest, bad = (summary["methods"][n] for n in ("uniform", "jest", "bad"))
    assert uniform["final_metric_std"] == pytest.approx(0.1) and uniform["flops_ratio_vs_uniform"] == pytest.approx(1.0)
    assert uniform["flops_to_target_per_seed"] == [pytest.approx(10 / 3), None]
    assert jest["flops_to_target"] == 2 and jest["flops_ratio_vs_uniform"] == 2
    assert jest["flops_ratio_vs_uniform_learner_only"] == pytest.approx(4.0)  # the reference's 1 FLOP left out
    assert bad["flops_to_target"] is None and bad["flops_ratio_vs_uniform"] is None
    assert bad["flops_ratio_vs_uniform_learner_only"] is None


def test_summary_without_the_baseline_has_no_ratios():
    summary = efficiency.summarize({"joint": [[(1, 0.2), (2, 0.3)]]}, "top1")
    assert summary["target"] is None and summary["methods"]["joint"]["flops_ratio_vs_uniform"] is None
    assert summary["methods"]["joint"]["final_metric"] == 0.3


def test_figure_draws_a_line_per_method_and_a_band_over_seeds(tmp_path):
    curves = {"uniform": [[(1, 0.1), (2, 0.3)], [(1, 0.2), (2, 0.4)]], "joint": [[(1, 0.2), (2, 0.5)]]}
    summary = efficiency.summarize(curves, "top1")
    fig = efficiency.figure(curves, summary, "test")
    axis = fig.axes[0]
    labels = [line.get_label() for line in axis.get_lines()]
    assert labels == ["uniform", "joint", "uniform final"]
    assert len(axis.collections) == 1  # the band: only uniform has more than one seed
    assert list(axis.get_lines()[0].get_ydata()) == pytest.approx([0.15, 0.35])
    fig.savefig(tmp_path / "plot.png")
    efficiency.ratio_figure(summary).savefig(tmp_path / "ratio.png")
    assert (tmp_path / "plot.png").stat().st_size > 0 and (tmp_path / "ratio.png").stat().st_size > 0


def test_gain_over_last_reads_the_curve_between_evaluations():
    curve = [(0.0, 0.0), (50.0, 0.5), (100.0, 0.6)]
    assert efficiency.gain_over_last(curve, 0.2) == pytest.approx(0.6 - (0.5 + 30 / 50 * 0.1))  # from x = 80
    assert efficiency.gain_over_last([(0, 0.1), (10, 0.1)], 0.5) == 0.0
    with pytest.raises(ValueError, match="two evaluations"):
        efficiency.gain_over_last([(1, 0.2)])


def test_summary_reports_steps_to_target_with_step_curves():
    flops_curves = {"uniform": [[(10, 0.1), (20, 0.2), (40, 0.4)]], "jest": [[(10, 0.3), (20, 0.5)]]}
    step_curves = {"uniform": [[(100, 0.1), (200, 0.2), (400, 0.4)]], "jest": [[(10, 0.3), (20, 0.5)]]}
    summary = efficiency.summarize(flops_curves, "top1", step_curves=step_curves)
    assert summary["methods"]["uniform"]["steps_to_target"] == 400
    assert summary["methods"]["jest"]["steps_to_target"] == pytest.approx(15)  # 0.4 halfway from 10 to 20
    assert summary["methods"]["jest"]["steps_ratio_vs_uniform"] == pytest.approx(400 / 15)


def test_summary_names_both_accountings_and_the_break_even_learner_count():
    """Each method's cost to uniform's final metric under "learner" (the reference's share left out: the paper's
    count) and "charged" (it included), and how many learner runs amortise the share: here jest costs 2 FLOPs to the
    target of which 1 is the reference's, against uniform's 4, so its learner count is 1 FLOP a run and
    N * 1 + 1 < N * 4 from N = 1; a share of 7 needs N * 1 + 7 < N * 4, i.e. N = 3."""
    curves = {"uniform": [[(1, 0.1), (2, 0.2), (4, 0.4)]], "jest": [[(1, 0.2), (2, 0.4), (4, 0.5)]],
              "bad": [[(1, 0.0), (2, 0.1), (4, 0.2)]]}
    summary = efficiency.summarize(curves, "top1", {"jest": 1.0})
    jest = summary["methods"]["jest"]
    learner, charged = jest["accountings"]
    assert learner == {"accounting": "learner", "flops_to_target": 1.0, "flops_ratio": 4.0, "steps_ratio": None}
    assert charged["accounting"] == "charged" and charged["flops_to_target"] == 2 and charged["flops_ratio"] == 2
    assert jest["break_even_runs"] == 1
    assert summary["methods"]["bad"]["break_even_runs"] is None  # never reaches the target
    assert efficiency.break_even_runs(1.0, 7.0, 4.0) == 3 and efficiency.break_even_runs(1.0, 6.0, 4.0) == 3
    assert efficiency.break_even_runs(1.0, 5.9, 4.0) == 2
    assert efficiency.break_even_runs(4.0, 0.0, 4.0) is None  # no cheaper per run: never
    # against a baseline that pays a fixed cost too (the offline filter's reference): only the difference counts
    assert efficiency.break_even_runs(1.0, 7.0, 2.0, 7.0) == 1


def test_shared_cpu_threads_take_a_share_of_the_cores_only_when_asked():
    """run-local's baselines train side by side on one machine: FLEXI_JEST_SHARED_CPU_TASKS=N gives each
    max(1, cores // N) torch threads; unset, torch keeps its own count; a bad value is named."""
    import os

    import torch

    from flexi_jest.device import share_cpu_threads

    before = torch.get_num_threads()
    try:
        assert share_cpu_threads({}) == before
        assert share_cpu_threads({"FLEXI_JEST_SHARED_CPU_TASKS": "2"}) == max(1, (os.cpu_count() or 1) // 2)
        assert share_cpu_threads({"FLEXI_JEST_SHARED_CPU_TASKS": str(10 * (os.cpu_count() or 1))}) == 1
        with pytest.raises(ValueError, match="FLEXI_JEST_SHARED_CPU_TASKS='two'"):
            share_cpu_threads({"FLEXI_JEST_SHARED_CPU_TASKS": "two"})
    finally:
        torch.set_num_threads(before)
