"""The pipeline's command line: compile it to KFP IR YAML, run it here (pipelines/runner.py), or submit it to a
Kubeflow Pipelines endpoint; `--from-stage` / `--from-run` rerun from one stage on an earlier run's outputs.

    python pipelines/flexi_jest_pp.py compile --out flexi_jest_pp.yaml          # KFP IR YAML for a cluster
    python pipelines/flexi_jest_pp.py run-local --workdir runs/pipeline         # no cluster, no Docker
    python pipelines/flexi_jest_pp.py run-local --runner docker ...             # each component in its image
    python pipelines/flexi_jest_pp.py submit --host https://kfp.example.com --param steps=2000

(`python -m pipelines.cli` is the same command.)
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `components` and `pipelines`

from pipelines.flexi_jest_pp import (  # noqa: E402
    RERUN_STAGES,
    STAGES,
    cluster_pipeline,
    compile_pipeline,
)
from pipelines.runner import format_summary, run_local  # noqa: E402


def parse_params(pairs: list[str], pipeline=None) -> dict[str, Any]:
    """["steps=100", "baseline_methods=[\"uniform\"]"] -> pipeline arguments typed by the pipeline's signature
    (string parameters, the *_config JSON objects included, stay strings; others are parsed as JSON)."""
    import inspect

    signature = inspect.signature((pipeline or cluster_pipeline()).pipeline_func).parameters
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"--param expects key=value, got {pair!r}")
        if key not in signature:
            raise SystemExit(f"unknown pipeline parameter {key!r}; expected one of {sorted(signature)}")
        if signature[key].annotation is str:
            params[key] = raw
            continue
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--param {key}: {raw!r} is not a JSON value ({exc})") from None
    return params


def submit(host: str, experiment: str, params: dict[str, Any], from_stage: str = "make_data", learner_nodes: int = 1,
           gpus_per_node: int = 1, service_account: str = "") -> None:
    """Submit to a Kubeflow Pipelines endpoint. A multi-node learner launches a PyTorchJob: run the pipeline under
    a service account allowed to (k8s/base: flexi-jest-pipeline-runner's Role)."""
    import kfp

    pipeline = cluster_pipeline(from_stage, learner_nodes, gpus_per_node)
    client = kfp.Client(host=host)
    run = client.create_run_from_pipeline_func(pipeline, arguments=params, experiment_name=experiment,
                                               service_account=service_account or None)
    print(f"submitted run {run.run_id} to {host}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the Flexi-JEST++ pipeline: compile it, run it here, or submit it")
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("compile", help="write the KFP IR YAML")
    c.add_argument("--out", default="flexi_jest_pp.yaml")
    r = commands.add_parser("run-local", help="run the whole pipeline here with KFP local execution")
    r.add_argument("--workdir", default="runs/pipeline")
    r.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--runner", choices=("subprocess", "docker"), default="subprocess",
                   help="docker: each component in its image (FLEXI_JEST_IMAGE) through DOCKER_HOST, as uid 10001, "
                        "with MLFLOW_TRACKING_URI and FLEXI_JEST_S3_ENDPOINT servers the containers reach and an "
                        "s3:// storage_root (README, \"Before a cluster\")")
    r.add_argument("--no-cache", action="store_true", help="recompute every stage (default: KFP's local cache "
                   "under WORKDIR/kfp-cache reuses stages whose inputs are unchanged)")
    s = commands.add_parser("submit", help="submit to a Kubeflow Pipelines endpoint")
    s.add_argument("--host", required=True)
    s.add_argument("--experiment", default="flexi-jest")
    s.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--service-account", default="", help="the pipeline pods' service account (multi-node: "
                   "one allowed to create PyTorchJobs)")
    for sub in (c, s):
        sub.add_argument("--learner-nodes", type=int, default=1, help="> 1: train the main learner as a PyTorchJob "
                         "on this many nodes (storage_root must be s3://...)")
        sub.add_argument("--gpus-per-node", type=int, default=1)
    for sub in (c, r, s):
        sub.add_argument("--from-stage", default="make_data", choices=STAGES,
                         help="make_data: the whole pipeline; another stage: rerun from it on an earlier run's "
                              "outputs, given by --from-run (" + "; ".join(f"{k}: {v}" for k, v in RERUN_STAGES.items())
                              + ")")
    for sub in (r, s):
        sub.add_argument("--from-run", default="", metavar="RUN_ID", help="rerun on this earlier pipeline run's "
                         "outputs (its KFP run ID or MLflow parent run id), from --from-stage (default: train_learner)")
    args = parser.parse_args(argv)
    from_stage = args.from_stage
    if getattr(args, "from_run", "") and from_stage == "make_data":
        from_stage = "train_learner"
    pipeline = cluster_pipeline(from_stage)
    params = parse_params(getattr(args, "param", []), pipeline)
    if getattr(args, "from_run", ""):
        params["from_run"] = args.from_run
    if args.command != "compile" and from_stage != "make_data" and not params.get("from_run"):
        raise SystemExit(f"--from-stage {from_stage} reruns on an earlier run's outputs: give that run with --from-run")
    if args.command == "compile":
        compile_pipeline(args.out, from_stage, args.learner_nodes, args.gpus_per_node)
    elif args.command == "run-local":
        print(format_summary(run_local(args.workdir, params, from_stage, args.runner, cache=not args.no_cache)))
    else:
        submit(args.host, args.experiment, params, from_stage, args.learner_nodes, args.gpus_per_node,
               args.service_account)
    return 0


if __name__ == "__main__":
    sys.exit(main())
