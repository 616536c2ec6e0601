"""Stage entry points shared by the CLI and the KFP components: config in, result out, tracked in MLflow.

`run_stage(stage, cfg)` runs one library stage on a validated config. The `*_stage` functions add
what a pipeline stage needs around it: a validated config from a JSON-able dict (errors name the
field), an MLflow run nested under the pipeline's parent run, metrics and artifacts, and for
trained models an MLflow model. They import nothing from KFP; components/ wraps them, with what only
the components need around them in pipeline_support.py. The reports they write: reports.py.
"""

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from flexi_jest import storage
from flexi_jest.config import (
    CacheReferenceResult,
    EvaluateResult,
    MakeDataResult,
    TrainResult,
    validated_stage_config,
)


def run_stage(stage: str, cfg: BaseModel) -> BaseModel:
    """Run one stage's library function on its validated config (training on several processes: torchrun_stage),
    its dataset specs resolved and read under the config's data_access (data/access.py: storage only unless the
    config enables more)."""
    from flexi_jest.data.access import granted

    with granted(getattr(cfg, "data_access", None)):
        return _run_stage(stage, cfg)


def _run_stage(stage: str, cfg: BaseModel) -> BaseModel:
    processes = training_processes(cfg)
    if processes > 1:
        return torchrun_stage(stage, cfg, processes)
    if stage == "make-data":
        from flexi_jest.data.make import make_data
        return make_data(cfg)
    if stage == "train-reference":
        from flexi_jest.train import train_reference
        return train_reference(cfg)
    if stage == "cache-reference":
        from flexi_jest.reference_cache import cache_reference
        return cache_reference(cfg)
    if stage == "train-learner":
        from flexi_jest.train import train_learner
        return train_learner(cfg)
    if stage == "evaluate":
        from flexi_jest.evaluate import evaluate
        return evaluate(cfg)
    raise ValueError(f"unknown stage {stage!r}")


def training_processes(cfg: BaseModel) -> int:
    """How many DDP processes a training config asks for here: 1 for other stages and inside torchrun."""
    import os
    if not hasattr(cfg, "processes") or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return 1
    if cfg.processes:
        return cfg.processes
    import torch
    return max(1, torch.cuda.device_count()) if cfg.device in ("auto", "cuda") else 1


