"""The multi-node learner as a Kubeflow PyTorchJob (kubeflow.org/v1, training operator v1.7 or later): the
manifest as plain dicts, for the pipeline to create with the kubernetes client. k8s/pytorchjob/ is the same
manifest as a kustomize directory; tests/test_k8s.py renders it and checks that the two agree.

    from kubernetes import client, config
    config.load_incluster_config()
    client.CoreV1Api().create_namespaced_config_map(namespace, pytorchjob_config_map(name, config_json, namespace))
    client.CustomObjectsApi().create_namespaced_custom_object(
        "kubeflow.org", "v1", namespace, "pytorchjobs",
        pytorchjob_manifest(name, config_json, GPU_IMAGE, nodes=4, gpus_per_node=8, ...))

One pod per node: a Master and nodes - 1 Workers, each with gpus_per_node GPUs. Each pod runs torchrun, which
starts one `flexi-jest train-learner` process per GPU. The operator gives every pod MASTER_ADDR / MASTER_PORT (the
Master's service) and PET_NNODES / PET_NODE_RANK / PET_NPROC_PER_NODE (from nprocPerNode), which torchrun reads;
torchrun then sets RANK / LOCAL_RANK / WORLD_SIZE per process (flexi_jest.distributed reads those). Without
torchrun a pod would get the operator's RANK = node index with WORLD_SIZE = nodes * GPUs, right only for one GPU
per node.

No kubernetes import here: building a manifest needs none, and the module stays importable anywhere.
"""

import json
from typing import Any

CONFIG_DIR = "/etc/flexi-jest"  # the ConfigMap's mount; the config file is CONFIG_DIR/CONFIG_FILE
CONFIG_FILE = "config.json"
MASTER_PORT = 23456  # the operator's default rendezvous port, named pytorchjob-port
USER_ID = 10001  # the images' non-root user (images/Dockerfile*)
DEFAULT_S3_ENDPOINT = "http://minio.flexi-jest.svc.cluster.local:9000"  # k8s/base


def config_map_name(name: str) -> str:
    return f"{name}-config"


def pytorchjob_config_map(name: str, config_json: str, namespace: str) -> dict[str, Any]:
    """The ConfigMap holding the learner's config (a TrainLearnerConfig as JSON), mounted by every pod of the job."""
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": config_map_name(name), "namespace": namespace},
            "data": {CONFIG_FILE: config_json}}


def pytorchjob_manifest(name: str, config_json: str, image: str, nodes: int, gpus_per_node: int,
                        node_selector: dict[str, str], toleration_key: str, namespace: str, secret_name: str,
                        tracking_uri: str, *, profile: str = "paper", s3_endpoint: str = DEFAULT_S3_ENDPOINT,
                        cpus_per_gpu: int = 4, memory_gib_per_gpu: int = 24) -> dict[str, Any]:
    """The PyTorchJob training the learner on `nodes` nodes of `gpus_per_node` GPUs. Its config is the ConfigMap
    of pytorchjob_config_map(name, config_json, namespace), created first (config_json is only checked here);
    S3 keys come from the Secret `secret_name` (keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)."""
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"a PyTorchJob needs nodes >= 1 and gpus_per_node >= 1 (got {nodes}, {gpus_per_node})")
    if not isinstance(json.loads(config_json), dict):
        raise ValueError("config_json must be a JSON object of train-learner config fields")
    secret_env = [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key}}}
                  for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    container = {
        "name": "pytorch",  # the name the operator looks for
        "image": image,
        "command": ["torchrun", "--no-python", "--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)",
                    "flexi-jest", "train-learner", "--config", f"{CONFIG_DIR}/{CONFIG_FILE}", "--profile", profile],
        "env": secret_env + [{"name": "FLEXI_JEST_S3_ENDPOINT", "value": s3_endpoint},
                             {"name": "MLFLOW_S3_ENDPOINT_URL", "value": s3_endpoint},
                             {"name": "MLFLOW_TRACKING_URI", "value": tracking_uri}],
        "ports": [{"name": "pytorchjob-port", "containerPort": MASTER_PORT}],
        "resources": {
            "requests": {"cpu": str(cpus_per_gpu * gpus_per_node), "memory": f"{memory_gib_per_gpu * gpus_per_node}Gi"},
            "limits": {"cpu": str(cpus_per_gpu * gpus_per_node), "memory": f"{memory_gib_per_gpu * gpus_per_node}Gi",
                       "nvidia.com/gpu": gpus_per_node},
        },
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    pod = {
        "spec": {
            "nodeSelector": dict(node_selector),
            "tolerations": [{"key": toleration_key, "operator": "Exists", "effect": "NoSchedule"}],
            "securityContext": {"runAsNonRoot": True, "runAsUser": USER_ID, "runAsGroup": USER_ID, "fsGroup": USER_ID},
            "containers": [container],
            "volumes": [{"name": "config", "configMap": {"name": config_map_name(name)}},
                        # NCCL and the data loaders' worker processes share tensors through /dev/shm
                        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{2 * gpus_per_node}Gi"}}],
        },
    }

    def replicas(count: int) -> dict[str, Any]:
        return {"replicas": count, "restartPolicy": "OnFailure", "template": json.loads(json.dumps(pod))}

    specs = {"Master": replicas(1)}
    if nodes > 1:
        specs["Worker"] = replicas(nodes - 1)
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/name": "flexi-jest-learner",
                                "app.kubernetes.io/part-of": "flexi-jest"}},
        "spec": {
            "nprocPerNode": str(gpus_per_node),
            # failed pods restart (restartPolicy) and resume from the learner's checkpoints in out_dir
            "runPolicy": {"backoffLimit": 3, "cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": specs,
        },
    }


