"""Training gangs: a Ray Train TorchTrainer (V2) of DeepSpeed workers with elastic checkpoints.

Every training stage (pretrain, SFT, DPO, RL) runs through ``run_gang``: it takes the stage's
worker function, ``fn(payload, hooks) -> summary``, importable on the workers (a module-level
function of training/ or rl/), and a JSON-able payload.

One machine:  run_gang(training.sft.worker, payload, GangConfig(num_workers=2), checkpoints=..., work=...)
              run_pretrain(cfg, GangConfig(num_workers=2), paths, seed=0)   # CPU, gloo
A cluster:    the same with GangConfig(num_workers=8, use_gpu=True)         # NCCL
              (checkpoints on a filesystem every node mounts, or the run on object storage:
              each rank's part of a checkpoint goes up, and a node that lacks one fetches it)

The gang starts only once every worker is placed; a gang the cluster can never hold is
a ValueError before launch (Ray Train would retry forever, NOTES.md). Checkpoints live in
the stage folder, which is also Ray Train's experiment folder (RunConfig storage_path /
name), and are reported with NO_UPLOAD: Ray registers them where the workers wrote them,
``FailureConfig(max_failures)`` restarts a broken gang from the newest one, and a rerun
of the whole pipeline finds them there too. ``training.pretrain`` picks the newest intact
checkpoint, falls back past a damaged one and converts to a universal checkpoint when the
number of workers changed (training/loop.py). A worker function that raises NonFiniteLoss
ends the run without a restart (a restart would replay the same non-finite steps).

Lost nodes. A gang whose node died restarts on the nodes left when they still hold it (Ray
Train, within ``max_failures``). When they no longer do, Ray Train would wait for ever for a
placement; instead, its controller gives up once a restarting gang could not be placed within
Ray's worker-group start timeout (``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``, 60 s by default:
how long a lost node has to come back), and this driver looks at the alive nodes again: a
gang they still hold (only busy) is launched again at the same size; an elastic gang
(``gang.min_workers``) is launched again on as many workers as they hold, not fewer than
min_workers, and resumes from its last checkpoint through a universal one (each such shrink
counts as one of ``max_failures``); otherwise the stage fails with ``GangLostNodes``, which
says min_workers does not allow it. This fallback lives in our driver, not in Ray Train
2.60's own elasticity (``ScalingConfig(num_workers=(min, max))``, which TorchTrainer takes):
that one starts a gang on fewer workers whenever the cluster is merely busy and grows it
later (a restart mid-stage), waits without end below min_workers instead of failing, and
counts a node's capacity without regard to STRICT_SPREAD; ours launches the full gang
whenever the nodes can hold it and shrinks only when they cannot.

Fault injection (tests): ``fault="pretrain:worker1:step7"`` makes the worker of rank 1 of the
gang named ``pretrain`` exit once 7 steps are done, once per stage run (a marker file keeps
the restarted gang from dying again at the same step); ``...=hang`` makes it hang there instead.
The marker names the node the worker ran on, so a test can kill that node.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import ray
from ray.train import (Checkpoint, CheckpointConfig, CheckpointUploadMode, ControllerError, FailureConfig,
                       RunConfig, ScalingConfig)
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster import storage
from cluster.gang import GangConfig, alive_nodes, autoscaler_max_nodes, launch_size, workers_that_fit
from training.checkpoint import TRAINER
from training.config import PretrainConfig
from training.distributed import barrier, file_view
from training.loop import Hooks, NonFiniteLoss
from training.pretrain import Paths


# ----------------------------------------------------------------------------- inside a worker


def fault_hook(fault: str | None, rank: int, marker_dir: Path, name: str | None = None) -> Callable:
    """The on_step hook for "STAGE:worker<rank>:step<n>[=hang]": this worker exits (or hangs,
    so a test can kill the whole pipeline mid-stage) once n steps are done, once per stage run.
    With a gang name, only a fault whose STAGE is that name fires."""
    point, _, mode = (fault or "").partition("=")
    parts = point.split(":")
    if len(parts) != 3 or parts[1] != f"worker{rank}" or not parts[2].startswith("step"):
        return lambda step, model: None
    if name is not None and parts[0] != name:
        return lambda step, model: None
    at, marker = int(parts[2][4:]), Path(marker_dir) / f"fault-{point.replace(':', '_')}"

    def hook(step: int, model) -> None:
        if step != at or storage.localize(marker).exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        # a restarted gang passes this step, on any node
        marker.write_text(f"fired on node {ray.get_runtime_context().get_node_id()}\n")
        storage.push(marker)
        sys.stdout.flush()
        sys.stderr.flush()
        while mode == "hang":
            time.sleep(1)
        os._exit(137)
    return hook


def _report_checkpoint(path: Path, metrics: dict) -> None:
    if storage.remote_of(path) is not None:  # the same answer on every rank: they adopted the mirrors
        _upload_checkpoint(Path(path))
    plain = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
    ray.train.report(plain, checkpoint=Checkpoint.from_directory(str(path)), checkpoint_dir_name=path.name,
                     checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def _upload_checkpoint(path: Path) -> None:
    """A run on object storage: a checkpoint's files go up, trainer.json (its commit record)
    last. Rank 0 puts what its node has; then every other rank adds what only its node has (a
    ZeRO shard, its RNG state: on a cluster whose nodes do not share the run's folder; nothing
    where they do); then rank 0 commits."""
    rank = ray.train.get_context().get_world_rank()
    if rank == 0:
        storage.push_parts(path, TRAINER)
    barrier()
    if _VIEW["of"].leader and 0 not in _VIEW["of"].peers:  # a copy of the folder rank 0 does not see
        storage.push_missing(path, TRAINER)
    barrier()
    if rank == 0:
        storage.push_record(path, TRAINER)


_VIEW: dict = {}  # this gang worker's view of the checkpoint folder (training.distributed.file_view)


def _gang_worker(config: dict) -> None:
    rank = ray.train.get_context().get_world_rank()
    node = ray.get_runtime_context().get_node_id()
    # a node that does not share the run's folder: the run's mirrors, the committed checkpoints
    # and the inputs the payload names, from the object store (nothing to do where it shares it)
    storage.adopt(config["mirrors"])
    _VIEW["of"] = file_view(Path(config["checkpoints"]))  # which ranks share this node's copy of the run
    if _VIEW["of"].leader:
        storage.localize_committed(Path(config["checkpoints"]), TRAINER, "step_")
        storage.localize_all(config["payload"], skip=(config["checkpoints"],))
    barrier()
    events: Queue = config["events"]
    # metrics are sent without waiting (ordered per caller); the summary below waits
    hooks = Hooks(on_metrics=lambda metrics, step: events.actor.put_nowait.remote(("metrics", metrics)),
                  on_checkpoint=_report_checkpoint, on_work_file=storage.push,
                  on_step=fault_hook(config["fault"], rank, Path(config["marker_dir"]), config["name"]))
    events.actor.put_nowait.remote(("node", (rank, node)))
    start = ray.train.get_checkpoint()
    if rank == 0 and start is not None:
        print(f"[{config['name']}] Ray's latest registered checkpoint: {start.path}", flush=True)
    try:
        summary = config["fn"](config["payload"], hooks)
    except NonFiniteLoss as err:
        # returned, not raised: Ray would restart the gang into the same non-finite steps
        if rank == 0:
            events.put(("abort", str(err)))
        return
    if rank == 0 and node != config["driver_node"]:
        for out in config["outputs"]:  # what rank 0 wrote, for the stage's task on the driver's node
            storage.push(Path(out))
    if rank == 0:
        events.put(("summary", summary))
    atexit.register(_exit_without_teardown)


def _exit_without_teardown() -> None:
    """torch 2.13's gloo can abort in C++ teardown at interpreter exit (NOTES.md); exiting here,
    with results and checkpoints written, skips that teardown. Not called from the train
    function itself: Ray Train counts a worker whose process ends before its function
    returns as failed and restarts the gang (measured). Ray 2.60 ends workers with ray.kill,
    so this runs only where a worker process exits on its own."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ----------------------------------------------------------------------------- the driver side


