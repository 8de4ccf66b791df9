"""The pretraining loop: pure torch + the DeepSpeed seam, no Ray.

One machine:   r1pipe run recipes/demo.yaml --stages pretrain   (a Ray Train gang of CPU workers)
In-process:    pretrain(PretrainConfig(steps=20), Paths(...), seed=0)   (a group of one: gloo, NCCL on a GPU)
A cluster:     r1pipe run recipes/cluster.yaml --address auto          (NCCL workers, same code)
Under Ray Train, ``cluster/train.py`` calls ``pretrain()`` in every worker and passes
hooks that report metrics and checkpoints to Ray. Every rank runs the same loop; the
sampler draws the same global batch everywhere and each rank trains on its slice.

Per step: the curriculum phase, a global batch, ``engine.train_step`` (a non-finite
loss skips the step; M in a row abort), the router-bias update, metrics; every
``eval_every`` steps the validation loss per domain and difficulty; every
``checkpoint.every`` steps and at the end a checkpoint (training/checkpoint.py). At the
end rank 0 writes the model (safetensors + config) and the tokenizer files.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from training import checkpoint as ckpt
from training.config import DataConfig, PretrainConfig
from training.data import PHASES, CurriculumSampler, PackedCorpus, build_token_cache, shard
from training.engine import Engine, collective_device, ensure_process_group, needs_universal, to_universal
from training.export import save_model
from training.model import Transformer
from training.tokenizer import load_tokenizer, save_tokenizer

log = logging.getLogger("r1pipe.pretrain")


class NonFiniteLoss(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is kept."""


@dataclass
class Hooks:
    """How the caller sees the run: cluster/ turns these into Ray Train reports."""
    on_metrics: Callable[[dict, int], None] = lambda metrics, step: None      # rank 0 only
    on_checkpoint: Callable[[Path, dict], None] = lambda path, metrics: None  # every rank
    on_step: Callable[[int, torch.nn.Module], None] = lambda step, model: None  # every rank, before a step


@dataclass
class Paths:
    data_files: list[Path]
    tokenizer_dir: Path
    work: Path           # token cache
    checkpoints: Path    # survives crashes; Ray Train's experiment folder under Ray
    out: Path            # model/ and train_log.jsonl go here (rank 0)


@dataclass
class RunState:
    step: int = 0
    tokens: int = 0
    nonfinite_total: int = 0
    nonfinite_run: int = 0
    resumed_from: int | None = None
    corrupt_skipped: list[str] = field(default_factory=list)
    last_checkpoint: str | None = None


# ----------------------------------------------------------------------------- collectives


def _rank_world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def _broadcast(obj: Any) -> Any:
    box = [obj]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if dist.get_world_size() > 1:
        dist.barrier()


def _on_rank0(fn: Callable[[], Any]) -> None:
    """Run fn on rank 0 only; if it fails, every rank raises (instead of waiting forever)."""
    error = None
    if dist.get_rank() == 0:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            error = f"{type(err).__name__}: {err}"
    error = _broadcast(error)
    if error:
        raise RuntimeError(f"rank 0 failed: {error}")


def _sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    if dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------- resume


def choose_checkpoint(root: Path, world: int) -> tuple[Path | None, dict | None, list[str]]:
    """The newest checkpoint whose files match their digests, on every rank.

    Ranks split the hashing; a damaged checkpoint is skipped with a warning and the
    previous one is tried. Returns (folder, trainer state, names of skipped ones).
    """
    rank, _ = _rank_world()
    candidates = _broadcast(ckpt.list_checkpoints(root) if rank == 0 else None)
    skipped = []
    for folder in candidates:
        try:
            names = sorted(ckpt.read_state(folder)["files"])
            bad = ckpt.problems(folder, names[rank::world])
        except (ValueError, KeyError) as err:
            bad = [str(err)]
        if _sum([float(len(bad))])[0] == 0:
            return folder, ckpt.read_state(folder), skipped
        log.warning("checkpoint %s is damaged (%s); falling back to the previous one", folder.name,
                    "; ".join(bad[:3]) or "on another rank")
        skipped.append(folder.name)
    return None, None, skipped


