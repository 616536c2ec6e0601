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
                     "labels": {"app.kubernetes.io/name": "flexi-jest-learner", "app.kubernetes.io/part-of": "flexi-jest"}},
        "spec": {
            "nprocPerNode": str(gpus_per_node),
            # failed pods restart (restartPolicy) and resume from the learner's checkpoints in out_dir
            "runPolicy": {"backoffLimit": 3, "cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": specs,
        },
    }
