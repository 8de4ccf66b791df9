"""The training loop every stage shares: resume, steps, non-finite steps, checkpoints, the model.

Pretrain, SFT, DPO and RL differ in their data and their loss; everything else lives here.
A stage describes itself as a ``Job`` and hands it to ``train``:

    loop = train(cfg, job, checkpoints=Path(...), hooks=hooks, make_model=lambda: Transformer(mc),
                 micro_batch=4, global_batch=32)
    loop.save_model(out / "model", tokenizer, model_max_length=512)   # every rank calls it
    summary = loop.summary()

Per step: ``job.next_step()`` (this rank's micro-batches, drawn from the same global batch on
every rank), ``engine.train_step(batches, job.loss_fn)`` (a non-finite loss skips the step on
every rank; ``max_nonfinite`` in a row abort with ``NonFiniteLoss``), ``job.after_step``,
metrics; every ``eval_every`` steps ``job.evaluate``; every ``checkpoint.every`` steps and at the
end a checkpoint (training/checkpoint.py) holding the engine, each rank's RNG states and the
job's data position. On start the newest intact checkpoint is found (a damaged one is skipped,
falling back to the one before), converted to a universal checkpoint when the number of
workers changed, and loaded; the steps after it replay exactly.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn

from training import checkpoint as ckpt
from training.config import TrainConfig
from training.distributed import (FileView, all_gather, all_sum, barrier, broadcast, file_view, on_leaders,
                                  rank_world)
from training.engine import Engine, LossFn, StepResult, ensure_process_group, needs_universal, to_universal
from training.export import save_model
from training.model import Transformer
from training.tokenizer import save_tokenizer

log = logging.getLogger("r1pipe.train")


class NonFiniteLoss(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is kept."""


@dataclass
class Hooks:
    """How the caller sees the run: cluster/ turns these into Ray Train reports."""
    on_metrics: Callable[[dict, int], None] = lambda metrics, step: None      # rank 0 only
    on_checkpoint: Callable[[Path, dict], None] = lambda path, metrics: None  # every rank
    on_step: Callable[[int, torch.nn.Module], None] = lambda step, model: None  # every rank, before a step
    # a finished partial product in the stage's work folder (a precomputed table) worth keeping
    # across a restart; on object storage the caller uploads it (every rank that writes one)
    on_work_file: Callable[[Path], None] = lambda path: None


@dataclass
class RunState:
    step: int = 0
    tokens: int = 0
    nonfinite_total: int = 0
    nonfinite_run: int = 0
    resumed_from: int | None = None
    corrupt_skipped: list[str] = field(default_factory=list)
    last_checkpoint: str | None = None


class Job(Protocol):
    """What a stage plugs into the loop."""

    flops_per_token: float  # training FLOPs per token, for MFU (0: not reported)
    summary_keys: tuple[str, ...]  # metrics of the last step that go into the summary (val/* always)

    def next_step(self) -> tuple[list[Any], dict]:
        """This rank's micro-batches of the next global batch, and metrics about it; must hold
        ``tokens``: the tokens of the whole global batch (all ranks) that count for tokens/s."""

    def loss_fn(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict]: ...

    def after_step(self, engine: Engine, result: StepResult) -> dict:
        """After the optimizer step (skipped or not): updates outside the optimizer, metrics."""

    def evaluate(self, engine: Engine) -> dict:
        """Validation metrics; every rank calls it (ZeRO-3 gathers weights collectively)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def final_model(self, weights: dict[str, torch.Tensor]) -> nn.Module:
        """The model to save from the gathered weights (LoRA merges its adapters here)."""

    def save_final(self, model: nn.Module, folder: Path) -> Path:
        """Write final_model's model into folder (a language model: training/export.save_model)."""


class SamplerJob:
    """What jobs share whose data position is a sampler's and whose model is a Transformer."""

    sampler: Any
    model_cfg: Any

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def final_model(self, weights: dict[str, torch.Tensor]) -> nn.Module:
        model = Transformer(self.model_cfg)
        model.load_state_dict(weights)
        return model

    def save_final(self, model: nn.Module, folder: Path) -> Path:
        return save_model(model, folder)


def paths_from_payload(paths: dict) -> dict:
    """A gang payload's paths (strings, or lists of them: the stage wrote them as JSON) as Paths."""
    return {k: [Path(f) for f in v] if isinstance(v, list) else Path(v) for k, v in paths.items()}


# ----------------------------------------------------------------------------- resume


def choose_checkpoint(root: Path, view: FileView | None = None) -> tuple[Path | None, dict | None, list[str]]:
    """The newest checkpoint whose files match their digests, on every rank.

    The ranks that see the same copy of the folder split its hashing (``view``: by default
    all ranks see one copy); a checkpoint damaged, or incomplete on any node, is skipped with a
    warning and the previous one is tried. Returns (folder, trainer state, names of skipped ones).
    """
    rank, _ = rank_world()
    view = view or FileView.one_copy()
    candidates = broadcast(ckpt.list_checkpoints(root) if rank == 0 else None)
    skipped = []
    for folder in candidates:
        try:
            names = sorted(ckpt.read_state(folder)["files"])
            bad = ckpt.problems(folder, names[view.index::len(view.peers)])
        except (ValueError, KeyError) as err:
            bad = [str(err)]
        if all_sum([float(len(bad))])[0] == 0:
            return folder, ckpt.read_state(folder), skipped
        log.warning("checkpoint %s is damaged (%s); falling back to the previous one", folder.name,
                    "; ".join(bad[:3]) or "on another rank")
        skipped.append(folder.name)
    return None, None, skipped