def _resume(engine_args: dict, root: Path, world: int, make_model: Callable[[], Transformer],
            cfg: PretrainConfig) -> tuple[Engine, Path | None, dict | None, list[str]]:
    folder, state, skipped = choose_checkpoint(root, world)
    universal = bool(state) and needs_universal(state["zero_stage"], state["precision"],
                                                state["world_size"], world)
    if universal:
        log.warning("resuming %s saved by %d workers on %d: converting to a universal checkpoint",
                    folder.name, state["world_size"], world)
        _on_rank0(lambda: to_universal(folder, state["zero_stage"]))
    engine = Engine(make_model(), cfg.engine, load_universal=universal, **engine_args)
    if folder is not None:
        engine.load(folder, universal=universal)
    return engine, folder, state, skipped


# ----------------------------------------------------------------------------- metrics


def measure_cpu_peak_flops(n: int = 512, seconds: float = 0.3) -> float:
    """Sustained fp32 matmul FLOP/s of this process's threads: the MFU denominator on CPU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        iters += 1
    return 2 * n ** 3 * iters / (time.perf_counter() - start)


def expert_metrics(model: Transformer) -> dict:
    """Per MoE layer: each expert's share of the last micro-batch and max/mean imbalance."""
    out = {}
    for layer, load in model.expert_loads().items():
        counts = [float(c) for c in load.tolist()]
        total = sum(counts) or 1.0
        out[f"experts/l{layer}/imbalance"] = max(counts) / (total / len(counts))
        out.update({f"experts/l{layer}/e{e}": c / total for e, c in enumerate(counts)})
    return out


def evaluate(engine: Engine, corpus: PackedCorpus, cfg: DataConfig) -> dict:
    """Held-out loss overall, per domain and per difficulty (token-weighted), all ranks."""
    rank, world = _rank_world()
    ids = corpus.val_ids(cfg.val_max_sequences)
    if not ids:
        return {}
    per_rank = math.ceil(len(ids) / world)
    mine = ids[rank * per_rank:(rank + 1) * per_rank]
    sums = torch.zeros(len(corpus.val), 2, dtype=torch.float64)
    padded = mine + [ids[0]] * (per_rank - len(mine))  # equal work per rank; padding is not counted
    for i in range(0, per_rank, cfg.micro_batch):
        chunk = padded[i:i + cfg.micro_batch]
        stats = engine.evaluate_batch(*corpus.batch(corpus.val, chunk))
        for j, (pool, _) in enumerate(chunk):
            if i + j < len(mine):
                sums[pool] += stats[j]
    sums = torch.tensor(_sum(sums.flatten().tolist()), dtype=torch.float64).view(-1, 2)
    return _group_losses(corpus, sums)


def _group_losses(corpus: PackedCorpus, sums: torch.Tensor) -> dict:
    groups: dict[str, list[float]] = {"val/loss": [0.0, 0.0]}
    for pool, (nll, n) in zip(corpus.val, sums.tolist()):
        for key in ("val/loss", f"val/domain/{pool.domain}", f"val/difficulty/{pool.difficulty}"):
            acc = groups.setdefault(key, [0.0, 0.0])
            acc[0], acc[1] = acc[0] + nll, acc[1] + n
    return {k: nll / n for k, (nll, n) in groups.items() if n}


# ----------------------------------------------------------------------------- the loop