class GangLostNodes(RuntimeError):
    """The gang lost nodes for good and may not resume on the workers the nodes left hold."""


def run_gang(fn: Callable[[dict, Hooks], dict], payload: dict, gang: GangConfig, *, checkpoints: Path,
             work: Path, on_metrics: Callable[[dict], None] = lambda m: None, fault: str | None = None,
             name: str = "train", key: str | None = None, outputs: tuple[Path, ...] = ()) -> dict:
    """Run fn(payload, hooks) on every worker of a gang; blocks until done, returns rank 0's summary
    with ``gang_workers`` and ``gang_nodes`` (how many workers, on how many nodes, finished it).

    checkpoints is the stage's checkpoint folder (Ray Train's experiment folder); work holds the
    fault markers; ``outputs`` are the folders rank 0 writes (a run on object storage whose
    nodes do not share its folder: they come to this node through the object store). Raises
    NonFiniteLoss when the run aborted on non-finite losses, Ray's TrainingFailedError when the gang failed more than gang.max_failures times, and GangLostNodes
    when the nodes left after a loss cannot hold gang.min_workers (module docstring).
    """
    key = key or f"{name}.gang"
    workers, shrinks = launch_size(gang, key), 0
    if workers < gang.num_workers:
        print(f"[{name}] the cluster's nodes hold {workers} of the gang's {gang.num_workers} workers; "
              f"{key}.min_workers={gang.min_workers} lets it start on {workers}", flush=True)
    while True:
        try:
            outcome = _fit_gang(fn, payload, gang, workers, gang.max_failures - shrinks, checkpoints=checkpoints,
                                work=work, on_metrics=on_metrics, fault=fault, name=name, outputs=outputs)
            break
        except ControllerError as err:
            if not isinstance(err.controller_failure, (WorkerGroupStartupTimeoutError, WorkerGroupStartupFailedError)):
                raise
            workers, shrinks = _after_failed_placement(gang, key, name, workers, shrinks, err)
    if outcome.get("nodes", {}).get(0) not in (None, ray.get_runtime_context().get_node_id()):
        for out in outputs:  # rank 0 wrote them on another node and uploaded them: its copy wins
            storage.localize(out, replace=True)
    if "abort" in outcome:
        raise NonFiniteLoss(outcome["abort"])
    if "summary" not in outcome:
        raise RuntimeError(f"the {name} gang finished without a summary from rank 0")
    nodes = outcome.get("nodes", {})
    return {**outcome["summary"], "gang_workers": workers, "gang_nodes": len(set(nodes.values()))}


