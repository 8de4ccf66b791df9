"""Gangs: the resources and placement of a training stage's workers, checked before launch.

    gang = GangConfig(num_workers=8, use_gpu=True, placement_strategy="SPREAD")
    check_fits(gang, "pretrain.gang")      # ValueError now, not an endless wait in Ray Train
    launch_size(gang, "pretrain.gang")     # 8, or fewer (>= gang.min_workers) on a cluster that lost nodes

``min_workers`` makes a gang elastic downwards: the fewest workers the stage may run on. A gang
launches with as many workers as the cluster's alive nodes can hold, up to ``num_workers`` (the
nodes' capacity, not what is free now: a busy cluster is waited for, and so is one whose
autoscaler can add the nodes; a smaller fixed one is not), and a gang that lost a node for good
resumes on fewer (cluster/train.py). That is what a user who sets it expects on a rerun too: after
the driver died with the node, the rerun goes on from the stage's checkpoints on the nodes left,
where editing the recipe's gang then would change the stage's fingerprint and start it over.
Unset, the gang runs on exactly ``num_workers`` or fails. ``check_fits`` keeps asking for the full
gang (the launcher sizes a new cluster for it).

Light on purpose (no torch, no Ray Train at import): the recipe config nests it.
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from training.config import Strict


class GangConfig(Strict):
    """Where and how wide a training stage runs."""

    num_workers: int = Field(2, ge=1, description="ranks in the gang")
    use_gpu: bool = Field(False, description="one GPU per worker (gpus_per_worker)")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker")
    gpus_per_worker: float = Field(1, gt=0, description="used only with use_gpu")
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="custom resources")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field("PACK", description=(
        "Ray placement group strategy of the gang"))
    max_failures: int = Field(2, ge=0, description="gang restarts from the last checkpoint")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description=(
        "torch.distributed backend; auto: nccl on GPU, else gloo"))
    check_fit: bool = Field(True, description="false on autoscaling clusters that grow on demand")
    min_workers: int | None = Field(None, ge=1, description=(
        "fewest workers the stage may run on: it launches on as many as the cluster's nodes hold, up to "
        "num_workers, and a gang that lost a node for good resumes on fewer from a universal checkpoint "
        "(the global batch must split over each worker count it may run on); unset: exactly num_workers"))

    @model_validator(mode="after")
    def _consistent(self) -> "GangConfig":
        if self.backend == "nccl" and not self.use_gpu:
            raise ValueError("backend='nccl' needs use_gpu=true; CPU workers use gloo")
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"min_workers={self.min_workers} is more than num_workers={self.num_workers}; "
                             "min_workers is the fewest workers the gang may shrink to")
        return self

    def fewest_workers(self) -> int:
        return self.num_workers if self.min_workers is None else self.min_workers

    def worker_resources(self) -> dict[str, float]:
        need = {"CPU": self.cpus_per_worker, **self.resources_per_worker}
        if self.use_gpu:
            need["GPU"] = self.gpus_per_worker
        return need

    def torch_backend(self) -> str:
        return ("nccl" if self.use_gpu else "gloo") if self.backend == "auto" else self.backend


def alive_nodes() -> list[dict]:
    """The resources of the cluster's alive nodes (their capacity, not what is free now)."""
    import ray
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def summed(resources: list[dict[str, float]]) -> dict[str, float]:
    """Resource amounts added up: over nodes (a cluster's total), or over the needs of things that
    must be placed side by side (a gang, its RL actor groups)."""
    out: dict[str, float] = {}
    for each in resources:
        for k, v in each.items():
            out[k] = out.get(k, 0) + v
    return out


def shortfall(need: dict[str, float], have: dict[str, float]) -> dict[str, float]:
    """The resources of ``need`` that ``have`` cannot cover, with the amounts needed: the one totals
    rule of the gang's preflight (beside its actor groups) and of an actor group (beside its gang)."""
    return {k: v for k, v in need.items() if v > have.get(k, 0) + 1e-9}


def workers_that_fit(gang: GangConfig, nodes: list[dict]) -> int:
    """The most workers of the gang, up to num_workers, that one placement on idle ``nodes`` holds."""
    need = gang.worker_resources()
    per_node = [min(math.floor(node.get(k, 0) / v + 1e-9) for k, v in need.items()) for node in nodes]
    most = {"STRICT_PACK": max(per_node, default=0),
            "STRICT_SPREAD": sum(c >= 1 for c in per_node)}.get(gang.placement_strategy, sum(per_node))
    return min(most, gang.num_workers)