def pretrain(cfg: PretrainConfig, paths: Paths, *, seed: int, hooks: Hooks | None = None) -> dict:
    """Train to cfg.steps (resuming from the newest good checkpoint); returns rank 0's summary."""
    hooks = hooks or Hooks()
    ensure_process_group()
    rank, world = _rank_world()
    tok_file = Path(paths.tokenizer_dir) / "tokenizer.json"

    def token_cache() -> Path:  # tokenized once (rank 0), then found by every rank
        return build_token_cache(paths.data_files, tok_file, paths.work, val_fraction=cfg.data.val_fraction,
                                 text_column=cfg.data.text_column)
    _on_rank0(token_cache)
    cache = token_cache()
    corpus = PackedCorpus(cache, cfg.data.seq_len)
    sampler = CurriculumSampler(corpus, cfg.data, cfg.steps, seed)
    tokenizer = load_tokenizer(paths.tokenizer_dir)
    model_cfg = cfg.model.build(vocab_size=_round_up(tokenizer.get_vocab_size(), 64))

    def make_model() -> Transformer:
        torch.manual_seed(seed)  # identical initial weights on every rank
        return Transformer(model_cfg)

    engine_args = dict(micro_batch=cfg.data.micro_batch, global_batch=cfg.data.global_batch, total_steps=cfg.steps)
    engine, folder, state, skipped = _resume(engine_args, Path(paths.checkpoints), world, make_model, cfg)
    run = RunState(corrupt_skipped=skipped)
    if state is not None:
        _restore(run, sampler, folder, state, rank)
    peak = cfg.peak_flops or _broadcast(measure_cpu_peak_flops() if rank == 0 and engine.device.type == "cpu" else None)
    loop = _Loop(cfg, engine, corpus, sampler, run, hooks, paths, peak, model_cfg)
    loop.run()
    return loop.finish(tokenizer)


def _restore(run: RunState, sampler: CurriculumSampler, folder: Path, state: dict, rank: int) -> None:
    run.step, run.tokens = state["step"], state["tokens"]
    run.nonfinite_total = state.get("nonfinite_total", 0)
    run.resumed_from, run.last_checkpoint = state["step"], str(folder)
    sampler.load_state_dict(state["sampler"])
    rng = ckpt.read_rng(folder, rank)
    if rng is not None:
        ckpt.set_rng_state(rng)
    log.warning("resumed from %s (step %d)", folder, state["step"])


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


