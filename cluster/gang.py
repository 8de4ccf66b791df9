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
