"""Running the pipeline on this machine: KFP local execution (each component a subprocess in this environment, or
a container of its image with --runner docker) under a local or given MLflow store, and the run's summary table,
read back from MLflow. The DAG itself is pipelines/flexi_jest_pp.py; the command line, pipelines/cli.py."""

import hashlib
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `components` and `pipelines`

from flexi_jest.device import SHARED_CPU_ENV  # noqa: E402
from pipelines.flexi_jest_pp import flexi_jest_pp_definition, local_pipeline  # noqa: E402

# --runner docker: the services and S3 keys a component container gets from this environment, as a pod gets
# them from the cluster's env and its Secret (with_cluster_services); nothing else of this machine goes in.
CONTAINER_ENV = ("MLFLOW_TRACKING_URI", "FLEXI_JEST_S3_ENDPOINT", "MLFLOW_S3_ENDPOINT_URL", "FLEXI_JEST_S3_REGION",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                 "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")  # an MLflow server with basic auth (k8s/)
CONTAINER_USER = "10001:10001"  # the images' USER, as a pod's securityContext runAsUser/runAsGroup would set
# KFP's Docker task handler calls docker.from_env() with docker-py's 60 s read timeout, which also bounds the
# silence between two lines of a container's streamed log: a component quiet for a minute (a training step on a
# loaded machine), or podman's API busy removing the previous container, would fail a task that is fine.
DOCKER_API_TIMEOUT_S = 3600


def docker_runner(params: dict[str, Any]):
    """KFP's DockerRunner, running each component in its image (components/image.py: FLEXI_JEST_IMAGE) as a pod
    would: as CONTAINER_USER, only KFP's pipeline root mounted, the MLflow server and S3 reached over the network
    (their URLs must be reachable from the containers, not loopback), data at an s3:// storage_root."""
    from kfp import local

    tracking = os.environ.get("MLFLOW_TRACKING_URI", "")
    endpoint = os.environ.get("FLEXI_JEST_S3_ENDPOINT") or os.environ.get("MLFLOW_S3_ENDPOINT_URL", "")
    problems = []
    if not tracking.startswith(("http://", "https://")):
        problems.append(f"MLFLOW_TRACKING_URI must be an MLflow server the containers reach (http://...), "
                        f"got {tracking or 'nothing'}")
    if not endpoint.startswith(("http://", "https://")):
        problems.append("FLEXI_JEST_S3_ENDPOINT must be the S3 server the containers reach (http://...)")
    if not str(params.get("storage_root", "")).startswith("s3://"):
        problems.append("--param storage_root=s3://bucket/prefix is required: a container's own disk is gone after it")
    for url in (tracking, endpoint):
        if any(f"//{host}" in url for host in ("127.", "localhost", "[::1]")):
            problems.append(f"{url} is loopback: inside a container that is the container itself")
    if problems:
        raise SystemExit("run-local --runner docker: " + "; ".join(problems))
    import docker.client

    docker.client.DEFAULT_TIMEOUT_SECONDS = DOCKER_API_TIMEOUT_S  # from_env's default, read when it is called
    environment = {name: os.environ[name] for name in CONTAINER_ENV if os.environ.get(name)}
    return local.DockerRunner(user=CONTAINER_USER, environment=environment)


def local_parent_run_id(pipeline_root: Path, pipeline_name: str, since: float) -> str:
    """The MLflow parent run id of the local pipeline run started at `since`: open_tracking's `tracking`
    artifact (KFP local execution names the run <pipeline name>-<timestamp> and does not hand out its run ID)."""
    found = sorted((path.stat().st_mtime,
                    path) for path in pipeline_root.glob(f"{pipeline_name}-*/open-tracking/tracking")
                   if path.stat().st_mtime >= since)
    if not found:
        raise SystemExit(
            f"the pipeline wrote no open-tracking artifact under {pipeline_root}: it did not start tracking")
    return json.loads(found[-1][1].read_text())["mlflow_run_id"]


