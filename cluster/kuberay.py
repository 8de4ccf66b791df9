"""A KubeRay ``RayJob`` (ray.io/v1, with its RayCluster spec), generated from a recipe (examples in
cluster/manifests/; the schema its tests hold it to is cluster/manifests/schema/rayjob-v1.schema.json).

    r1pipe cluster manifest recipes/cluster.yaml --target kuberay --preset h100-80g-x8 --nodes 2 \\
        --image ghcr.io/you/r1pipe:0.1.0 --out rayjob.yaml
    kubectl create secret generic r1pipe-ray-auth --from-literal=auth_token="$(openssl rand -base64 32)"
    kubectl create secret generic r1pipe-wandb --from-literal=api_key="$WANDB_API_KEY"
    kubectl apply -f rayjob.yaml

The head pod is a CPU pod that runs the driver (``r1pipe run <recipe> --address auto``) and takes
no stage work (``num-cpus: 0``); the GPU worker group is ``nodes`` pods of the preset, one per node,
each holding the node's GPUs and most of its CPUs and memory (the rest is left to the kubelet and
daemon sets). Every training stage's gang is checked against those pods' Ray resources first: one
they cannot hold is an error naming the gang. Every pod mounts the shared storage (a
ReadWriteMany PersistentVolumeClaim) where the recipe's ``runs_dir`` lies; for ``runs_dir`` on
object storage there is no claim: each pod keeps the run's mirror in an emptyDir of its own and
takes the AWS_* settings from a Secret (``--s3-secret``, every key as a variable). Every pod gets NCCL's settings,
Ray's token and W&B's key from Kubernetes Secrets (by name: no value is written), and workers get a
memory-backed /dev/shm for NCCL. The submitter pod that runs ``ray job submit`` gets the token too.
"""
from __future__ import annotations

import json
import re
import shlex
from importlib.metadata import version
from pathlib import PurePosixPath

from cluster.deploy import (AUTH_ENV, CACHE_ENV, NCCL_ENV, NODE_CACHE, RAY_TOKEN, WANDB_KEY, check_gangs_fit,
                            shared_storage)
from cluster.gang import GangConfig
from training.plan import GiB, GpuPreset

IMAGE_WORKDIR = "/opt/r1pipe"  # where cluster/manifests/Dockerfile installs r1pipe and its recipes/
HEAD_RAY_START = {"num-cpus": "0"}  # the driver's pod: no stage work is scheduled on it
HEAD_POD = {"cpu": "8", "memory": "32Gi"}
SUBMITTER_POD = {"cpu": "1", "memory": "1Gi"}
# What a GPU node keeps for the kubelet, the system and daemon sets (NVIDIA's device plugin, CNI, logging)
NODE_RESERVE_CPUS = 8
NODE_MEMORY_SHARE = 0.9
SHM_SHARE = 0.25  # of the pod's memory, for NCCL and Ray's object store in /dev/shm
TTL_AFTER_FINISHED_S = 3600  # the finished cluster stays an hour for `kubectl logs`, then goes
MAX_RAYJOB_NAME = 47  # KubeRay's limit: the RayCluster it creates appends 6 characters (53 max)
SHARED_VOLUME = "shared"
CACHE_VOLUME = "run-mirror"  # runs_dir on object storage: the pod's own copy of the run


