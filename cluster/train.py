"""Training gangs: a Ray Train TorchTrainer (V2) of DeepSpeed workers with elastic checkpoints.

Every training stage (pretrain, SFT, DPO, RL) runs through ``run_gang``: it takes the stage's
worker function, ``fn(payload, hooks) -> summary``, importable on the workers (a module-level
function of training/ or rl/), and a JSON-able payload.

One machine:  run_gang(training.sft.worker, payload, GangConfig(num_workers=2), checkpoints=..., work=...)
              run_pretrain(cfg, GangConfig(num_workers=2), paths, seed=0)   # CPU, gloo
A cluster:    the same with GangConfig(num_workers=8, use_gpu=True)         # NCCL
              (checkpoints must then be on a filesystem every node mounts)

The gang starts only once every worker is placed; a gang the cluster can never hold is
a ValueError before launch (Ray Train would retry forever, NOTES.md). Checkpoints live in
the stage folder, which is also Ray Train's experiment folder (RunConfig storage_path /
name), and are reported with NO_UPLOAD: Ray registers them where the workers wrote them,
``FailureConfig(max_failures)`` restarts a broken gang from the newest one, and a rerun
of the whole pipeline finds them there too. ``training.pretrain`` picks the newest intact
checkpoint, falls back past a damaged one and converts to a universal checkpoint when the
number of workers changed (training/loop.py). A worker function that raises NonFiniteLoss
ends the run without a restart (a restart would replay the same non-finite steps).

Fault injection (tests): ``fault="pretrain:worker1:step7"`` makes the worker of rank 1 of the
gang named ``pretrain`` exit once 7 steps are done, once per stage run (a marker file keeps
the restarted gang from dying again at the same step); ``...=hang`` makes it hang there instead.
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
from ray.train import (Checkpoint, CheckpointConfig, CheckpointUploadMode, FailureConfig, RunConfig,
                       ScalingConfig)
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.queue import Empty, Queue

from cluster.gang import GangConfig, check_fits
from training.config import PretrainConfig
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
        if step != at or marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("fired\n")  # a restarted gang passes this step
        sys.stdout.flush()
        sys.stderr.flush()
        while mode == "hang":
            time.sleep(1)
        os._exit(137)
    return hook


def _report_checkpoint(path: Path, metrics: dict) -> None:
    plain = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
    ray.train.report(plain, checkpoint=Checkpoint.from_directory(str(path)), checkpoint_dir_name=path.name,
                     checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def _gang_worker(config: dict) -> None:
    rank = ray.train.get_context().get_world_rank()
    events: Queue = config["events"]
    # metrics are sent without waiting (ordered per caller); the summary below waits
    hooks = Hooks(on_metrics=lambda metrics, step: events.actor.put_nowait.remote(("metrics", metrics)),
                  on_checkpoint=_report_checkpoint,
                  on_step=fault_hook(config["fault"], rank, Path(config["marker_dir"]), config["name"]))
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


def run_gang(fn: Callable[[dict, Hooks], dict], payload: dict, gang: GangConfig, *, checkpoints: Path,
             work: Path, on_metrics: Callable[[dict], None] = lambda m: None, fault: str | None = None,
             name: str = "train", key: str | None = None) -> dict:
    """Run fn(payload, hooks) on every worker of a gang; blocks until done, returns rank 0's summary.

    checkpoints is the stage's checkpoint folder (Ray Train's experiment folder); work holds the
    fault markers. Raises NonFiniteLoss when the run aborted on non-finite losses, and Ray's
    TrainingFailedError when the gang failed more than gang.max_failures times.
    """
    check_fits(gang, key or f"{name}.gang")
    events = Queue(actor_options={"num_cpus": 0})
    config = {"fn": fn, "payload": payload, "fault": fault, "events": events, "name": name,
              "marker_dir": str(work)}
    trainer = TorchTrainer(
        _gang_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=gang.num_workers, use_gpu=gang.use_gpu,
                                     resources_per_worker=gang.worker_resources(),
                                     placement_strategy=gang.placement_strategy),
        torch_config=TorchConfig(backend=gang.torch_backend()),
        run_config=RunConfig(name=Path(checkpoints).name, storage_path=str(Path(checkpoints).parent),
                             failure_config=FailureConfig(max_failures=gang.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=None)))
    try:
        outcome = _fit_while_draining(trainer, events, on_metrics)
    finally:
        ray.kill(events.actor)
    if "abort" in outcome:
        raise NonFiniteLoss(outcome["abort"])
    if "summary" not in outcome:
        raise RuntimeError(f"the {name} gang finished without a summary from rank 0")
    return outcome["summary"]


def run_pretrain(cfg: PretrainConfig, gang: GangConfig, paths: Paths, *, seed: int,
                 on_metrics: Callable[[dict], None] = lambda m: None, fault: str | None = None,
                 key: str = "pretrain.gang") -> dict:
    """Pretrain on a gang (training.pretrain.worker); see run_gang."""
    from training import pretrain
    payload = {"config": cfg.model_dump(mode="json"), "seed": seed,
               "paths": {k: [str(f) for f in v] if isinstance(v, list) else None if v is None else str(v)
                         for k, v in vars(paths).items()}}
    return run_gang(pretrain.worker, payload, gang, checkpoints=paths.checkpoints, work=paths.work,
                    on_metrics=on_metrics, fault=fault, name="pretrain", key=key)


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
        else:
            outcome[kind] = value
    thread.join()
    if "error" in done:
        raise done["error"]
    return outcome