def code_digest(repo: Path = Path(__file__).resolve().parents[1]) -> str:
    """sha256 (12 hex) of the code a local run executes: every .py file of the library and the components.
    KFP's cache key holds a component's own source and image tag, not the library it calls, so run-local keeps
    one cache per code digest: a stage is never taken from the cache of other code."""
    digest = hashlib.sha256()
    for path in sorted([*(repo / "src" / "flexi_jest").rglob("*.py"), *(repo / "components").rglob("*.py")]):
        digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def run_local(workdir: str, params: dict[str, Any], from_stage: str = "make_data",
              runner: str = "subprocess", cache: bool = True) -> dict[str, Any]:
    """Run the whole pipeline with KFP local execution: subprocesses in this environment, or (runner "docker")
    each component in its container image (docker_runner). cache: KFP's local cache under workdir/kfp-cache,
    so that a rerun with one knob changed recomputes only what depends on it (one cache per code_digest)."""
    from kfp import local

    root = Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if runner == "docker":
        task_runner = docker_runner(params)
        # KFP mounts its pipeline root into every container at the same path; CONTAINER_USER writes there.
        (root / "kfp").mkdir(exist_ok=True)
        (root / "kfp").chmod(0o1777)
    else:
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        os.environ.setdefault("MLFLOW_ARTIFACTS_DESTINATION", str(root / "mlartifacts"))
        task_runner = local.SubprocessRunner(use_venv=False)
    params = {"run_name": f"flexi-jest-pp-{time.strftime('%Y%m%d-%H%M%S')}", **params}
    if runner != "docker":  # the ParallelFor's baselines train side by side here: each takes its share of the cores
        baselines = params.get("baseline_methods", inspect.signature(flexi_jest_pp_definition).parameters[
            "baseline_methods"].default)
        os.environ.setdefault(SHARED_CPU_ENV, str(max(1, len(baselines))))
    local.init(runner=task_runner, pipeline_root=str(root / "kfp"), enable_caching=cache,
               cache_root=str(root / "kfp-cache" / code_digest()))
    pipeline = local_pipeline(from_stage)
    started_at = time.time() - 1
    started = time.perf_counter()
    pipeline(**params)
    seconds = time.perf_counter() - started
    parent_run_id = local_parent_run_id(root / "kfp", pipeline.name, started_at)
    summary = summarize(os.environ["MLFLOW_TRACKING_URI"], parent_run_id, root)
    summary["seconds"] = seconds
    summary["tracking_uri"] = os.environ["MLFLOW_TRACKING_URI"]
    summary["runner"] = runner
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def summarize(tracking_uri: str, parent_run_id: str, workdir: Path) -> dict[str, Any]:
    """From MLflow: the parent run, each method's eval metrics and FLOPs, the registered learner, the stages KFP
    took from its cache, and the methods' comparison (the compare stage: accuracy-vs-FLOPs plot, downloaded into
    workdir, and FLOPs ratios)."""
    import mlflow

    from flexi_jest.tracking import STAGE_TAG, find_pipeline_run

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    parent = find_pipeline_run(parent_run_id)
    if parent is None:
        raise SystemExit(
            f"no MLflow pipeline run {parent_run_id!r} in {tracking_uri}: the pipeline did not start tracking")
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    comparison = json.loads(Path(client.download_artifacts(parent.info.run_id, "method_comparison.json",
                                                           str(workdir))).read_text())
    plot = client.download_artifacts(parent.info.run_id, "accuracy_vs_flops.png", str(workdir))
    tags = parent.data.tags
    evaluations = [client.get_run(run_id) for key, run_id in sorted(tags.items())
                   if key.startswith(f"{STAGE_TAG}evaluate.")]  # computed here or taken from KFP's cache
    rows = []
    headline = comparison["metric"].rsplit(".", 1)[0]  # the eval split the methods are compared on
    for run in evaluations:
        m = run.data.metrics
        top1, i2t, t2i = (m.get(f"splits.{headline}.{key}") for key in ("top1", "image_to_text_r1", "text_to_image_r1"))
        method = run.data.tags.get("flexi_jest.method")
        compared = comparison["methods"].get(method, {})  # the reference is evaluated, not compared
        total = m.get("total_flops")
        rows.append({"method": method, "top1": top1, "i2t_r1": i2t, "t2i_r1": t2i, "total_flops": total,
                     "learner_flops": total - compared.get("reference_share_flops", 0.0) if total else None,
                     **{field: compared.get(field) for field in ("steps_to_target", "flops_to_target",
                                                                 "flops_ratio_vs_uniform",
                                                                 "flops_ratio_vs_uniform_learner_only",
                                                                 "break_even_runs")}})
    rows.sort(key=lambda r: r["method"] or "")
    promotion = next((r for r in children if r.data.tags.get("flexi_jest.stage") == "promote"), None)
    cached = sorted(key.split(".", 2)[2] for key, value in tags.items()
                    if key.startswith("flexi_jest.cached.") and value == "true")
    return {"parent_run_id": parent.info.run_id, "kfp_run_id": tags.get("flexi_jest.kfp_run_id"), "rows": rows,
            "plot": plot, "comparison": comparison, "cached_stages": cached,
            "decision": promotion.data.tags.get("decision") if promotion else None,
            "learner_version": promotion.data.tags.get("learner_version") if promotion else None}


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"pipeline finished in {summary['seconds']:.1f} s; MLflow parent run {summary['parent_run_id']} "
             f"(rerun a stage on its outputs: --from-run {summary['parent_run_id']} [--from-stage STAGE])",
             f"from KFP's cache: {', '.join(summary['cached_stages']) or 'nothing'}",
             f"MLflow store: {summary['tracking_uri']}  (browse: mlflow ui --backend-store-uri "
             f"{summary['tracking_uri']})",
             f"registered model: flexi-jest-learner version {summary['learner_version']} -> alias "
             f"'{summary['decision']}'",
             f"accuracy-vs-FLOPs plot: {summary['plot']}", "",
             f"{'method':<15} {'top1':>7} {'i2t R@1':>8} {'t2i R@1':>8} {'learner GFLOP':>13} {'all GFLOP':>10} "
             f"{'steps to tgt':>12} {'learner ratio':>13} {'all ratio':>10} {'break-even':>10}"]
    for row in summary["rows"]:
        fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
        times = lambda v: f"{v:.2f}x" if v else "-"  # noqa: E731
        giga = lambda v: f"{v / 1e9:.1f}" if v else "-"  # noqa: E731
        steps = f"{row['steps_to_target']:.0f}" if row.get("steps_to_target") is not None else "-"
        runs = row.get("break_even_runs")
        even = "-" if row["method"] in ("reference", "uniform") or row.get("flops_to_target") is None else (
            "never" if runs is None else f"{runs} run{'s' if runs > 1 else ''}")
        lines.append(
            f"{row['method'] or '?':<15} {fmt(row['top1']):>7} {fmt(row['i2t_r1']):>8} {fmt(row['t2i_r1']):>8} "
                     f"{giga(row.get('learner_flops')):>13} {giga(row['total_flops']):>10} {steps:>12} "
                     f"{times(row.get('flops_ratio_vs_uniform_learner_only')):>13} "
                     f"{times(row.get('flops_ratio_vs_uniform')):>10} {even:>10}")
    lines.append("learner: learner FLOPs (reference cached: the paper's count); all: all FLOPs (reference training and "
                 "caching charged); steps to tgt: training steps to reach uniform's final top-1 ('-': never, or the "
                 "reference, which is evaluated, not compared); ratio: uniform's FLOPs to that top-1 / the method's "
                 "(> 1: cheaper); break-even: learner runs on this pool and reference before the method's all-FLOPs "
                 "total falls below uniform's")
    return "\n".join(lines)