class _Loop:
    def __init__(self, cfg, engine, corpus, sampler, run, hooks, paths, peak, model_cfg):
        self.cfg, self.engine, self.corpus, self.sampler = cfg, engine, corpus, sampler
        self.run_state, self.hooks, self.paths, self.peak = run, hooks, paths, peak
        self.rank, self.world = _rank_world()
        self.flops_per_token = engine.module.flops_per_token(cfg.data.seq_len)
        self.tokens_per_step = cfg.data.global_batch * cfg.data.seq_len
        self.last_metrics: dict = {}

    def run(self) -> None:
        run = self.run_state
        while run.step < self.cfg.steps:
            self.hooks.on_step(run.step, self.engine.module)
            metrics = self.train_one()
            if run.step % self.cfg.eval_every == 0 or run.step == self.cfg.steps:
                metrics.update(evaluate(self.engine, self.corpus, self.cfg.data))
            self.last_metrics = metrics
            if self.rank == 0:
                self.hooks.on_metrics(metrics, run.step)
            if run.step % self.cfg.checkpoint.every == 0 or run.step == self.cfg.steps:
                self.save()

    def train_one(self) -> dict:
        run, data = self.run_state, self.cfg.data
        phase = self.sampler.phase()
        ids = shard(self.sampler.next_batch(), self.rank, self.world)
        micro = self.corpus.micro_batches(ids, data.micro_batch)
        start = time.perf_counter()
        result = self.engine.train_step(micro)
        seconds = time.perf_counter() - start
        run.step += 1
        run.tokens += self.tokens_per_step
        self._count_nonfinite(result.skipped)
        if not result.skipped:
            reduce = dist.all_reduce if self.world > 1 else None
            self.engine.module.update_router_bias(reduce)
        return self._metrics(result, seconds, phase)

    def _count_nonfinite(self, skipped: bool) -> None:
        run = self.run_state
        run.nonfinite_total += skipped
        run.nonfinite_run = run.nonfinite_run + 1 if skipped else 0
        if run.nonfinite_run >= self.cfg.max_nonfinite:
            raise NonFiniteLoss(
                f"{run.nonfinite_run} non-finite losses in a row (steps {run.step - run.nonfinite_run + 1}"
                f"..{run.step}, max_nonfinite={self.cfg.max_nonfinite}); stopped. The last good "
                f"checkpoint is {run.last_checkpoint or 'none (no checkpoint was written yet)'}")

    def _metrics(self, r, seconds: float, phase: int) -> dict:
        tokens_per_s = self.tokens_per_step / seconds
        metrics = {"step": self.run_state.step, "loss": r.loss, "lm_loss": r.lm_loss, "aux_loss": r.aux_loss,
                   "grad_norm": r.grad_norm, "lr": r.lr, "tokens_per_s": tokens_per_s,
                   "step_seconds": seconds, "tokens": self.run_state.tokens, "phase": phase,
                   "phase_name": PHASES[phase], "skipped": r.skipped,
                   "nonfinite_total": self.run_state.nonfinite_total,
                   "time": time.time(), "cpu_time": time.process_time()}
        if self.peak:
            metrics["mfu"] = self.flops_per_token * tokens_per_s / (self.peak * self.world)
        metrics.update(expert_metrics(self.engine.module))
        return metrics

    def save(self) -> None:
        run = self.run_state
        root = Path(self.paths.checkpoints)
        staging = ckpt.staging_path(root, run.step)
        if self.rank == 0:
            ckpt.prune(root, self.cfg.checkpoint.keep)  # also clears a stale staging folder
            staging.mkdir(parents=True)
        _barrier()
        self.engine.save(staging)
        ckpt.write_rng(staging, self.rank)
        _barrier()
        names = ckpt.files_of(staging)
        mine = ckpt.digest(staging, names[self.rank::self.world])
        gathered = [None] * self.world
        dist.all_gather_object(gathered, mine) if self.world > 1 else gathered.__setitem__(0, mine)
        final = ckpt.staging_path(root, run.step).with_name(ckpt.step_name(run.step))
        if self.rank == 0:
            files = {k: v for part in gathered for k, v in part.items()}
            ckpt.publish(staging, self._state(), files, self.cfg.checkpoint.keep)
        _barrier()
        run.last_checkpoint = str(final)
        self.hooks.on_checkpoint(final, self.last_metrics)

    def _state(self) -> dict:
        run, ecfg = self.run_state, self.cfg.engine
        return {"step": run.step, "tokens": run.tokens, "nonfinite_total": run.nonfinite_total,
                "world_size": self.world, "zero_stage": ecfg.zero_stage, "precision": ecfg.precision,
                "sampler": self.sampler.state_dict(), "time": time.time()}

    def finish(self, tokenizer) -> dict:
        """The final model and tokenizer (rank 0); every rank takes part in gathering weights."""
        weights = self.engine.full_state_dict()
        if self.rank != 0:
            return {}
        model = Transformer(self.engine.module.cfg)
        model.load_state_dict(weights)
        folder = save_model(model, Path(self.paths.out) / "model")
        save_tokenizer(tokenizer, folder, model_max_length=self.cfg.data.seq_len)
        return self.summary()

    def summary(self) -> dict:
        run, m = self.run_state, self.last_metrics
        keep = {k: v for k, v in m.items() if k.startswith("val/") or k in ("loss", "lm_loss", "tokens_per_s", "mfu")}
        return {**keep, "steps": run.step, "tokens": run.tokens, "nonfinite_steps": run.nonfinite_total,
                "resumed_from_step": run.resumed_from, "corrupt_checkpoints_skipped": run.corrupt_skipped,
                "params": self.engine.module.param_counts(), "torch_threads": torch.get_num_threads()}


def write_log(path: Path, rows: list[dict]) -> None:
    """One JSON line per step, the latest record of a step winning (steps replayed after a restart)."""
    by_step = {r["step"]: r for r in rows}
    Path(path).write_text("".join(json.dumps(by_step[s]) + "\n" for s in sorted(by_step)))