def torchrun_stage(stage: str, cfg: BaseModel, processes: int) -> BaseModel:
    """Run a training stage on `processes` local processes under torchrun (one per GPU, NCCL; or gloo on CPUs),
    from its config written to a file; returns the result rank 0 wrote. Output of the ranks goes to this
    process's stdout/stderr; a failed rank fails the stage with torchrun's exit status."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.json"
        config.write_text(cfg.model_dump_json())
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   "-m", "flexi_jest.cli", stage, "--config", str(config)]
        print(f"[{stage}] {processes} processes: {' '.join(command)}", flush=True)
        completed = subprocess.run(command, stdout=subprocess.DEVNULL)
    if completed.returncode != 0:
        raise RuntimeError(f"{stage} on {processes} processes failed (torchrun exit status {completed.returncode}); "
                           "the ranks' errors are printed above")
    return TrainResult.model_validate_json(storage.read_bytes(storage.join(cfg.out_dir, "result.json")))


def _tracked(stage: str, values: dict[str, Any], profile: str, pipeline_run: str, experiment: str, after=None,
             runner=None):
    """Validate, run (in this process, or through runner(cfg) -> result), track: an MLflow run nested under
    pipeline_run (the pipeline's MLflow parent run id or KFP run ID) when given, else a run of its own."""
    from flexi_jest import tracking

    cfg = validated_stage_config(stage, profile, values)
    with tracking.stage_run(pipeline_run or None, stage, cfg, experiment) as run:
        result = runner(cfg) if runner is not None else run_stage(stage, cfg)
        tracking.log_result(result)
        if isinstance(result, TrainResult):
            tracking.log_history(result.metrics_path)
        if after is not None:
            after(cfg, result)
    return cfg, result, run.info.run_id


def make_data_stage(values: dict[str, Any], profile: str, pipeline_run: str = "",
                    experiment: str = "flexi-jest") -> tuple[MakeDataResult, str]:
    _, result, run_id = _tracked("make-data", values, profile, pipeline_run, experiment)
    return result, run_id


def training_lineage(cfg, result: TrainResult) -> tuple[dict[str, Any], dict[str, str]]:
    """(lineage, datasets) of a trained model: what it was trained on and how, for the registry."""
    lineage: dict[str, Any] = {"model_sha256": result.checkpoint_sha256,
                               "model": cfg.model.name or cfg.model.model_dump(),
                               "init_checkpoint": cfg.init_checkpoint, "flops": result.flops.model_dump(),
                               "total_flops": result.total_flops, "steps": result.steps}
    if hasattr(cfg, "pool"):  # the learner
        lineage["reference_sha256"] = cfg.reference_sha256
        lineage["selection"] = {k: getattr(cfg, k) for k in (
            "method", "score", "filter_ratio", "n_chunks", "super_batch_size", "scoring_patch_size",
            "train_patch_sizes", "selection_scope", "independent_mode")}
        return lineage, {"pool": cfg.pool}
    return lineage, {"curated": cfg.data}


def _log_model(cfg, result: TrainResult) -> None:
    from flexi_jest import tracking
    from flexi_jest.checkpoint import load_model
    model, _ = load_model(result.checkpoint)
    tracking.log_model(model, *training_lineage(cfg, result))


def train_reference_stage(values: dict[str, Any], profile: str, pipeline_run: str = "",
                          experiment: str = "flexi-jest") -> tuple[TrainResult, str]:
    """Train the reference and log it as an MLflow model (registered later as flexi-jest-reference)."""
    _, result, run_id = _tracked("train-reference", values, profile, pipeline_run, experiment, _log_model)
    return result, run_id


def cache_reference_stage(values: dict[str, Any], profile: str, pipeline_run: str = "",
                          experiment: str = "flexi-jest") -> tuple[CacheReferenceResult, str]:
    _, result, run_id = _tracked("cache-reference", values, profile, pipeline_run, experiment)
    return result, run_id


def train_learner_stage(values: dict[str, Any], profile: str, pipeline_run: str = "", experiment: str = "flexi-jest",
                        multinode: dict[str, Any] | None = None) -> tuple[TrainResult, str]:
    """Train a learner here, or with multinode (run_pytorchjob's keyword arguments: nodes, gpus_per_node,
    image, ...) as a PyTorchJob on several nodes, tracked the same way."""
    runner = None
    if multinode:
        from flexi_jest.pytorchjob import run_pytorchjob

        def runner(cfg) -> TrainResult:
            return TrainResult.model_validate(run_pytorchjob(cfg.model_dump_json(), cfg.out_dir, profile=profile,
                                                             **multinode))
    _, result, run_id = _tracked("train-learner", values, profile, pipeline_run, experiment, _log_model, runner)
    return result, run_id


def evaluate_stage(values: dict[str, Any], profile: str, method: str, training: dict[str, Any] | None = None,
                   pipeline_run: str = "", experiment: str = "flexi-jest",
                   report_path: str | None = None) -> tuple[EvaluateResult, str]:
    """Evaluate a model; with its training result, also report the eval metric against total FLOPs."""
    from flexi_jest import reports, tracking

    def report(cfg, result: EvaluateResult) -> None:
        tracking.set_tags({"flexi_jest.method": method})
        if training is not None:
            tracking.log_metrics({"total_flops": float(training["total_flops"])})
        figure = reports.plot_training(method, result, training)
        tracking.log_figure(figure, "report.png")
        if report_path:
            reports.write_html_report(report_path, method, result, training, figure)

    _, result, run_id = _tracked("evaluate", values, profile, pipeline_run, experiment, report)
    return result, run_id


def compare_stage(evaluations: list[dict[str, Any]], pipeline_run: str = "", experiment: str = "flexi-jest",
                  report_path: str | None = None, baseline: str = "uniform",
                  reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """The methods one pipeline run trained, side by side: each learner's eval metric against total training
    FLOPs (the curve its training recorded, ending at its zero-shot evaluation), summarised against the
    baseline when it ran (efficiency.summarize: FLOPs to the baseline's final metric, charged and with the
    reference's share left out, and training steps to it), drawn as the benchmark draws it (efficiency.figure).

    evaluations: per method {"method", "total_flops", "metrics_path", "reference_share", "steps", "result"} (what
    the evaluate component returns). reference: the reference's own evaluation (same form), reported as
    summary["reference"]: a learner passing its reference is JEST's data-quality bootstrapping. Logged on the
    pipeline's MLflow parent run: accuracy_vs_flops.png, method_comparison.json and each method's final metric,
    FLOPs and steps ratios, and the reference's metric."""
    from flexi_jest import efficiency, reports, tracking

    if not evaluations:
        raise ValueError("compare: no evaluations to compare")
    metric = reports.headline_metric(EvaluateResult.model_validate(evaluations[0]["result"]))[0]
    split, key = metric.rsplit(".", 1)
    curves: dict[str, list[efficiency.Curve]] = {}
    step_curves: dict[str, list[efficiency.Curve]] = {}
    shares: dict[str, float] = {}
    for evaluation in evaluations:
        name = evaluation["method"]
        while name in curves:  # two learners of one method (e.g. two configs): keep both
            name += "'"
        total = float(evaluation["total_flops"])
        final = float(evaluation["result"]["splits"][split][key])
        path = evaluation.get("metrics_path")
        recorded = bool(path) and storage.exists(path)
        points = efficiency.curve(path, metric) if recorded else []
        # the zero-shot evaluation (whole eval split) is the final point; training's evals used a capped sample
        curves[name] = [[p for p in points if p[0] < total] + [(total, final)]]
        shares[name] = float(evaluation.get("reference_share", 0.0))
        if evaluation.get("steps"):
            steps = float(evaluation["steps"])
            by_step = efficiency.curve(path, metric, "step") if recorded else []
            step_curves[name] = [[p for p in by_step if p[0] < steps] + [(steps, final)]]
    summary = efficiency.summarize(curves, metric, shares, baseline, step_curves)
    for name, (by_step,) in step_curves.items():  # the steps each learner trained (the last point of its curve)
        summary["methods"][name]["steps"] = by_step[-1][0]
    if reference is not None:
        summary["reference"] = {"final_metric": float(reference["result"]["splits"][split][key]),
                                "training_flops": float(reference.get("total_flops", 0.0))}
    title = f"{metric} against total training FLOPs" + (f" ({pipeline_run})" if pipeline_run else "")
    figure = efficiency.figure(curves, summary, title)
    if report_path:
        reports.write_comparison_report(report_path, summary, figure)
    if pipeline_run:
        fields = ("final_metric", "total_flops", "flops_ratio_vs_uniform", "flops_ratio_vs_uniform_learner_only",
                  "steps_to_target", "steps_ratio_vs_uniform", "break_even_runs")
        metrics = {f"compare.{name}.{field}": info[field] for name, info in summary["methods"].items()
                   for field in fields if info.get(field) is not None}
        if "reference" in summary:
            metrics["compare.reference.final_metric"] = summary["reference"]["final_metric"]
        tracking.log_to_pipeline_run(pipeline_run, {"accuracy_vs_flops.png": figure},
                                     {"method_comparison.json": summary}, metrics)
    return summary


def promote_stage(learner_run_id: str, evaluation: dict[str, Any], pipeline_run: str = "",
                  experiment: str = "flexi-jest", reference_run_id: str | None = None,
                  rule: dict[str, Any] | None = None):
    """Register the learner (and the reference) in the MLflow registry, once each; `champion` moves only to a
    better learner under the champion rule (config.ChampionRule, from `rule`): registry.promote_learner."""
    from flexi_jest import registry
    from flexi_jest.config import ChampionRule, ConfigError, format_validation_error

    try:
        champion_rule = ChampionRule.model_validate(rule or {})
    except ValidationError as exc:
        raise ConfigError(format_validation_error("promotion", exc)) from None
    result = EvaluateResult.model_validate(evaluation)
    metrics = registry.evaluation_metrics(result)
    shortfalls = {name: split.shortfall for name, split in result.splits.items() if split.shortfall}
    return registry.promote_learner(learner_run_id, metrics, champion_rule, shortfalls, pipeline_run, experiment,
                                    reference_run_id)