def _after_failed_placement(gang: GangConfig, key: str, name: str, workers: int, shrinks: int,
                            err: ControllerError) -> tuple[int, int]:
    """Ray could not place the gang of ``workers`` in time: the size to launch it again at, and
    the shrinks so far; GangLostNodes when it may not shrink to what the nodes left hold."""
    held = _still_held(gang, workers)
    if held >= workers:
        print(f"[{name}] the gang of {workers} could not be placed in time; the cluster's nodes still "
              "hold it (busy, not lost), so it is launched again", flush=True)
        return workers, shrinks
    if held < gang.fewest_workers() or shrinks >= gang.max_failures:
        raise GangLostNodes(_lost_nodes_message(gang, key, name, workers, held, shrinks)) from err
    print(f"[{name}] nodes lost: the cluster's nodes now hold {held} of the gang's {workers} workers; "
          f"{key}.min_workers={gang.min_workers} allows it, so it resumes on {held} from its last "
          "checkpoint", flush=True)
    return held, shrinks + 1


def _still_held(gang: GangConfig, workers: int) -> int:
    """How many of the gang's ``workers`` the cluster can still hold: the alive nodes' count, or all
    of them where it may grow (check_fit off, or an autoscaler that can add the nodes: it replaces
    a lost node, so the gang waits for it rather than shrinking)."""
    if not gang.check_fit:
        return workers
    same = gang.model_copy(update={"num_workers": workers})
    held = workers_that_fit(same, alive_nodes())
    largest = autoscaler_max_nodes(cap=workers + 1) if held < workers else None
    return workers if largest is not None and workers_that_fit(same, largest) >= workers else held