def check_fits(gang: GangConfig, key: str, nodes: list[dict] | None = None, workers: int | None = None) -> None:
    """ValueError if no placement of the gang (of ``workers``, by default num_workers) exists on
    the cluster's nodes, even idle."""
    if not gang.check_fit:
        return
    nodes = alive_nodes() if nodes is None else nodes
    n = gang.num_workers if workers is None else workers
    if workers_that_fit(gang.model_copy(update={"num_workers": n, "min_workers": None}), nodes) < n:
        raise ValueError(_never_placed(gang, key, nodes, n) + f"; lower {key}.num_workers or the per-worker resources")


def _never_placed(gang: GangConfig, key: str, nodes: list[dict], n: int) -> str:
    need = gang.worker_resources()
    have = [{k: node.get(k, 0) for k in need} for node in nodes]
    return (f"{key}: a gang of {n} workers x {need} ({gang.placement_strategy}) can never be placed on "
            f"this cluster (nodes: {have})")


def launch_size(gang: GangConfig, key: str, nodes: list[dict] | None = None) -> int:
    """How many workers to launch: num_workers when the cluster's alive nodes (or the cluster its
    autoscaler may build) hold them, else, for an elastic gang, the most the alive nodes hold down
    to min_workers. ValueError naming ``key`` when not even min_workers fit. Given ``nodes``, only
    those count."""
    if not gang.check_fit:
        return gang.num_workers
    live, nodes = nodes is None, alive_nodes() if nodes is None else nodes
    most = workers_that_fit(gang, nodes)
    if most < gang.num_workers and live:
        largest = autoscaler_max_nodes(cap=gang.num_workers + 1)
        if largest is not None and workers_that_fit(gang, largest) == gang.num_workers:
            return gang.num_workers  # Ray Train waits while the autoscaler adds the nodes
    if most >= gang.fewest_workers():
        return most
    if gang.min_workers is None:
        check_fits(gang, key, nodes)
    raise ValueError(_never_placed(gang, key, nodes, gang.num_workers) + f": they hold {most}, fewer than "
                     f"{key}.min_workers={gang.min_workers}")


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
    resources that must be free beside it: an RL stage's actor groups) can never be placed, not
    even on the largest cluster the autoscaler may build; return what the run will wait for
    when it fits only once the autoscaler adds nodes, or, for an elastic gang that the nodes hold
    only in part (min_workers or more), on how many workers it will run; None when it fits now."""
    alive = alive_nodes()
    largest = autoscaler_max_nodes(cap=gang.num_workers + 1)
    try:
        _check_all(gang, key, alive, extra)
        return None
    except ValueError as err:
        if largest is None:
            return _smaller(gang, key, alive, extra, err)
    try:
        _check_all(gang, key, largest, extra)
    except ValueError as err:
        raise ValueError(f"{err} (the autoscaler's largest cluster cannot hold it either)") from None
    need = {k: v * gang.num_workers for k, v in gang.worker_resources().items()}
    return (f"needs {need}{f' and {extra}' if extra else ''}, more than the cluster has now; the "
            "autoscaler can add the nodes, so the stage will wait for them")


def _smaller(gang: GangConfig, key: str, nodes: list[dict], extra: dict[str, float] | None,
             full: ValueError) -> str:
    """An elastic gang's size on nodes that cannot hold num_workers, as preflight's line; the
    full gang's error when not even min_workers fit."""
    n = workers_that_fit(gang, nodes)
    if n < gang.fewest_workers():
        raise full
    try:
        _check_all(gang.model_copy(update={"num_workers": n}), key, nodes, extra)
    except ValueError:
        raise full from None
    return (f"will not wait for more than {n} of its {gang.num_workers} workers: the cluster's nodes hold "
            f"no more, and {key}.min_workers={gang.min_workers} lets it run on {n}")


def _check_all(gang: GangConfig, key: str, nodes: list[dict], extra: dict[str, float] | None) -> None:
    check_fits(gang, key, nodes)
    if extra:
        need = {k: v * gang.num_workers for k, v in gang.worker_resources().items()}
        total = summed(nodes)
        short = shortfall(summed([need, extra]), total)
        if short:
            raise ValueError(f"{key}: the gang ({need}) and its RL actor groups ({extra}) need {short} in all, "
                             f"but the cluster has { {k: total.get(k, 0) for k in short} }")
