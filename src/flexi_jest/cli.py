"""The `flexi-jest` command: one subcommand per stage, plus `demo` (every stage, end to end).

    flexi-jest make-data --set dataset=shapes --set out_dir=runs/data
    flexi-jest train-learner --config learner.yaml --set method=joint --set filter_ratio=0.8
    flexi-jest demo --workdir runs/demo          # the README's main job (tiny profile, CPU, a few minutes)

Each stage takes a YAML/JSON config (--config), a profile (--profile tiny|paper) and --set key=value
overrides (dotted keys reach nested fields: --set optim.lr=1e-3), validated by the stage's Pydantic
model; it prints its Pydantic result as JSON and writes it next to its outputs.
"""

import argparse
import errno
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from flexi_jest import __version__
from flexi_jest.config import (
    METHOD_PRESETS,
    PROFILES,
    STAGE_CONFIGS,
    deep_merge,
    format_validation_error,
    stage_config,
)
from flexi_jest.errors import BadInput, Unavailable
from flexi_jest.stages import run_stage


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with a key twice (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                break
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r} (first at line {first.line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """Safe YAML (no tags that build objects) with duplicate keys refused."""
    loader = UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """["optim.lr=1e-3", "train_patch_sizes=[8,16]"] -> {"optim": {"lr": "1e-3"}, "train_patch_sizes": [8, 16]}."""
    values: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        node = values
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = load_yaml(raw) if raw.strip() else None
    return values


def load_config_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    text = Path(path).read_text()
    data = json.loads(text, object_pairs_hook=_unique_json_object) if path.endswith(".json") else load_yaml(text)
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of field: value")
    return data


def _unique_json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"duplicate keys {duplicates} in a JSON object")
    return dict(pairs)


def build_config(stage: str, args: argparse.Namespace) -> BaseModel:
    values = deep_merge(load_config_file(args.config), parse_overrides(args.set or []))
    if getattr(args, "overwrite", False):
        values["overwrite"] = True
    return stage_config(stage, args.profile, values)


# ---- demo: every stage end to end -----------------------------------------------------------------------

DEMO_METHODS = {name: METHOD_PRESETS[name] for name in ("uniform", "jest", "flexi-jest")}


def run_demo(workdir: str, dataset: str, profile: str, methods: list[str],
             learner_steps: int | None) -> list[dict[str, Any]]:
    """make data -> train reference -> cache it -> train each learner -> evaluate; returns the table rows."""
    from flexi_jest.data.make import make_data
    from flexi_jest.evaluate import evaluate
    from flexi_jest.reference_cache import cache_reference
    from flexi_jest.train import train_learner, train_reference

    root = workdir.rstrip("/")
    data = f"{root}/data/{dataset}"
    print(f"[1/5] make-data ({dataset}) -> {data}", flush=True)
    made = make_data(stage_config("make-data", profile, {"dataset": dataset, "out_dir": data}))
    print(f"      {', '.join(f'{k}: {v.num_samples}' for k, v in made.splits.items())}; pool noise {made.noise_counts}")
    print("[2/5] train-reference on the curated split", flush=True)
    reference = train_reference(stage_config("train-reference", profile,
                                             {"data": f"{data}/curated", "out_dir": f"{root}/reference"}))
    print("[3/5] cache-reference over the pool", flush=True)
    cache = cache_reference(stage_config("cache-reference", profile,
                                         {"reference": reference.checkpoint, "pool": f"{data}/pool"}))
    rows = []
    for i, name in enumerate(methods):
        print(f"[4/5] train-learner {name} ({i + 1}/{len(methods)})", flush=True)
        values = {"pool": f"{data}/pool", "reference_cache": cache.cache_dir,
                  "reference_sha256": cache.reference_sha256,
                  "out_dir": f"{root}/learner-{name}", "reference_training_flops": reference.flops.reference_training,
                  "reference_caching_flops": cache.flops, **DEMO_METHODS[name]}
        if learner_steps:
            values["steps"] = learner_steps
        learner = train_learner(stage_config("train-learner", profile, values))
        print(f"[5/5] evaluate {name}", flush=True)
        result = evaluate(stage_config("evaluate", profile, {"model": learner.checkpoint, "eval_data": [f"{data}/eval"],
                                                              "out_path": f"{root}/learner-{name}/eval.json"}))
        metrics = result.splits[dataset]
        rows.append({"method": name, "steps": learner.steps, "seconds": learner.seconds,
                     "learner_flops": learner.flops.learner_scoring + learner.flops.learner_training,
                     "total_flops": learner.total_flops, "top1": metrics.top1, "i2t_r1": metrics.image_to_text_r1,
                     "t2i_r1": metrics.text_to_image_r1,
                     "noisy_selected": learner.selection.get("noisy_fraction_selected", float("nan"))})
    reference_eval = evaluate(stage_config("evaluate", profile,
                                           {"model": reference.checkpoint, "eval_data": [f"{data}/eval"]}))
    ref_metrics = reference_eval.splits[dataset]
    rows.append({"method": "reference", "steps": reference.steps, "seconds": reference.seconds,
                 "learner_flops": 0.0, "total_flops": reference.total_flops, "top1": ref_metrics.top1,
                 "i2t_r1": ref_metrics.image_to_text_r1, "t2i_r1": ref_metrics.text_to_image_r1,
                 "noisy_selected": float("nan")})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (f"{'method':<12} {'steps':>6} {'time s':>7} {'learner GFLOP':>14} {'total GFLOP':>12} {'top1':>6} "
              f"{'i2t R@1':>8} {'t2i R@1':>8} {'noisy sel.':>10}")
    lines = [header, "-" * len(header)]
    for r in rows:
        top1 = f"{r['top1']:.3f}" if r["top1"] is not None else "-"
        noisy = f"{r['noisy_selected']:.2f}" if r["noisy_selected"] == r["noisy_selected"] else "-"
        lines.append(f"{r['method']:<12} {r['steps']:>6} {r['seconds']:>7.1f} {r['learner_flops'] / 1e9:>14.1f} "
                     f"{r['total_flops'] / 1e9:>12.1f} {top1:>6} {r['i2t_r1']:>8.3f} {r['t2i_r1']:>8.3f} {noisy:>10}")
    return "\n".join(lines)


def registry_command(args: argparse.Namespace) -> int:
    """promote / rollback on the MLflow registry (MLFLOW_TRACKING_URI); a refusal is one line on stderr."""
    from flexi_jest import registry

    try:
        if args.command == "promote":
            old = registry.promote_by_hand(args.model, args.version, args.alias)
            print(f"{args.model} version {args.version} is now {args.alias!r}"
                  + (f" (was version {old}; it is now {registry.PREVIOUS_CHAMPION!r})"
                     if old and old != str(args.version) and args.alias == registry.CHAMPION else ""))
        else:
            new, old = registry.rollback(args.model)
            print(f"{args.model}: champion rolled back from version {old} to version {new} "
                  f"(version {old} is now {registry.PREVIOUS_CHAMPION!r})")
    except (ConnectionError, LookupError, TimeoutError) as exc:
        print(f"flexi-jest {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flexi-jest", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"flexi-jest {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for stage in STAGE_CONFIGS:
        sub = commands.add_parser(stage, help=f"run the {stage} stage")
        sub.add_argument("--config", help="YAML or JSON file of config fields")
        sub.add_argument("--profile", default="tiny", choices=sorted(PROFILES))
        sub.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field (repeatable)")
        sub.add_argument("--print-config", action="store_true", help="print the validated config and exit")
        sub.add_argument("--track", action="store_true", help="log an MLflow run as the pipeline stage does "
                         "(default when MLFLOW_TRACKING_URI is set; without it, the store is ./mlflow.db)")
        sub.add_argument("--experiment", default="flexi-jest", help="MLflow experiment of a tracked run")
        if "overwrite" in STAGE_CONFIGS[stage].model_fields:
            sub.add_argument("--overwrite", action="store_true", help="start afresh: remove an earlier run's "
                             "checkpoints and result from out_dir (same as --set overwrite=true)")
    promote = commands.add_parser("promote", help="give a registered model version an alias (default: champion)")
    promote.add_argument("--model", default="flexi-jest-learner")
    promote.add_argument("--version", required=True)
    promote.add_argument("--alias", default="champion")
    rollback = commands.add_parser("rollback", help="champion back to the previous-champion version")
    rollback.add_argument("--model", default="flexi-jest-learner")
    demo = commands.add_parser("demo", help="every stage end to end on generated data, then a result table")
    demo.add_argument("--workdir", default="runs/demo")
    demo.add_argument("--dataset", default="shapes", choices=["shapes", "emoji", "digits"])
    demo.add_argument("--profile", default="tiny", choices=sorted(PROFILES))
    demo.add_argument("--methods", default="uniform,jest,flexi-jest",
                      help=f"comma-separated, from {sorted(DEMO_METHODS)}")
    demo.add_argument("--learner-steps", type=int, default=None)
    args = parser.parse_args(argv)

    if args.command in ("promote", "rollback"):
        return registry_command(args)
    if args.command == "demo":
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in DEMO_METHODS]
        if unknown:
            parser.error(f"unknown demo methods {unknown}; expected some of {sorted(DEMO_METHODS)}")
        started = time.perf_counter()
        try:
            rows = run_demo(args.workdir, args.dataset, args.profile, methods, args.learner_steps)
        except Exception as exc:
            return report_user_error("demo", exc)
        print()
        print(format_table(rows))
        print(f"\nend-to-end wall time: {time.perf_counter() - started:.1f} s; outputs under {args.workdir}")
        Path(args.workdir, "demo_results.json").write_text(json.dumps(rows, indent=1))
        return 0

    try:
        cfg = build_config(args.command, args)
    except ValidationError as exc:
        print(format_validation_error(args.command, exc), file=sys.stderr)
        return 2
    except (ValueError, OSError, yaml.YAMLError) as exc:
        print(f"invalid config for {args.command}: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.model_dump_json(indent=1))
        return 0
    if tracked(args):
        try:
            result, run_id = run_tracked_stage(args.command, cfg, args.experiment)
        except Exception as exc:
            return report_user_error(args.command, exc)
        from flexi_jest.tracking import tracking_uri
        print(f"[{args.command}] tracked as MLflow run {run_id} (experiment {args.experiment!r}, {tracking_uri()})",
              file=sys.stderr)
        print(result.model_dump_json(indent=1))
        return 0
    from flexi_jest.distributed import is_main_process, shutdown
    try:
        result = run_stage(args.command, cfg)
    except BaseException as exc:
        shutdown()  # under torchrun: leave the process group
        if isinstance(exc, Exception):
            return report_user_error(args.command, exc)
        raise
    shutdown(barrier=True)  # every rank finished: leave together
    if is_main_process():
        print(result.model_dump_json(indent=1))
    return 0


# exit statuses of the one-line errors: the input is wrong (fix it and rerun), or the place the stage reads from
# or writes to failed (disk full, storage or tracking server unreachable: rerun when it is back)
BAD_INPUT, ENVIRONMENT = 2, 1
DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "not permitted"}


def user_error(exc: BaseException) -> tuple[str, int] | None:
    """(one line, exit status) for an error a user can cause, whose message names the problem (and the file,
    set, field or server); None for anything else, which is a bug and keeps its traceback. By the two bases of
    errors.py, so that classifying an error imports none of the modules that raise them."""
    if isinstance(exc, (BadInput, FloatingPointError)):  # FloatingPointError: a diverged model
        return " ".join(str(exc).split()), BAD_INPUT
    if isinstance(exc, Unavailable):
        return " ".join(str(exc).split()), ENVIRONMENT
    if isinstance(exc, OSError) and exc.errno in DISK_ERRORS:
        where = exc.filename if exc.filename is not None else "(the file was not named)"
        return f"{DISK_ERRORS[exc.errno]} writing {where} ([Errno {exc.errno}] {exc.strerror})", ENVIRONMENT
    return None


def report_user_error(command: str, exc: Exception) -> int:
    """Print a user's error as one line on stderr and return its exit status; re-raise anything else."""
    known = user_error(exc)
    if known is None:
        raise exc
    message, status = known
    print(f"{command}: {message}", file=sys.stderr)
    return status


def tracked(args: argparse.Namespace) -> bool:
    """Track this CLI stage in MLflow: --track, or MLFLOW_TRACKING_URI set; never inside torchrun's ranks (the
    process that started torchrun tracks the stage, as the pipeline's does)."""
    import os
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return False
    return args.track or bool(os.environ.get("MLFLOW_TRACKING_URI"))


def run_tracked_stage(stage: str, cfg: BaseModel, experiment: str) -> tuple[BaseModel, str]:
    """The stage through the pipeline stage's own entry point (flexi_jest.stages), so that it logs the same
    MLflow run: config as params, result as metrics and JSON, training curves, the model for training stages."""
    from flexi_jest import stages

    values = cfg.model_dump()
    if stage == "evaluate":
        return stages.evaluate_stage(values, "tiny", Path(cfg.model).parent.name or "model", None, "", experiment)
    entry = {"make-data": stages.make_data_stage, "train-reference": stages.train_reference_stage,
             "cache-reference": stages.cache_reference_stage, "train-learner": stages.train_learner_stage}[stage]
    return entry(values, "tiny", "", experiment)


if __name__ == "__main__":
    sys.exit(main())