def _lost_nodes_message(gang: GangConfig, key: str, name: str, workers: int, held: int, shrinks: int) -> str:
    lost = (f"the {name} gang lost nodes: the cluster's alive nodes hold {held} of its {workers} workers "
            f"({gang.worker_resources()} each, {gang.placement_strategy})")
    if gang.min_workers is None:
        return (f"{lost}, and {key}.min_workers is not set, so the gang may not resume on fewer workers; set "
                f"{key}.min_workers to let it resume from its last checkpoint on fewer, or bring the nodes back "
                "and run the stage again")
    if held < gang.min_workers:
        return (f"{lost}, fewer than {key}.min_workers={gang.min_workers} allows; lower {key}.min_workers or "
                "bring the nodes back and run the stage again")
    return f"{lost}; it has shrunk {shrinks} time(s) already, its {key}.max_failures={gang.max_failures}"


def _fit_gang(fn: Callable[[dict, Hooks], dict], payload: dict, gang: GangConfig, workers: int, max_failures: int,
              *, checkpoints: Path, work: Path, on_metrics: Callable[[dict], None], fault: str | None,
              name: str, outputs: tuple[Path, ...]) -> dict:
    """One TorchTrainer of ``workers`` workers to its end; the outcome of _fit_while_draining."""
    # on the driver's node, like Ray Train's controller: a worker node may die under the gang
    driver_node = ray.get_runtime_context().get_node_id()
    here = NodeAffinitySchedulingStrategy(driver_node, soft=False)
    events = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    config = {"fn": fn, "payload": payload, "fault": fault, "events": events, "name": name,
              "marker_dir": str(work), "mirrors": storage.carried(), "checkpoints": str(checkpoints),
              "driver_node": driver_node, "outputs": [str(o) for o in outputs]}
    trainer = TorchTrainer(
        _gang_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gang.use_gpu,
                                     resources_per_worker=gang.worker_resources(),
                                     placement_strategy=gang.placement_strategy),
        torch_config=TorchConfig(backend=gang.torch_backend()),
        run_config=RunConfig(name=Path(checkpoints).name, storage_path=str(Path(checkpoints).parent),
                             # a gang Ray cannot place within its start timeout comes back here
                             failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=0),
                             checkpoint_config=CheckpointConfig(num_to_keep=None)))
    try:
        return _fit_while_draining(trainer, events, on_metrics)
    finally:
        ray.kill(events.actor)


def run_pretrain(cfg: PretrainConfig, gang: GangConfig, paths: Paths, *, seed: int,
                 on_metrics: Callable[[dict], None] = lambda m: None, fault: str | None = None,
                 key: str = "pretrain.gang") -> dict:
    """Pretrain on a gang (training.pretrain.worker); see run_gang."""
    from training import pretrain
    payload = {"config": cfg.model_dump(mode="json"), "seed": seed,
               "paths": {k: [str(f) for f in v] if isinstance(v, list) else None if v is None else str(v)
                         for k, v in vars(paths).items()}}
    return run_gang(pretrain.worker, payload, gang, checkpoints=paths.checkpoints, work=paths.work,
                    on_metrics=on_metrics, fault=fault, name="pretrain", key=key, outputs=(paths.out,))


def _fit_while_draining(trainer: TorchTrainer, events: Queue, on_metrics: Callable[[dict], None]) -> dict:
    """trainer.fit() in a thread while this one forwards rank 0's metrics as they come."""
    done: dict = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            done["error"] = err
        done["finished"] = True

    thread = threading.Thread(target=fit, name="train-fit", daemon=True)
    thread.start()
    outcome: dict = {}
    while not done.get("finished") or not events.empty():
        try:
            kind, value = events.get(timeout=0.5)
        except Empty:
            continue
        if kind == "metrics":
            on_metrics(value)
        elif kind == "node":  # where each rank runs; a restarted gang's ranks overwrite theirs
            outcome.setdefault("nodes", {})[value[0]] = value[1]
        else:
            outcome[kind] = value
    thread.join()
    if "error" in done:
        raise done["error"]
    return outcome