def worker_pod_resources(preset: GpuPreset) -> dict[str, str]:
    """The GPU pod's requests (= limits): the node's GPUs, its CPUs and memory less the reserve."""
    cpus = preset.cpus_per_node - NODE_RESERVE_CPUS
    memory_gi = int(preset.host_bytes * NODE_MEMORY_SHARE // GiB)
    return {"cpu": str(cpus), "memory": f"{memory_gi}Gi", "nvidia.com/gpu": str(preset.gpus_per_node)}


def job_name(recipe_name: str) -> str:
    """The recipe's name as a RayJob name (a DNS-1035 label of at most 47 characters)."""
    name = re.sub(r"[^a-z0-9-]+", "-", recipe_name.lower())
    name = re.sub(r"^[^a-z]+", "", name)[:MAX_RAYJOB_NAME].rstrip("-")
    if not name:
        raise ValueError(f"name {recipe_name!r}: a RayJob needs a name with a letter; set the recipe's name")
    return name


def _env(auth_secret: str, wandb_secret: str | None) -> list[dict]:
    env = [{"name": k, "value": v} for k, v in {**NCCL_ENV, **AUTH_ENV}.items()]
    env.append({"name": RAY_TOKEN, "valueFrom": {"secretKeyRef": {"name": auth_secret, "key": "auth_token"}}})
    if wandb_secret:
        env.append({"name": WANDB_KEY, "valueFrom": {"secretKeyRef": {"name": wandb_secret, "key": "api_key"}}})
    return env


def _pod(container: dict, volumes: list[dict] | None = None, **spec) -> dict:
    return {"metadata": {"labels": {"app.kubernetes.io/name": "r1pipe"}},
            "spec": {"containers": [container], **({"volumes": volumes} if volumes else {}), **spec}}


def _container(name: str, image: str, resources: dict, env: list[dict], mounts: list[dict] | None = None,
               env_from: list[dict] | None = None) -> dict:
    return {"name": name, "image": image, "env": env, **({"envFrom": env_from} if env_from else {}),
            "resources": {"requests": dict(resources), "limits": dict(resources)},
            **({"volumeMounts": mounts} if mounts else {})}


def _check_names(**names: str | None) -> None:
    for key, value in names.items():
        if value is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", value):
            raise ValueError(f"--{key.replace('_', '-')} {value!r}: a Kubernetes object name "
                             "(lower case letters, digits, '-', '.')")


def entrypoint(recipe_path: str, overrides: list[str]) -> str:
    """The driver's command: the recipe as the image (or the shared storage) holds it, with the same
    ``--set`` overrides the gangs were checked with."""
    sets = [a for item in overrides for a in ("--set", item)]
    return shlex.join(["r1pipe", "run", recipe_path, "--address", "auto", *sets])


def _worker_group(preset: GpuPreset, nodes: int, image: str, env: list[dict], shared: list[dict],
                  mounts: list[dict], env_from: list[dict] | None) -> dict:
    """``nodes`` GPU pods of the preset, one per node, with a memory-backed /dev/shm for NCCL."""
    resources = worker_pod_resources(preset)
    shm_gi = int(int(resources["memory"].removesuffix("Gi")) * SHM_SHARE)
    gpu = _container("ray-worker", image, resources, env, [*mounts, {"name": "dshm", "mountPath": "/dev/shm"}],
                     env_from)
    volumes = [*shared, {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gi}Gi"}}]
    return {"groupName": f"gpu-{preset.name}",
            "replicas": nodes, "minReplicas": nodes, "maxReplicas": nodes, "numOfHosts": 1,
            "rayStartParams": {},  # CPUs and GPUs: KubeRay reads them from the pod's limits
            "template": _pod(gpu, volumes, tolerations=[
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])}


def rayjob(*, name: str, recipe_path: str, overrides: list[str], gangs: dict[str, GangConfig], runs_dir: str,
           preset: GpuPreset, nodes: int, image: str, storage: str | None = None, pvc: str = "r1pipe-shared",
           auth_secret: str = "r1pipe-ray-auth", wandb_secret: str | None = "r1pipe-wandb",
           s3_secret: str = "r1pipe-s3") -> dict:
    """A RayJob that runs a recipe on ``nodes`` GPU pods of ``preset``, deleted when the job ends."""
    check_gangs_fit(gangs, {"CPU": int(worker_pod_resources(preset)["cpu"]), "GPU": preset.gpus_per_node},
                    nodes, preset.name)
    storage = shared_storage(runs_dir, storage)
    if not PurePosixPath(recipe_path).is_absolute():
        raise ValueError(f"--recipe-path {recipe_path!r}: an absolute path inside the image or on the shared storage")
    _check_names(pvc=pvc, auth_secret=auth_secret, wandb_secret=wandb_secret, s3_secret=s3_secret)
    env = _env(auth_secret, wandb_secret)
    if storage is None:  # runs_dir on object storage: each pod's own mirror, the store's settings from a Secret
        env += [{"name": k, "value": v} for k, v in CACHE_ENV.items()]
        shared = [{"name": CACHE_VOLUME, "emptyDir": {}}]
        mounts = [{"name": CACHE_VOLUME, "mountPath": NODE_CACHE}]
    else:
        shared = [{"name": SHARED_VOLUME, "persistentVolumeClaim": {"claimName": pvc}}]
        mounts = [{"name": SHARED_VOLUME, "mountPath": storage}]
    env_from = [{"secretRef": {"name": s3_secret}}] if storage is None else None
    head = _container("ray-head", image, HEAD_POD, env, mounts, env_from)
    # the pod that runs `ray job submit` against the head's dashboard needs only Ray's token
    submitter = _container("ray-job-submitter", image, SUBMITTER_POD,
                           [e for e in env if e["name"] in (*AUTH_ENV, RAY_TOKEN)])
    label = job_name(name)
    return json.loads(json.dumps({  # no shared objects: YAML would write them as anchors
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": label, "labels": {"app.kubernetes.io/name": "r1pipe", "r1pipe/recipe": label}},
        "spec": {
            "entrypoint": entrypoint(recipe_path, overrides),
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": TTL_AFTER_FINISHED_S,
            "backoffLimit": 0,  # a rerun resumes from the run store: `kubectl delete` it and apply again
            "rayClusterSpec": {
                "rayVersion": version("ray"),
                "enableInTreeAutoscaling": False,
                "headGroupSpec": {"rayStartParams": dict(HEAD_RAY_START), "template": _pod(head, shared)},
                "workerGroupSpecs": [_worker_group(preset, nodes, image, env, shared, mounts, env_from)],
            },
            "submitterPodTemplate": _pod(submitter, restartPolicy="Never"),
        },
    }))
