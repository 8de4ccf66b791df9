"""The Ray cluster launcher's config, generated from a recipe (examples in cluster/manifests/).

    r1pipe cluster manifest recipes/cluster.yaml --target launcher --preset h100-80g-x8 --nodes 2 \\
        --image ghcr.io/you/r1pipe:0.1.0 > cluster.yaml
    ray up cluster.yaml && ray attach cluster.yaml   # then: r1pipe run recipes/cluster.yaml

The GPU worker group is ``nodes`` nodes of the preset (8 GPUs each); the head is a CPU node that
runs the driver. Every training stage's gang is checked against the GPU nodes first: one that
cannot be held is an error naming the gang. The containers get the shared storage mounted where
the recipe's ``runs_dir`` lies (for ``runs_dir`` on object storage: the node's own disk for the
run's mirror, and the AWS_* settings by name), NCCL settings, and the names (never the values) of the secrets they
take from the launching environment: WANDB_API_KEY and Ray's token (RAY_AUTH_TOKEN, with token
auth on). The dashboard listens on the head's loopback only; reach it through `ray dashboard`.
"""
from __future__ import annotations

from cluster.deploy import (AUTH_ENV, CACHE_ENV, NCCL_ENV, NODE_CACHE, S3_ENV, SECRETS, check_gangs_fit,
                            shared_storage)
from cluster.gang import GangConfig
from training.plan import GpuPreset

# Instance types per preset, on the clouds the launcher drives (A100 80 GB: p4de / a2-ultragpu).
INSTANCE_TYPES = {
    "aws": {"a100-80g-x8": "p4de.24xlarge", "h100-80g-x8": "p5.48xlarge", "head": "m6i.8xlarge"},
    "gcp": {"a100-80g-x8": "a2-ultragpu-8g", "h100-80g-x8": "a3-highgpu-8g", "head": "n2-standard-32"},
}
HEAD_CPUS = 32


def _docker(image: str, storage: str | None) -> dict:
    """Shared storage mounted where runs_dir lies; or, for runs_dir on object storage, the node's
    own disk at the run's mirror (NODE_CACHE) and the object store's settings by name."""
    extra = {k: None for k in S3_ENV} | CACHE_ENV if storage is None else {}
    env = [f"-e {k}={v}" for k, v in NCCL_ENV.items()] + [f"-e {k}" for k in SECRETS] + \
          [f"-e {k}={v}" for k, v in AUTH_ENV.items()] + \
          [f"-e {k}" if v is None else f"-e {k}={v}" for k, v in extra.items()]  # secrets by name only
    mount = storage or NODE_CACHE
    return {"image": image, "container_name": "r1pipe", "pull_before_run": True,
            "run_options": ["--ipc=host", "--ulimit memlock=-1", "--ulimit stack=67108864",
                            f"-v {mount}:{mount}", *env]}


def launcher_config(*, name: str, gangs: dict[str, GangConfig], runs_dir: str, preset: GpuPreset, nodes: int,
                    image: str, provider: str = "aws", region: str = "us-west-2",
                    storage: str | None = None) -> dict:
    """The Ray cluster launcher's config (``ray up``) for a recipe's gangs on ``nodes`` GPU nodes."""
    if provider not in INSTANCE_TYPES:
        raise ValueError(f"--provider {provider!r}: one of {sorted(INSTANCE_TYPES)}")
    check_gangs_fit(gangs, {"CPU": preset.cpus_per_node, "GPU": preset.gpus_per_node}, nodes, preset.name)
    storage = shared_storage(runs_dir, storage)
    types = INSTANCE_TYPES[provider]
    placement = {"aws": {"InstanceType": types[preset.name]}, "gcp": {"machineType": types[preset.name]}}[provider]
    head = {"aws": {"InstanceType": types["head"]}, "gcp": {"machineType": types["head"]}}[provider]
    return {
        "cluster_name": name,
        "max_workers": nodes,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10,
        "provider": {"type": provider, "region": region, **({"availability_zone": f"{region}a"} if provider == "aws" else {}),
                     "cache_stopped_nodes": False},
        "docker": _docker(image, storage),
        "head_node_type": "head",
        "available_node_types": {
            # the driver and the data stages' coordination; no GPU, and no stage work scheduled on it
            "head": {"node_config": head, "resources": {"CPU": 0}, "min_workers": 0, "max_workers": 0},
            f"gpu-{preset.name}": {"node_config": placement, "min_workers": nodes, "max_workers": nodes,
                                   "resources": {"CPU": preset.cpus_per_node, "GPU": preset.gpus_per_node}},
        },
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [".venv/**", "runs/**", "**/.git/**"],
        "rsync_filter": [".gitignore"],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [
            "ray stop",
            "ray start --head --port=6379 --dashboard-host=127.0.0.1 --object-manager-port=8076 "
            "--autoscaling-config=~/ray_bootstrap_config.yaml --disable-usage-stats",
        ],
        "worker_start_ray_commands": [
            "ray stop",
            "ray start --address=$RAY_HEAD_IP:6379 --object-manager-port=8076 --disable-usage-stats",
        ],
    }