# ---- launching it from a pipeline task ---------------------------------------------------------------------


class JobFailed(RuntimeError):
    """The PyTorchJob ended in Failed, or did not finish in time."""


def job_name(out_dir: str) -> str:
    """A stable, valid name per learner output: a retried pipeline task finds the job it started (and the job's
    checkpoints in out_dir), instead of starting a second one."""
    import hashlib
    return f"flexi-jest-learner-{hashlib.sha256(out_dir.encode()).hexdigest()[:12]}"


def job_state(job: dict[str, Any]) -> tuple[str, str]:
    """(state, message) of a PyTorchJob from its newest true condition: Created, Running, Restarting,
    Succeeded, Failed; ("Pending", "") before the operator has written any status."""
    conditions = [c for c in job.get("status", {}).get("conditions", []) if c.get("status") == "True"]
    if not conditions:
        return "Pending", ""
    last = conditions[-1]
    return last["type"], last.get("message", "")


def current_namespace(default: str = "kubeflow") -> str:
    """The namespace this pod runs in (the pipeline's), where the job and its ConfigMap are created."""
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    try:
        with open(path) as f:
            return f.read().strip() or default
    except OSError:
        return default


def run_pytorchjob(config_json: str, out_dir: str, *, nodes: int, gpus_per_node: int, image: str,
                   node_selector: dict[str, str], toleration_key: str, secret_name: str, tracking_uri: str,
                   s3_endpoint: str = DEFAULT_S3_ENDPOINT, namespace: str | None = None, profile: str = "paper",
                   poll_seconds: float = 30.0, timeout_seconds: float = 7 * 24 * 3600, apis=None,
                   sleep=None) -> dict[str, Any]:
    """Train the learner as a PyTorchJob and wait for it; returns its result.json (a TrainResult as a dict).

    out_dir (in the config) must be object storage (s3://...): the pods share nothing else. A job already
    running under this out_dir's name is waited for; one that failed is replaced, and the new one resumes
    from the checkpoints in out_dir. apis: (CoreV1Api, CustomObjectsApi), default the in-cluster client.
    """
    import time

    from flexi_jest import storage

    if nodes < 2:
        raise ValueError(f"run_pytorchjob is for nodes >= 2 (got {nodes}); one node trains in the pipeline task")
    if not storage.is_s3(out_dir):
        raise ValueError(f"multi-node training writes to {out_dir!r}, a local path the job's pods cannot share; "
                         "set the pipeline's storage_root to s3://bucket/prefix")
    if apis is None:
        from kubernetes import client, config
        config.load_incluster_config()
        apis = (client.CoreV1Api(), client.CustomObjectsApi())
    core, custom = apis
    sleep = sleep or time.sleep
    namespace = namespace or current_namespace()
    name = job_name(out_dir)
    group = ("kubeflow.org", "v1", namespace, "pytorchjobs")
    manifest = pytorchjob_manifest(name, config_json, image, nodes, gpus_per_node, node_selector, toleration_key,
                                   namespace, secret_name, tracking_uri, profile=profile, s3_endpoint=s3_endpoint)

    existing = _get_or_none(lambda: custom.get_namespaced_custom_object(*group, name))
    if existing is not None and job_state(existing)[0] == "Failed":
        custom.delete_namespaced_custom_object(*group, name)
        existing = None
    if existing is None:
        config_map = pytorchjob_config_map(name, config_json, namespace)
        if _get_or_none(lambda: core.read_namespaced_config_map(config_map_name(name), namespace)) is None:
            core.create_namespaced_config_map(namespace, config_map)
        else:
            core.replace_namespaced_config_map(config_map_name(name), namespace, config_map)
        custom.create_namespaced_custom_object(*group, manifest)
        print(f"created PyTorchJob {namespace}/{name}: {nodes} nodes x {gpus_per_node} GPUs", flush=True)
    else:
        print(f"waiting for the existing PyTorchJob {namespace}/{name}", flush=True)

    waited, last = 0.0, None
    while True:
        state, message = job_state(custom.get_namespaced_custom_object(*group, name))
        if state != last:
            print(f"PyTorchJob {name}: {state} {message}".rstrip(), flush=True)
            last = state
        if state == "Succeeded":
            break
        if state == "Failed":
            raise JobFailed(f"PyTorchJob {namespace}/{name} failed: {message or 'no message'}; "
                            f"see `kubectl -n {namespace} logs -l training.kubeflow.org/job-name={name}`")
        if waited >= timeout_seconds:
            raise JobFailed(f"PyTorchJob {namespace}/{name} did not finish in {timeout_seconds:.0f} s (state {state})")
        sleep(poll_seconds)
        waited += poll_seconds
    result_uri = storage.join(out_dir, "result.json")
    if not storage.exists(result_uri):
        raise JobFailed(f"PyTorchJob {name} succeeded but wrote no {result_uri}")
    return json.loads(storage.read_bytes(result_uri))


def _get_or_none(read):
    """read() or None when the object does not exist (HTTP 404)."""
    try:
        return read()
    except Exception as exc:  # kubernetes.client.ApiException, without importing it here
        if getattr(exc, "status", None) == 404:
            return None
        raise
