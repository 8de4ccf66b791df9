"""What every cluster manifest of a recipe shares (cluster/launcher.py, cluster/kuberay.py): the
recipe's gangs checked against the GPU nodes, the shared storage that holds ``runs_dir`` (none
when it is on object storage: each node then keeps the run's mirror on its own disk, at
NODE_CACHE, cluster/storage.py), the secrets the containers take by name (never by value), and
NCCL's settings.

    gangs = recipe_gangs(cfg)
    check_gangs_fit(gangs, {"CPU": 192, "GPU": 8}, nodes=2, label="h100-80g-x8")  # ValueError naming a gang
"""
from __future__ import annotations

from pathlib import PurePosixPath

from cluster.gang import GangConfig, check_fits
from cluster.storage import is_uri

# The containers' secrets, by name: W&B's key and Ray's token (token auth on, Ray >= 2.52).
WANDB_KEY = "WANDB_API_KEY"
RAY_TOKEN = "RAY_AUTH_TOKEN"
SECRETS = (WANDB_KEY, RAY_TOKEN)
AUTH_ENV = {"RAY_AUTH_MODE": "token"}
NCCL_ENV = {"NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_IB_DISABLE": "0"}
# A run on object storage: its credentials and endpoint, by name (or the nodes' instance role),
# and where each node keeps its own mirror of the run.
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
NODE_CACHE = "/var/cache/r1pipe"
CACHE_ENV = {"R1PIPE_CACHE_DIR": NODE_CACHE}


def recipe_gangs(cfg) -> dict[str, GangConfig]:
    """{"<stage>.gang": gang} for every training stage of a recipe."""
    return {f"{name}.gang": cfg.section(name).gang for name in cfg.stages
            if getattr(cfg.section(name), "gang", None) is not None}


def check_gangs_fit(gangs: dict[str, GangConfig], node: dict[str, float], nodes: int, label: str) -> None:
    """ValueError naming the first gang that ``nodes`` nodes of ``node``'s Ray resources cannot hold."""
    if nodes < 1:
        raise ValueError(f"--nodes {nodes}: at least 1")
    for key, gang in gangs.items():
        need = gang.worker_resources()
        unknown = sorted(set(need) - set(node))
        if unknown:
            raise ValueError(f"{key}: asks for {unknown}, which {label} nodes do not have")
        try:  # the placement rule of the run-time check, on the nodes the manifest asks for
            check_fits(gang.model_copy(update={"check_fit": True}), key, [node] * nodes)
        except ValueError:
            raise ValueError(f"{key}: {gang.num_workers} workers x {need} ({gang.placement_strategy}) do not fit "
                             f"{nodes} {label} node(s) of {node}; raise --nodes or lower {key}.num_workers") from None


def shared_storage(runs_dir: str, storage: str | None) -> str | None:
    """The mount every node shares (default: ``runs_dir``'s parent); ValueError if runs_dir is not under it.
    None for runs_dir on object storage, which needs no shared mount."""
    if is_uri(runs_dir):
        if storage:
            raise ValueError(f"--storage {storage!r}: runs_dir {runs_dir!r} is on object storage, which the nodes "
                             "reach without a shared mount (each keeps its own mirror of the run); leave --storage out")
        return None
    storage = storage or str(PurePosixPath(runs_dir).parent)
    if not PurePosixPath(storage).is_absolute():
        raise ValueError(f"--storage {storage!r}: an absolute path inside the containers")
    if not PurePosixPath(runs_dir).is_relative_to(storage):
        raise ValueError(f"runs_dir {runs_dir!r} is not under the shared storage {storage!r} every node mounts; "
                         "set --storage to the mount that holds it")
    return storage
