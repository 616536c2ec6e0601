"""The Kubernetes side, checked offline: every overlay of k8s/ rendered with `kubectl kustomize` and validated
against the Kubernetes OpenAPI schemas (kubernetes-validate); the PyTorchJob (a custom resource, outside those
schemas) by a structural check and against src/flexi_jest/pytorchjob.py; and the pipeline compiled for a cluster.

Rendering needs the git-ignored credential files (k8s/base/*.env): each test renders a copy of k8s/ in a
temporary directory with test credentials written there, never the developer's own files. Tests that render
skip, saying so, when kubectl is absent; the rest run anyway.
"""

import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from flexi_jest.pytorchjob import pytorchjob_config_map, pytorchjob_manifest

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
# Schemas shipped by kubernetes-validate (1.25 to 1.37 in 1.37.0); 1.33 is a current GKE channel and kind node.
KUBERNETES_VERSION = "1.33"
OVERLAYS = ["local", "gke"]
TEST_CREDENTIALS = {
    "minio.env": {"AWS_ACCESS_KEY_ID": "test-access-key", "AWS_SECRET_ACCESS_KEY": "test-secret-key-0123"},
    "postgres.env": {"POSTGRES_PASSWORD": "test-postgres-password"},
    "mlflow.env": {"MLFLOW_TRACKING_USERNAME": "test-mlflow-admin",
                   "MLFLOW_TRACKING_PASSWORD": "test-mlflow-password-0123"},
    "mlflow-server.env": {"MLFLOW_FLASK_SERVER_SECRET_KEY": "test-flask-secret-key"},
}
S3_SECRET = "flexi-jest-s3"
MLFLOW_SECRET = "flexi-jest-mlflow"
GPU_LABEL = ("flexi-jest/node-pool", "gpu")  # pipelines/flexi_jest_pp.py's default FLEXI_JEST_GPU_NODE_SELECTOR
GPU_TOLERATION = "nvidia.com/gpu"
GPU_STAGES = ("train-reference", "cache-reference", "train-learner")
CLUSTER_ENV_NAMES = ("FLEXI_JEST_S3_ENDPOINT", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "FLEXI_JEST_S3_SECRET",
                     "FLEXI_JEST_MLFLOW_SECRET")
TEMPLATE_INPUTS = dict(  # what k8s/pytorchjob/ holds, as pytorchjob_manifest arguments (config_json: its config.json)
    name="flexi-jest-learner", image="ghcr.io/flexi-jest/flexi-jest-cuda:0.1.0", nodes=2, gpus_per_node=8,
    node_selector={GPU_LABEL[0]: GPU_LABEL[1]}, toleration_key=GPU_TOLERATION, namespace="flexi-jest",
    secret_name=S3_SECRET, tracking_uri="http://mlflow.flexi-jest.svc.cluster.local:5000")


# ---- rendering ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not on PATH, and the manifests are rendered with `kubectl kustomize`: "
                    "install kubectl (present on this project's dev and CI machines) to run these tests")
    return found


@pytest.fixture(scope="module")
def k8s_copy(tmp_path_factory) -> Path:
    """k8s/ copied to a temporary directory, its credential files replaced by TEST_CREDENTIALS."""
    target = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, target, ignore=shutil.ignore_patterns("*.env"))
    for name, values in TEST_CREDENTIALS.items():
        (target / "base" / name).write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    return target


def kustomize(kubectl: str, directory: Path) -> list[dict]:
    done = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {directory} failed:\n{done.stderr}"
    return [document for document in yaml.safe_load_all(done.stdout) if document]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request, kubectl, k8s_copy) -> tuple[str, list[dict]]:
    return request.param, kustomize(kubectl, k8s_copy / "overlays" / request.param)


@pytest.fixture(scope="module")
def template(kubectl) -> list[dict]:
    return kustomize(kubectl, K8S / "pytorchjob")  # holds no credentials: rendered in place


def find(documents: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_specs(document: dict) -> list[dict]:
    """The pod specs of a workload (a PyTorchJob has one per replica type); [] for other kinds."""
    if document["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [document["spec"]["template"]["spec"]]
    if document["kind"] == "PyTorchJob":
        return [spec["template"]["spec"] for spec in document["spec"]["pytorchReplicaSpecs"].values()]
    return []


def all_containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def env_of(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def secret_ref(container: dict, name: str) -> tuple[str, str] | None:
    ref = env_of(container).get(name, {}).get("valueFrom", {}).get("secretKeyRef")
    return (ref["name"], ref["key"]) if ref else None


def gib(quantity: str) -> float:
    units = {"Mi": 1 / 1024, "Gi": 1, "Ti": 1024}
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi|Ti)", quantity).groups()
    return int(number) * units[unit]


# ---- every overlay ----------------------------------------------------------------------------------------


def test_overlay_validates_against_the_kubernetes_schemas(overlay):
    name, documents = overlay
    errors = []
    for document in documents:
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{document['kind']}/{document['metadata']['name']}: {'.'.join(map(str, error.path))}: "
                          f"{error.message}")
    assert not errors, f"overlay {name}:\n" + "\n".join(errors)
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in documents)
    assert kinds == sorted([
        "Namespace/flexi-jest", "ConfigMap/flexi-jest-settings", "Secret/flexi-jest-s3", "Secret/flexi-jest-postgres",
        "Secret/flexi-jest-mlflow", "Secret/flexi-jest-mlflow-server",
        "Service/minio", "StatefulSet/minio", "Job/minio-buckets", "Service/postgres", "StatefulSet/postgres",
        "Service/mlflow", "Deployment/mlflow", "ServiceAccount/flexi-jest-pipeline-runner",
        "Role/flexi-jest-pipeline-runner", "RoleBinding/flexi-jest-pipeline-runner"])
    assert {d["metadata"].get("namespace") for d in documents if d["kind"] != "Namespace"} == {"flexi-jest"}


