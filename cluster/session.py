"""Connecting to Ray: an embedded local cluster on loopback, or an existing one.

Local (one machine):   connect(RaySettings())            -> ray.init() on 127.0.0.2
Cluster:               connect(RaySettings(address="auto" | "ray://head:10001"))
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

# Ray Train's controller polls every 2 s by default, which makes each report
# block that long (NOTES.md). Set before ray.init so workers inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@dataclass(frozen=True)
class RaySettings:
    address: str | None = None
    num_cpus: int | None = None
    include_dashboard: bool = False
    node_ip_address: str = "127.0.0.2"


def connect(settings: RaySettings) -> dict:
    """Start or join a Ray cluster once per process; returns its resources."""
    if not ray.is_initialized():
        env = {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S":
                            os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]}}
        if settings.address:
            ray.init(address=settings.address, runtime_env=env, log_to_driver=True)
        else:
            if not settings.include_dashboard:
                env["worker_process_setup_hook"] = "cluster.session.quiet_local_workers"
            # "local": a new cluster even where `ray start` (or another run's test cluster) left
            # one registered on this machine, which a bare ray.init() would join; RAY_ADDRESS,
            # set in a Ray job's driver, still wins
            ray.init(address=None if os.environ.get("RAY_ADDRESS") else "local",
                     num_cpus=settings.num_cpus, include_dashboard=settings.include_dashboard,
                     _node_ip_address=settings.node_ip_address, runtime_env=env,
                     configure_logging=True, logging_level="WARNING")
        ray.data.DataContext.get_current().enable_progress_bars = False
    return ray.cluster_resources()


def quiet_local_workers() -> None:
    """Worker setup hook of the embedded local cluster (no dashboard, so no State API).

    Ray Train's placement-group cleaner asks the State API every second whether the controller
    lives, and warns each time it cannot; locally the cluster dies with the driver, so there is
    nothing for it to clean. Ray Train's workers also log every report's whole metrics dict at
    INFO; the stage's own log line and W&B carry those metrics.
    """
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner"
                      ).setLevel(logging.ERROR)
    context = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution",
                           "context.py")
    logging.getLogger(context).setLevel(logging.WARNING)  # that module logs as getLogger(__file__)


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


def run_task(fn, *args, resources: dict | None = None, poll=None, interval: float = 0.5, here: bool = False):
    """Run ``fn(*args)`` as one Ray task and wait for it; the task is never retried.

    A stage's side effects (files) are not idempotent mid-way, so a crashed
    worker must surface as a failed stage that the runner resumes, not as a
    silent re-execution. ``here``: on this (the driver's) node, where the driver keeps a run on
    object storage in its local mirror (the stage's remote work fetches what it needs,
    cluster/storage.py), with ``resources`` reserved when this node has them (a cluster's head
    often has no CPUs to schedule: the task then runs there unreserved). ``poll()``, if given, is
    called every ``interval`` seconds while the task runs (the CLI's progress line reads the
    stage's files there).
    """
    opts = {"num_cpus": 0, "max_retries": 0, **(resources or {})}
    if here:
        node = ray.get_runtime_context().get_node_id()
        have = next((n["Resources"] for n in ray.nodes() if n["NodeID"] == node), {})
        names = {"num_cpus": "CPU", "num_gpus": "GPU"}
        wanted = {names[k]: v for k, v in (resources or {}).items() if k in names}
        wanted.update((resources or {}).get("resources", {}))
        if not all(have.get(k, 0) >= v for k, v in wanted.items()):
            opts = {"num_cpus": 0, "max_retries": 0}
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
    ref = ray.remote(fn).options(**opts).remote(*args)
    try:
        if poll is not None:
            while not ray.wait([ref], timeout=interval)[0]:
                poll()
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        raise err.as_instanceof_cause() from None


def error_cause(err: BaseException) -> BaseException:
    """The user's exception inside a Ray task's error (its message without Ray's traceback)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) and isinstance(err, ray.exceptions.RayError) else err
