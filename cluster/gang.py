"""Gangs: the resources and placement of a training stage's workers, checked before launch.

    gang = GangConfig(num_workers=8, use_gpu=True, placement_strategy="SPREAD")
    check_fits(gang, "pretrain.gang")      # ValueError now, not an endless wait in Ray Train

Light on purpose (no torch, no Ray Train at import): the recipe config nests it.
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class GangConfig(BaseModel):
    """Where and how wide a training stage runs."""

    model_config = ConfigDict(extra="forbid")

    num_workers: int = Field(2, ge=1)  # ranks in the gang
    use_gpu: bool = False  # one GPU per worker (gpus_per_worker)
    cpus_per_worker: float = Field(1, gt=0)  # CPUs reserved per worker
    gpus_per_worker: float = Field(1, gt=0, description="used only with use_gpu")
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="custom resources")
    #: Ray placement group strategy of the gang
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = Field(2, ge=0, description="gang restarts from the last checkpoint")
    #: torch.distributed backend; auto: nccl on GPU, else gloo
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    check_fit: bool = Field(True, description="false on autoscaling clusters that grow on demand")

    @model_validator(mode="after")
    def _backend_matches(self) -> "GangConfig":
        if self.backend == "nccl" and not self.use_gpu:
            raise ValueError("backend='nccl' needs use_gpu=true; CPU workers use gloo")
        return self

    def worker_resources(self) -> dict[str, float]:
        need = {"CPU": self.cpus_per_worker, **self.resources_per_worker}
        if self.use_gpu:
            need["GPU"] = self.gpus_per_worker
        return need

    def torch_backend(self) -> str:
        return ("nccl" if self.use_gpu else "gloo") if self.backend == "auto" else self.backend


def check_fits(gang: GangConfig, key: str, nodes: list[dict] | None = None) -> None:
    """ValueError if no placement of the gang exists on the cluster's nodes, even idle."""
    if not gang.check_fit:
        return
    if nodes is None:
        import ray
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    need = gang.worker_resources()
    per_node = [min(math.floor(node.get(k, 0) / v + 1e-9) for k, v in need.items()) for node in nodes]
    n = gang.num_workers
    fits = {"STRICT_PACK": max(per_node, default=0) >= n,
            "STRICT_SPREAD": sum(c >= 1 for c in per_node) >= n}.get(gang.placement_strategy, sum(per_node) >= n)
    if not fits:
        have = [{k: node.get(k, 0) for k in need} for node in nodes]
        raise ValueError(
            f"{key}: a gang of {n} workers x {need} ({gang.placement_strategy}) can never be placed on "
            f"this cluster (nodes: {have}); lower {key}.num_workers or the per-worker resources")


def autoscaler_max_nodes(cap: int) -> list[dict] | None:
    """The nodes an autoscaling cluster may grow to, from the cluster config its autoscaler
    publishes in the GCS (KubeRay, the cluster launcher): each node group's resources, max_count
    times (an unbounded group counts ``cap`` times). None on a fixed cluster."""
    import ray
    config = ray._private.state.state.get_cluster_config()  # Ray's own reader of that record
    if config is None or not config.node_group_configs:
        return None
    nodes = []
    for group in config.node_group_configs:
        count = cap if group.max_count == -1 else min(group.max_count, cap)
        nodes += [dict(group.resources)] * count
    return nodes


def preflight(gang: GangConfig, key: str, extra: dict[str, float] | None = None) -> str | None:
    """Before any stage runs: raise ValueError naming ``key`` when the gang (and ``extra``
    resources that must be free beside it: an RL stage's rollout workers) can never be placed,
    not even on the largest cluster the autoscaler may build; return what the run will wait for
    when it fits only once the autoscaler adds nodes; None when it fits now."""
    import ray
    alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    largest = autoscaler_max_nodes(cap=gang.num_workers + 1)
    try:
        _check_all(gang, key, alive, extra)
        return None
    except ValueError:
        if largest is None:
            raise
    try:
        _check_all(gang, key, largest, extra)
    except ValueError as err:
        raise ValueError(f"{err} (the autoscaler's largest cluster cannot hold it either)") from None
    need = {k: v * gang.num_workers for k, v in gang.worker_resources().items()}
    return (f"needs {need}{f' and {extra}' if extra else ''}, more than the cluster has now; the "
            "autoscaler can add the nodes, so the stage will wait for them")


def _check_all(gang: GangConfig, key: str, nodes: list[dict], extra: dict[str, float] | None) -> None:
    check_fits(gang, key, nodes)
    if extra:
        need = {k: v * gang.num_workers for k, v in gang.worker_resources().items()}
        total = {k: sum(n.get(k, 0) for n in nodes) for k in set(need) | set(extra)}
        short = {k: need.get(k, 0) + extra.get(k, 0) for k in total
                 if need.get(k, 0) + extra.get(k, 0) > total[k] + 1e-9}
        if short:
            raise ValueError(f"{key}: the gang ({need}) and its rollout workers ({extra}) need {short} in all, "
                             f"but the cluster has {total}")