def test_schema_validation_rejects_a_broken_manifest(overlay):
    """The validator really checks: a misspelt field and a wrong type are errors."""
    _, documents = overlay
    deployment = copy.deepcopy(find(documents, "Deployment", "mlflow"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    service = copy.deepcopy(find(documents, "Service", "minio"))
    service["spec"]["ports"][0]["port"] = "nine thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBERNETES_VERSION, strict=True)


def test_secrets_come_from_the_git_ignored_env_files(overlay):
    _, documents = overlay
    for secret_name, file_name in (("flexi-jest-s3", "minio.env"), ("flexi-jest-postgres", "postgres.env"),
                                   (MLFLOW_SECRET, "mlflow.env"), ("flexi-jest-mlflow-server", "mlflow-server.env")):
        secret = find(documents, "Secret", secret_name)  # an unhashed name: the pipeline refers to it by name
        decoded = {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
        assert decoded == TEST_CREDENTIALS[file_name]


def test_rendering_without_the_credential_files_fails(kubectl, tmp_path):
    copied = tmp_path / "k8s"
    shutil.copytree(K8S, copied, ignore=shutil.ignore_patterns("*.env"))
    done = subprocess.run([kubectl, "kustomize", str(copied / "overlays" / "local")], capture_output=True, text=True)
    assert done.returncode != 0 and "minio.env" in done.stderr


def test_every_container_has_resource_requests_and_limits(overlay, template):
    name, documents = overlay
    missing = []
    for document in documents + template:
        for pod in pod_specs(document):
            for container in all_containers(pod):
                resources = container.get("resources", {})
                for part in ("requests", "limits"):
                    lacking = {"cpu", "memory"} - set(resources.get(part, {}))
                    if lacking:
                        missing.append(f"{document['kind']}/{document['metadata']['name']} {container['name']} "
                                       f"{part}: {sorted(lacking)}")
    assert not missing, f"overlay {name}:\n" + "\n".join(missing)


def test_services_stay_off_gpu_nodes(overlay):
    name, documents = overlay
    workloads = [d for d in documents if pod_specs(d)]
    assert len(workloads) == 4  # MinIO, its bucket Job, PostgreSQL, MLflow
    for document in workloads:
        (pod,) = pod_specs(document)
        where = f"{document['kind']}/{document['metadata']['name']}"
        assert not pod.get("tolerations"), f"{where} tolerates a taint"
        assert pod.get("nodeSelector", {}).get(GPU_LABEL[0]) != GPU_LABEL[1], f"{where} selects GPU nodes"
        (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert {"key": GPU_LABEL[0], "operator": "NotIn", "values": [GPU_LABEL[1]]} in term["matchExpressions"], where
        if name == "gke":
            assert {"key": "cloud.google.com/gke-accelerator", "operator": "DoesNotExist"} in term["matchExpressions"]
        for container in all_containers(pod):
            assert "nvidia.com/gpu" not in json.dumps(container.get("resources", {})), where


def test_mlflow_server_uses_postgres_and_minio(overlay):
    _, documents = overlay
    (mlflow,) = find(documents, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    env = env_of(mlflow)
    assert mlflow["command"][:2] == ["/bin/sh", "-c"]
    assert 'exec mlflow server --app-name basic-auth "$@"' in mlflow["command"][2]  # the args follow as "$@"
    assert mlflow["image"].startswith("ghcr.io/flexi-jest/flexi-jest:"), "the project's CPU image (psycopg2, boto3)"

    postgres = find(documents, "StatefulSet", "postgres")["spec"]["template"]["spec"]["containers"][0]
    postgres_env = env_of(postgres)
    postgres_service = find(documents, "Service", "postgres")
    store = urlparse(env["MLFLOW_BACKEND_STORE_URI"]["value"])
    assert store.scheme == "postgresql"
    assert store.hostname == postgres_service["metadata"]["name"]
    assert store.port == postgres_service["spec"]["ports"][0]["port"]
    assert store.username == postgres_env["POSTGRES_USER"]["value"]
    assert store.path == "/" + postgres_env["POSTGRES_DB"]["value"]
    assert store.password == "$(POSTGRES_PASSWORD)", "the password is substituted from the Secret, never written"
    names = [item["name"] for item in mlflow["env"]]
    assert names.index("POSTGRES_PASSWORD") < names.index("MLFLOW_BACKEND_STORE_URI"), "$(VAR) needs VAR defined first"
    assert secret_ref(mlflow, "POSTGRES_PASSWORD") == secret_ref(postgres, "POSTGRES_PASSWORD") == (
        "flexi-jest-postgres", "POSTGRES_PASSWORD")

    minio = find(documents, "StatefulSet", "minio")["spec"]["template"]["spec"]["containers"][0]
    minio_service = find(documents, "Service", "minio")
    s3_port = next(p["port"] for p in minio_service["spec"]["ports"] if p["name"] == "s3")
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == f"http://{minio_service['metadata']['name']}:{s3_port}"
    assert secret_ref(mlflow,
                      "AWS_ACCESS_KEY_ID") == secret_ref(minio, "MINIO_ROOT_USER") == (S3_SECRET, "AWS_ACCESS_KEY_ID")
    assert secret_ref(mlflow, "AWS_SECRET_ACCESS_KEY") == secret_ref(minio, "MINIO_ROOT_PASSWORD") == (
        S3_SECRET, "AWS_SECRET_ACCESS_KEY")
    destination = urlparse(mlflow["args"][mlflow["args"].index("--artifacts-destination") + 1])
    buckets = env_of(find(documents, "Job", "minio-buckets")["spec"]["template"]["spec"]["containers"][0])["BUCKETS"]
    assert destination.scheme == "s3" and destination.netloc in buckets["value"].split()
    assert set(buckets["value"].split()) == {"flexi-jest", "mlflow"}


def test_mlflow_server_requires_basic_auth_with_the_secrets_credentials(overlay):
    """The server runs MLflow's basic-auth app; its admin account is the Secret's, which the pipeline's pods use."""
    _, documents = overlay
    (mlflow,) = find(documents, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    assert secret_ref(mlflow, "MLFLOW_AUTH_ADMIN_USERNAME") == (MLFLOW_SECRET, "MLFLOW_TRACKING_USERNAME")
    assert secret_ref(mlflow, "MLFLOW_AUTH_ADMIN_PASSWORD") == (MLFLOW_SECRET, "MLFLOW_TRACKING_PASSWORD")
    assert secret_ref(mlflow, "MLFLOW_FLASK_SERVER_SECRET_KEY") == ("flexi-jest-mlflow-server",
                                                                   "MLFLOW_FLASK_SERVER_SECRET_KEY")
    assert "--app-name basic-auth" in mlflow["command"][2] and "--app-name" not in mlflow["args"]
    for probe in ("readinessProbe", "livenessProbe"):  # the auth app leaves /health open for the kubelet
        assert mlflow[probe]["httpGet"]["path"] == "/health"


def run_script(script: str, arguments: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    """A container's shell script, run by sh here, with stand-ins for `mlflow` and `mc` on PATH that record
    their arguments (and, for mlflow, the auth config it would read)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("mlflow", "mc"):
        stub = bin_dir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{tmp_path}/calls"\n'
                        '[ -n "${MLFLOW_AUTH_CONFIG_PATH:-}" ] && cp "$MLFLOW_AUTH_CONFIG_PATH" '
                        f'"{tmp_path}/auth.ini"\nexit 0\n')
        stub.chmod(0o755)
    environment = {"PATH": f"{bin_dir}:/usr/bin:/bin", "TMPDIR": str(tmp_path), **env}
    return subprocess.run(["sh", "-c", script, "container", *arguments], env=environment, capture_output=True,
                          text=True, timeout=60)


def mlflow_script_env(documents: list[dict], credentials: dict[str, str]) -> tuple[str, list[str], dict[str, str]]:
    (mlflow,) = find(documents, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    env = {"MLFLOW_AUTH_ADMIN_USERNAME": credentials["MLFLOW_TRACKING_USERNAME"],
           "MLFLOW_AUTH_ADMIN_PASSWORD": credentials["MLFLOW_TRACKING_PASSWORD"],
           "MLFLOW_FLASK_SERVER_SECRET_KEY": credentials["MLFLOW_FLASK_SERVER_SECRET_KEY"],
           "POSTGRES_PASSWORD": credentials["POSTGRES_PASSWORD"],
           "MLFLOW_BACKEND_STORE_URI": f"postgresql://mlflow:{credentials['POSTGRES_PASSWORD']}@postgres:5432/mlflow",
           "AWS_ACCESS_KEY_ID": credentials["AWS_ACCESS_KEY_ID"],
           "AWS_SECRET_ACCESS_KEY": credentials["AWS_SECRET_ACCESS_KEY"]}
    return mlflow["command"][2], mlflow["command"][3:] + mlflow["args"], env


def placeholders() -> dict[str, str]:
    values = {}
    for example in (K8S / "base").glob("*.env.example"):
        values.update(line.split("=", 1) for line in example.read_text().splitlines()
                      if "=" in line and not line.startswith("#"))
    return values


REAL = {key: value for file in TEST_CREDENTIALS.values() for key, value in file.items()}


def test_mlflow_start_script_runs_the_auth_app_with_real_credentials(overlay, tmp_path):
    """With real values the script writes the auth config (users in the tracking database) and starts the server."""
    from mlflow.server.auth.config import read_auth_config

    _, documents = overlay
    script, arguments, env = mlflow_script_env(documents, {**REAL, "POSTGRES_PASSWORD": "pass%word-0123"})
    done = run_script(script, arguments, env, tmp_path)
    assert done.returncode == 0, done.stderr
    call = (tmp_path / "calls").read_text().split()
    assert call[:4] == ["mlflow", "server", "--app-name", "basic-auth"] and "--artifacts-destination" in call
    os.environ["MLFLOW_AUTH_CONFIG_PATH"] = str(tmp_path / "auth.ini")
    try:
        config = read_auth_config()  # MLflow's own reader of the file the script wrote
    finally:
        del os.environ["MLFLOW_AUTH_CONFIG_PATH"]
    assert config.database_uri == env["MLFLOW_BACKEND_STORE_URI"]  # a '%' survives configparser
    assert config.authorization_function == "mlflow.server.auth:authenticate_request_basic_auth"
    assert (tmp_path / "auth.ini").stat().st_mode & 0o077 == 0, "the config (database password) is private"


@pytest.mark.parametrize("name", ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                                  "MLFLOW_FLASK_SERVER_SECRET_KEY",
                                  "POSTGRES_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
def test_mlflow_start_script_refuses_a_change_me_placeholder(overlay, tmp_path, name):
    _, documents = overlay
    placeholder = placeholders()[name]
    assert placeholder.startswith("change-me")
    script, arguments, env = mlflow_script_env(documents, {**REAL, name: placeholder})
    done = run_script(script, arguments, env, tmp_path)
    assert done.returncode != 0 and "change-me placeholder" in done.stderr and "refusing to start MLflow" in done.stderr
    assert not (tmp_path / "calls").exists(), "mlflow was not started"


@pytest.mark.parametrize("name", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
def test_bucket_job_refuses_a_change_me_placeholder(overlay, tmp_path, name):
    _, documents = overlay
    (mc,) = find(documents, "Job", "minio-buckets")["spec"]["template"]["spec"]["containers"]
    script = mc["args"][0]
    env = {item["name"]: item["value"] for item in mc["env"] if "value" in item}
    real = {"AWS_ACCESS_KEY_ID": REAL["AWS_ACCESS_KEY_ID"], "AWS_SECRET_ACCESS_KEY": REAL["AWS_SECRET_ACCESS_KEY"]}
    (tmp_path / "real").mkdir()
    done = run_script(script, [], {**env, **real}, tmp_path / "real")
    assert done.returncode == 0, done.stderr
    assert "mc mb --ignore-existing store/mlflow" in (tmp_path / "real" / "calls").read_text()
    done = run_script(script, [], {**env, **real, name: placeholders()[name]}, tmp_path)
    assert done.returncode != 0 and f"{name} is empty or still a change-me placeholder" in done.stderr
    assert not (tmp_path / "calls").exists(), "no bucket was created with placeholder credentials"


def test_rbac_lets_the_pipeline_runner_manage_pytorchjobs(overlay):
    _, documents = overlay
    account = find(documents, "ServiceAccount", "flexi-jest-pipeline-runner")
    role = find(documents, "Role", "flexi-jest-pipeline-runner")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert {"create", "get", "list", "watch", "delete"} <= granted[("kubeflow.org", "pytorchjobs")]
    assert {"get", "list", "watch"} <= granted[("", "pods")]
    assert "get" in granted[("", "pods/log")]
    assert {"create", "get", "delete"} <= granted[("", "configmaps")]  # the job's config
    assert all("*" not in verbs for verbs in granted.values()) and ("", "secrets") not in granted
    binding = find(documents, "RoleBinding", "flexi-jest-pipeline-runner")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert {"kind": "ServiceAccount", "name": account["metadata"]["name"],
            "namespace": "flexi-jest"} in binding["subjects"]


def test_overlays_size_storage_for_their_cluster(kubectl, k8s_copy):
    claims = {}
    for name in OVERLAYS:
        documents = kustomize(kubectl, k8s_copy / "overlays" / name)
        for service in ("minio", "postgres"):
            (claim,) = find(documents, "StatefulSet", service)["spec"]["volumeClaimTemplates"]
            claims[name, service] = claim["spec"]
    for service in ("minio", "postgres"):
        assert gib(claims["local", service]["resources"]["requests"]["storage"]) <= 5
        assert gib(claims["gke", service]["resources"]["requests"]["storage"]) >= 50
        assert "storageClassName" not in claims["local", service], "local: the cluster's default StorageClass"
        assert claims["gke", service]["storageClassName"] in ("premium-rwo", "standard-rwo")


def test_images_are_pinned(overlay, template):
    _, documents = overlay
    for document in documents + template:
        for pod in pod_specs(document):
            for container in all_containers(pod):
                image = container["image"]
                tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
                assert tag and tag != "latest", f"{image} is not pinned to a tag"


def test_settings_are_the_pipelines_defaults(overlay, pipelines_module):
    _, documents = overlay
    settings = find(documents, "ConfigMap", "flexi-jest-settings")["data"]
    defaults = pipelines_module.ClusterSettings.from_env()
    assert settings == {
        **defaults.cluster_env, "FLEXI_JEST_S3_SECRET": defaults.s3_secret,
        "FLEXI_JEST_MLFLOW_SECRET": defaults.mlflow_secret,
        "FLEXI_JEST_GPU_NODE_SELECTOR": defaults.gpu_node_selector,
        "FLEXI_JEST_GPU_TOLERATION": defaults.gpu_toleration_key}
    # and the ConfigMap, given to the compiling shell as its environment, builds the pipeline of the defaults
    assert pipelines_module.ClusterSettings.from_env(settings) == defaults
    # and they name the services this overlay deploys
    for key, service, port in (("FLEXI_JEST_S3_ENDPOINT", "minio", 9000), ("MLFLOW_TRACKING_URI", "mlflow", 5000)):
        assert settings[key] == f"http://{service}.flexi-jest.svc.cluster.local:{port}"
        assert find(documents, "Service", service)["spec"]["ports"][0]["port"] == port


# ---- committed files --------------------------------------------------------------------------------------


def committable_files() -> list[str] | None:
    """Files under k8s/ that git tracks or would add (not ignored), or None outside a git work tree."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "k8s"], cwd=ROOT,
                            capture_output=True, text=True)
    return listed.stdout.split() if listed.returncode == 0 else None


def test_no_credentials_are_committed_under_k8s():
    files = committable_files()
    if files is None:  # a source tree without git: every file but the credential files k8s/.gitignore names
        assert "*.env" in (K8S / ".gitignore").read_text().split()
        files = [str(p.relative_to(ROOT)) for p in K8S.rglob("*") if p.is_file() and p.suffix != ".env"]
    assert "k8s/base/kustomization.yaml" in files
    for path in files:
        assert not path.endswith(".env"), f"{path}: credential files are never committed"
        text = (ROOT / path).read_text()
        if path.endswith((".yaml", ".yml", ".json")):  # manifests (the READMEs may name these words)
            assert not re.search(r"^\s*kind:\s*Secret\b", text, re.MULTILINE), f"{path} holds a Secret"
            assert "stringData" not in text and not re.search(r"^\s*-?\s*literals:", text, re.MULTILINE), path
        if path.endswith(".env.example"):
            values = [line.partition("=")[2] for line in text.splitlines() if "=" in line and not line.startswith("#")]
            assert values and all(value.startswith("change-me") for value in values), f"{path}: placeholders only"
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert all(set(generator) <= {"name", "envs", "options"} for generator in base["secretGenerator"])
    for generator in base["secretGenerator"]:
        for env_file in generator["envs"]:
            assert (K8S / "base" / f"{env_file}.example").is_file(), f"no example for {env_file}"
            ignored = subprocess.run(["git", "check-ignore", "-q", f"k8s/base/{env_file}"], cwd=ROOT)
            assert ignored.returncode in (0, 128), f"k8s/base/{env_file} is not git-ignored"  # 128: no git


# ---- the PyTorchJob ----------------------------------------------------------------------------------------


def pytorchjob_problems(job: dict) -> list[str]:
    """A structural check of a multi-node learner PyTorchJob: what the training operator and the pods need."""
    problems = []
    if job.get("apiVersion") != "kubeflow.org/v1" or job.get("kind") != "PyTorchJob":
        return [f"not a kubeflow.org/v1 PyTorchJob: {job.get('apiVersion')} {job.get('kind')}"]
    spec = job["spec"]
    replicas = spec.get("pytorchReplicaSpecs", {})
    if set(replicas) - {"Master", "Worker"} or replicas.get("Master", {}).get("replicas") != 1:
        problems.append(f"replica specs must be one Master and optional Workers: {json.dumps(replicas)[:200]}")
    if "Worker" in replicas and replicas["Worker"].get("replicas", 0) < 1:
        problems.append("a Worker spec with no replicas")
    gpus = int(spec["nprocPerNode"]) if str(spec.get("nprocPerNode", "")).isdigit() else None
    if gpus is None:
        problems.append(f"nprocPerNode must be a number of GPUs as a string, got {spec.get('nprocPerNode')!r}")
    for kind, replica in replicas.items():
        pod = replica.get("template", {}).get("spec", {})
        if replica.get("restartPolicy") not in ("OnFailure", "ExitCode"):
            problems.append(f"{kind}: restartPolicy {replica.get('restartPolicy')!r} does not retry")
        containers = [c for c in pod.get("containers", []) if c.get("name") == "pytorch"]
        if len(containers) != 1:
            problems.append(f"{kind}: no container named 'pytorch' (the operator's)")
            continue
        (container,) = containers
        command = container.get("command", []) + container.get("args", [])
        launcher = ["torchrun", "--no-python", "--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)"]
        if command[:4] != launcher or command[4:6] != ["flexi-jest", "train-learner"] or "--config" not in command:
            problems.append(f"{kind}: command {command} is not torchrun over `flexi-jest train-learner --config`")
        else:
            config_dir = os.path.dirname(command[command.index("--config") + 1])
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            volume = next((v for v in pod.get("volumes", []) if v["name"] == mounts.get(config_dir)), {})
            if "configMap" not in volume:
                problems.append(f"{kind}: the config directory {config_dir} is not a mounted ConfigMap")
        if container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") != gpus:
            problems.append(f"{kind}: nvidia.com/gpu limit differs from nprocPerNode {gpus}")
        if "pytorchjob-port" not in {p.get("name") for p in container.get("ports", [])}:
            problems.append(f"{kind}: no pytorchjob-port (the Master's rendezvous port)")
        keys = {secret_ref(container, name) for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        if None in keys or len({name for name, _ in keys}) != 1:
            problems.append(f"{kind}: S3 keys must come from one Secret")
        for name in ("FLEXI_JEST_S3_ENDPOINT", "MLFLOW_TRACKING_URI"):
            if not env_of(container).get(name, {}).get("value", "").startswith("http"):
                problems.append(f"{kind}: no {name}")
        if not pod.get("nodeSelector") or not any(t.get("effect") == "NoSchedule" for t in pod.get("tolerations", [])):
            problems.append(f"{kind}: not scheduled onto the GPU node pool (node selector and toleration)")
    return problems


def test_pytorchjob_template_passes_the_structural_check(template):
    config_map = find(template, "ConfigMap", "flexi-jest-learner-config")
    kubernetes_validate.validate(config_map, KUBERNETES_VERSION, strict=True)
    job = find(template, "PyTorchJob", "flexi-jest-learner")
    assert pytorchjob_problems(job) == []
    volumes = [v for r in job["spec"]["pytorchReplicaSpecs"].values() for v in r["template"]["spec"]["volumes"]]
    assert {"name": "config", "configMap": {"name": config_map["metadata"]["name"]}} in volumes
    assert job["metadata"]["namespace"] == config_map["metadata"]["namespace"] == "flexi-jest"


def test_pytorchjob_pod_templates_validate_as_kubernetes_pods(template):
    job = find(template, "PyTorchJob", "flexi-jest-learner")
    for kind, replica in job["spec"]["pytorchReplicaSpecs"].items():
        as_pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"learner-{kind.lower()}"},
                           "template": replica["template"]}
        kubernetes_validate.validate(as_pod_template, KUBERNETES_VERSION, strict=True)


BREAKAGES = {
    "no GPU limit": lambda job: job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0][
        "resources"]["limits"].pop("nvidia.com/gpu"),
    "two Masters": lambda job: job["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas=2),
    "renamed container": lambda job: job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        .update(name="learner"),
    "no torchrun": lambda job: job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        .update(command=["flexi-jest", "train-learner", "--config", "/etc/flexi-jest/config.json"]),
    "literal S3 key": lambda job: job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0][
        "env"].__setitem__(1, {"name": "AWS_SECRET_ACCESS_KEY", "value": "plain-text"}),
    "no node selector": lambda job: job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"].pop(
        "nodeSelector"),
    "nprocPerNode auto": lambda job: job["spec"].update(nprocPerNode="auto"),
    "config not mounted": lambda job: job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        ["volumeMounts"].pop(0),
    "wrong kind": lambda job: job.update(kind="TFJob"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_structural_check_rejects_a_broken_pytorchjob(breakage):
    job = pytorchjob_manifest(config_json="{}", **TEMPLATE_INPUTS)
    assert pytorchjob_problems(job) == []
    BREAKAGES[breakage](job)
    assert pytorchjob_problems(job), f"{breakage} was not caught"


def test_pytorchjob_manifest_is_the_rendered_template(template):
    config_json = (K8S / "pytorchjob" / "config.json").read_text()
    assert pytorchjob_manifest(config_json=config_json,
                               **TEMPLATE_INPUTS) == find(template, "PyTorchJob", "flexi-jest-learner")
    assert pytorchjob_config_map(TEMPLATE_INPUTS["name"], config_json, TEMPLATE_INPUTS["namespace"]) == find(
        template, "ConfigMap", "flexi-jest-learner-config")


def test_worker_replicas_are_patchable_and_match_the_function(kubectl, tmp_path):
    """The README's overlay for four nodes renders the same job as pytorchjob_manifest(nodes=4)."""
    shutil.copytree(K8S / "pytorchjob", tmp_path / "pytorchjob")
    (tmp_path / "four-nodes").mkdir()
    (tmp_path / "four-nodes" / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["../pytorchjob"],
        "patches": [{"target": {"kind": "PyTorchJob", "name": "flexi-jest-learner"},
                     "patch": "- op: replace\n  path: /spec/pytorchReplicaSpecs/Worker/replicas\n  value: 3\n"}]}))
    job = find(kustomize(kubectl, tmp_path / "four-nodes"), "PyTorchJob", "flexi-jest-learner")
    config_json = (K8S / "pytorchjob" / "config.json").read_text()
    assert job == pytorchjob_manifest(config_json=config_json, **{**TEMPLATE_INPUTS, "nodes": 4})
    assert pytorchjob_problems(job) == []


def test_pytorchjob_manifest_scales_with_nodes_and_gpus():
    job = pytorchjob_manifest(config_json="{}", **{**TEMPLATE_INPUTS, "nodes": 3, "gpus_per_node": 4})
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert job["spec"]["nprocPerNode"] == "4"
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    for replica in replicas.values():
        resources = replica["template"]["spec"]["containers"][0]["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == 4 and resources["requests"]["cpu"] == "16"
    single = pytorchjob_manifest(config_json="{}", **{**TEMPLATE_INPUTS, "nodes": 1, "gpus_per_node": 1})
    assert set(single["spec"]["pytorchReplicaSpecs"]) == {"Master"} and pytorchjob_problems(single) == []
    with pytest.raises(ValueError, match="nodes >= 1"):
        pytorchjob_manifest(config_json="{}", **{**TEMPLATE_INPUTS, "nodes": 0})
    with pytest.raises(ValueError, match="JSON object"):
        pytorchjob_manifest(config_json="[1]", **TEMPLATE_INPUTS)


def test_pytorchjob_command_and_config_are_accepted_by_the_cli(template, tmp_path, capsys):
    """The container's `flexi-jest ...` arguments, with the rendered config file, validate in the real CLI."""
    from flexi_jest.cli import main

    config_map = find(template, "ConfigMap", "flexi-jest-learner-config")
    job = find(template, "PyTorchJob", "flexi-jest-learner")
    command = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    arguments = command[command.index("flexi-jest") + 1:]
    config_path = arguments[arguments.index("--config") + 1]
    local = tmp_path / Path(config_path).name
    local.write_text(config_map["data"][Path(config_path).name])
    arguments[arguments.index("--config") + 1] = str(local)
    assert main(arguments + ["--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == "joint" and printed["pool"].startswith("s3://flexi-jest/")


def test_pytorchjob_module_does_not_import_the_kubernetes_client():
    probe = "import sys, flexi_jest.pytorchjob; assert 'kubernetes' not in sys.modules, 'kubernetes imported'"
    subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True)


# ---- the pipeline compiled for a cluster -------------------------------------------------------------------


@pytest.fixture
def pipelines_module(monkeypatch):
    """pipelines.flexi_jest_pp, with none of CLUSTER_ENV_NAMES in the environment: the pipelines for a cluster
    are built under k8s/base's defaults unless a test gives an environment of its own (ClusterSettings.from_env)."""
    for name in CLUSTER_ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    import pipelines.flexi_jest_pp as module
    return module


def compiled(pipeline, tmp_path) -> tuple[dict, dict]:
    from kfp import compiler

    path = tmp_path / f"{pipeline.name}.yaml"
    compiler.Compiler().compile(pipeline, package_path=str(path))
    documents = list(yaml.safe_load_all(path.read_text()))
    executors = documents[0]["deploymentSpec"]["executors"]
    platform = documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(documents) > 1 else {}
    return executors, platform


@pytest.mark.parametrize("stage", ["make_data", "train_learner"])
def test_cluster_pipeline_mounts_the_s3_secret_and_schedules_gpu_stages(stage, pipelines_module, tmp_path):
    executors, platform = compiled(pipelines_module.cluster_pipeline(stage), tmp_path)
    containers = {name: spec["container"] for name, spec in executors.items() if "container" in spec}
    assert len(containers) >= 5 and set(platform) == set(containers), "every container task, and only those"
    expected_secret = [{"secretName": "flexi-jest-s3", "optional": False,
                        "secretNameParameter": {"runtimeValue": {"constant": "flexi-jest-s3"}},
                        "keyToEnv": [{"secretKey": "AWS_ACCESS_KEY_ID", "envVar": "AWS_ACCESS_KEY_ID"},
                                     {"secretKey": "AWS_SECRET_ACCESS_KEY", "envVar": "AWS_SECRET_ACCESS_KEY"}]},
                       {"secretName": MLFLOW_SECRET, "optional": False,
                        "secretNameParameter": {"runtimeValue": {"constant": MLFLOW_SECRET}},
                        "keyToEnv": [{"secretKey": "MLFLOW_TRACKING_USERNAME", "envVar": "MLFLOW_TRACKING_USERNAME"},
                                     {"secretKey": "MLFLOW_TRACKING_PASSWORD", "envVar": "MLFLOW_TRACKING_PASSWORD"}]}]
    gpu_executors = [name for name in containers if re.fullmatch(rf"exec-({'|'.join(GPU_STAGES)})(-\d+)?", name)]
    assert "exec-train-learner" in gpu_executors
    for name, container in containers.items():
        kubernetes = platform[name]
        assert kubernetes["secretAsEnv"] == expected_secret, name
        env = {item["name"]: item["value"] for item in container.get("env", [])}
        assert env == {"FLEXI_JEST_S3_ENDPOINT": "http://minio.flexi-jest.svc.cluster.local:9000",
                       "MLFLOW_S3_ENDPOINT_URL": "http://minio.flexi-jest.svc.cluster.local:9000",
                       "MLFLOW_TRACKING_URI": "http://mlflow.flexi-jest.svc.cluster.local:5000"}, name
        assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(container.get("env", [])), "keys only through the Secret"
        assert "MLFLOW_TRACKING_PASSWORD" not in json.dumps(container.get("env", [])), "only through the Secret"
        if name in gpu_executors:
            assert kubernetes["nodeSelector"] == {"labels": {GPU_LABEL[0]: GPU_LABEL[1]}}, name
            assert kubernetes["tolerations"] == [{"key": GPU_TOLERATION, "operator": "Exists", "effect": "NoSchedule"}]
            assert "accelerator" in container["resources"], name
        else:
            assert "nodeSelector" not in kubernetes and "tolerations" not in kubernetes, name
            assert "accelerator" not in container.get("resources", {}), name


def test_local_pipeline_has_no_kubernetes_settings(pipelines_module, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXI_JEST_S3_SECRET", "team-s3")  # the compile-time environment is the cluster's only
    for stage in pipelines_module.STAGES:
        executors, platform = compiled(pipelines_module.local_pipeline(stage), tmp_path)
        assert platform == {}, stage
        assert all("env" not in spec.get("container", {}) for spec in executors.values()), stage


def test_cluster_settings_are_read_at_compile_time(pipelines_module, tmp_path, monkeypatch):
    module = pipelines_module
    monkeypatch.setenv("FLEXI_JEST_S3_SECRET", "team-s3")
    monkeypatch.setenv("FLEXI_JEST_S3_ENDPOINT", "https://s3.example.com")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example.com")
    executors, platform = compiled(module.flexi_jest_pp, tmp_path)  # the module's name for the cluster pipeline
    env = {item["name"]: item["value"] for item in executors["exec-train-learner"]["container"]["env"]}
    assert env == {"FLEXI_JEST_S3_ENDPOINT": "https://s3.example.com", "MLFLOW_S3_ENDPOINT_URL": "https://s3.example.com",
                   "MLFLOW_TRACKING_URI": "https://mlflow.example.com"}
    assert platform["exec-train-learner"]["secretAsEnv"][0]["secretName"] == "team-s3"
    # another environment, another pipeline: nothing was kept from the first (no module state)
    executors, platform = compiled(module.cluster_pipeline(environ={}), tmp_path)
    assert platform["exec-train-learner"]["secretAsEnv"][0]["secretName"] == S3_SECRET
    # a local store exported in the shell is no use to a pod: the in-cluster server stays
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////home/me/mlflow.db")
    assert module.ClusterSettings.from_env().tracking_uri == "http://mlflow.flexi-jest.svc.cluster.local:5000"


@pytest.mark.slow  # reason: starts a real `mlflow server` (basic-auth app) and waits for it, 20-60 s
def test_mlflow_start_script_serves_only_authenticated_requests(tmp_path, monkeypatch):
    """The Deployment's start script (read from k8s/base/mlflow.yaml, no kubectl needed) run with sh against
    this environment's mlflow, with a SQLite store in place of PostgreSQL: /health is open, the API needs the
    Secret's user, and MLflow's client logs in with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."""
    import base64
    import time
    import urllib.error
    import urllib.request

    import mlflow

    from test_storage import free_port

    deployment = next(d for d in yaml.safe_load_all((K8S / "base" / "mlflow.yaml").read_text())
                      if d and d["kind"] == "Deployment")
    script = deployment["spec"]["template"]["spec"]["containers"][0]["command"][2]
    port = free_port()
    user, password = REAL["MLFLOW_TRACKING_USERNAME"], REAL["MLFLOW_TRACKING_PASSWORD"]
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "TMPDIR": str(tmp_path), "HOME": str(tmp_path),
           "MLFLOW_AUTH_ADMIN_USERNAME": user, "MLFLOW_AUTH_ADMIN_PASSWORD": password,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": REAL["MLFLOW_FLASK_SERVER_SECRET_KEY"],
           "POSTGRES_PASSWORD": "unused-here", "AWS_ACCESS_KEY_ID": "unused-here",
           "AWS_SECRET_ACCESS_KEY": "unused-here",
           "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no huey workers (tests/conftest.py)
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(["sh", "-c", script, "mlflow-server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)  # its own process group: uvicorn and workers stop with it
    url = f"http://127.0.0.1:{port}"

    def get(path: str, credentials: tuple[str, str] | None = None) -> int:
        request = urllib.request.Request(url + path)
        if credentials:
            token = base64.b64encode(":".join(credentials).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            return urllib.request.urlopen(request, timeout=60).status
        except urllib.error.HTTPError as error:
            return error.code

    try:
        deadline = time.time() + 120
        while True:
            try:
                if get("/health") == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "mlflow server did not answer /health within 120 s"
            time.sleep(1)
        search = "/api/2.0/mlflow/experiments/search?max_results=1"
        assert get(search) == 401
        assert get(search, (user, "wrong-password-0123")) == 401
        assert get(search, (user, password)) == 200
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        client = mlflow.MlflowClient(tracking_uri=url)
        experiment = client.create_experiment("auth-check")
        assert client.get_experiment(experiment).name == "auth-check"
    finally:
        import signal
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever of the group is left (uvicorn's workers)
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.wait(timeout=30)
        log.close()