def resume_engine(root: Path, make_engine: Callable[[bool], Engine],
                  view: FileView | None = None) -> tuple[Engine, Path | None, dict | None, list[str]]:
    """The engine, loaded from the newest good checkpoint under root if there is one.

    make_engine(load_universal) builds a fresh engine; a checkpoint saved by another number of
    workers is converted (once per copy of the folder: on rank 0 where the ranks share it) and
    loaded through DeepSpeed's universal format."""
    _, world = rank_world()
    view = view or file_view(root)
    folder, state, skipped = choose_checkpoint(root, view)
    universal = bool(state) and needs_universal(state["zero_stage"], state["precision"],
                                                state["world_size"], world)
    if universal:
        log.warning("resuming %s saved by %d workers on %d: converting to a universal checkpoint",
                    folder.name, state["world_size"], world)
        on_leaders(view, lambda: to_universal(folder, state["zero_stage"]))
    engine = make_engine(universal)
    if folder is not None:
        engine.load(folder, universal=universal)
    return engine, folder, state, skipped


def measure_cpu_peak_flops(n: int = 512, seconds: float = 0.3) -> float:
    """Sustained fp32 matmul FLOP/s of this process's threads: the MFU denominator on CPU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        iters += 1
    return 2 * n ** 3 * iters / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, job: Job, *, checkpoints: Path, hooks: Hooks | None, make_model: Callable[[], nn.Module],
          micro_batch: int, global_batch: int) -> "TrainLoop":
    """Resume (or start), run to cfg.steps, and return the loop for saving and the summary."""
    ensure_process_group()
    rank, _ = rank_world()

    def make_engine(universal: bool) -> Engine:
        return Engine(make_model(), cfg.engine, micro_batch=micro_batch, global_batch=global_batch,
                      total_steps=cfg.steps, load_universal=universal)

    view = file_view(Path(checkpoints))
    engine, folder, state, skipped = resume_engine(Path(checkpoints), make_engine, view)
    run = RunState(corrupt_skipped=skipped)
    if state is not None:
        _restore(run, job, folder, state, rank)
    if hasattr(job, "bind"):  # a job that works with the engine between steps (RL's rollouts)
        job.bind(engine)
    peak = cfg.peak_flops or broadcast(measure_cpu_peak_flops() if rank == 0 and engine.device.type == "cpu" else None)
    loop = TrainLoop(cfg, engine, job, run, hooks or Hooks(), Path(checkpoints), peak, view)
    loop.run()
    return loop


def _restore(run: RunState, job: Job, folder: Path, state: dict, rank: int) -> None:
    check_identity(job, folder, state)
    run.step, run.tokens = state["step"], state["tokens"]
    run.nonfinite_total = state.get("nonfinite_total", 0)
    run.resumed_from, run.last_checkpoint = state["step"], str(folder)
    job.load_state_dict(state["data"])
    rng = ckpt.read_rng(folder, rank)
    if rng is not None:
        ckpt.set_rng_state(rng)
    log.warning("resumed from %s (step %d)", folder, state["step"])


def check_identity(job: Job, folder: Path, state: dict) -> None:
    """A job that states what it is (its config and start model's digests: RL) refuses a
    checkpoint of another config or model, instead of silently training on from it."""
    mine = getattr(job, "identity", lambda: None)()
    saved = state.get("identity")
    if mine is None or saved is None or mine == saved:
        return
    differ = sorted(k for k in {*mine, *saved} if mine.get(k) != saved.get(k))
    raise ValueError(f"checkpoint {folder} belongs to another run ({', '.join(differ)} differ: saved "
                     f"{[saved.get(k) for k in differ]}, this run {[mine.get(k) for k in differ]}); refusing to "
                     f"resume from it. Delete {folder.parent} to start this run from step 0")


class TrainLoop:
    def __init__(self, cfg: TrainConfig, engine: Engine, job: Job, run: RunState, hooks: Hooks,
                 checkpoints: Path, peak: float | None, view: FileView | None = None):
        self.cfg, self.engine, self.job, self.run_state = cfg, engine, job, run
        self.hooks, self.checkpoints, self.peak = hooks, checkpoints, peak
        self.rank, self.world = rank_world()
        self.view = view or FileView.one_copy()
        self.last_metrics: dict = {}

    def run(self) -> None:
        run = self.run_state
        finished = getattr(self.job, "finished", lambda: False)  # a job may end early (RL's plateau rule)
        while run.step < self.cfg.steps and not finished():
            self.hooks.on_step(run.step, self.engine.module)
            metrics = self.train_one()
            last = run.step == self.cfg.steps or finished()
            if run.step % self.cfg.eval_every == 0 or last:
                metrics.update(self.job.evaluate(self.engine))
            self.last_metrics = metrics
            if self.rank == 0:
                self.hooks.on_metrics(metrics, run.step)
            if run.step % self.cfg.checkpoint.every == 0 or last:
                self.save()

    def train_one(self) -> dict:
        run = self.run_state
        micro, info = self.job.next_step()
        start = time.perf_counter()
        result = self.engine.train_step(micro, self.job.loss_fn)
        seconds = time.perf_counter() - start
        run.step += 1
        run.tokens += info["tokens"]
        self._count_nonfinite(result.skipped)
        extra = self.job.after_step(self.engine, result)
        return {**self._metrics(result, seconds, info), **extra}

    def _count_nonfinite(self, skipped: bool) -> None:
        run = self.run_state
        run.nonfinite_total += skipped
        run.nonfinite_run = run.nonfinite_run + 1 if skipped else 0
        if run.nonfinite_run >= self.cfg.max_nonfinite:
            raise NonFiniteLoss(
                f"{run.nonfinite_run} non-finite losses in a row (steps {run.step - run.nonfinite_run + 1}"
                f"..{run.step}, max_nonfinite={self.cfg.max_nonfinite}); stopped. The last good "
                f"checkpoint is {run.last_checkpoint or 'none (no checkpoint was written yet)'}")

    def _metrics(self, r: StepResult, seconds: float, info: dict) -> dict:
        tokens_per_s = info["tokens"] / seconds
        metrics = {"step": self.run_state.step, "loss": r.loss, **r.metrics, "grad_norm": r.grad_norm,
                   "lr": r.lr, "tokens_per_s": tokens_per_s, "step_seconds": seconds,
                   "tokens": self.run_state.tokens, **info, "skipped": r.skipped,
                   "nonfinite_total": self.run_state.nonfinite_total,
                   "time": time.time(), "cpu_time": time.process_time()}
        metrics["tokens"] = self.run_state.tokens  # the running total, not this step's count
        if self.peak and self.job.flops_per_token:
            metrics["mfu"] = self.job.flops_per_token * tokens_per_s / (self.peak * self.world)
        return metrics

    def save(self) -> None:
        """One checkpoint: every rank writes its part into a staging folder, rank 0 publishes.

        Where nodes keep the folder on their own disks (self.view), each node's leader prepares
        and publishes its copy, with rank 0's trainer.json listing every node's files; the
        object store then holds them all (cluster/train.py)."""
        run, root, view = self.run_state, self.checkpoints, self.view
        staging = ckpt.staging_path(root, run.step)
        if view.leader:
            ckpt.prune(root, self.cfg.checkpoint.keep)  # also clears a stale staging folder
            staging.mkdir(parents=True)
        barrier()
        self.engine.save(staging)
        ckpt.write_rng(staging, self.rank)
        barrier()
        names = ckpt.files_of(staging)
        gathered = all_gather(ckpt.digest(staging, names[view.index::len(view.peers)]))
        final = staging.with_name(ckpt.step_name(run.step))
        state = self._state() if self.rank == 0 else None
        if not view.shared:  # every node's leader writes rank 0's trainer.json
            state = broadcast(state)
        if view.leader:
            files = {k: v for part in gathered for k, v in part.items()}
            ckpt.publish(staging, state, files, self.cfg.checkpoint.keep)
        barrier()
        run.last_checkpoint = str(final)
        self.hooks.on_checkpoint(final, self.last_metrics)

    def _state(self) -> dict:
        run, ecfg = self.run_state, self.cfg.engine
        return {"step": run.step, "tokens": run.tokens, "nonfinite_total": run.nonfinite_total,
                "world_size": self.world, "zero_stage": ecfg.zero_stage, "precision": ecfg.precision,
                "data": self.job.state_dict(), "identity": getattr(self.job, "identity", lambda: None)(),
                "time": time.time()}

    def save_model(self, folder: Path, tokenizer=None, model_max_length: int | None = None) -> Path | None:
        """The final model (and tokenizer) into folder on rank 0; every rank helps gather the weights."""
        weights = self.engine.full_state_dict()
        if self.rank != 0:
            return None
        model = self.job.final_model(weights)
        out = self.job.save_final(model, folder)
        if tokenizer is not None:
            save_tokenizer(tokenizer, out, model_max_length=model_max_length)
        return out

    def summary(self) -> dict:
        run, m = self.run_state, self.last_metrics
        keep = {k: v for k, v in m.items()
                if k.startswith("val/") or k in ("loss", "tokens_per_s", "mfu", *self.job.summary_keys)}
        return {**keep, "steps": run.step, "tokens": run.tokens, "nonfinite_steps": run.nonfinite_total,
                "resumed_from_step": run.resumed_from, "corrupt_checkpoints_skipped": run.corrupt_skipped,
                "torch_threads": torch.get_num_threads()}
