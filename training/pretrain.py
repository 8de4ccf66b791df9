"""The pretraining loop: pure torch + the DeepSpeed seam, no Ray.

One machine:   r1pipe run recipes/demo.yaml --stages pretrain   (a Ray Train gang of CPU workers)
In-process:    pretrain(PretrainConfig(steps=20), Paths(...), seed=0)   (a group of one: gloo, NCCL on a GPU)
A cluster:     r1pipe run recipes/cluster.yaml --address auto          (NCCL workers, same code)
Under Ray Train, ``cluster/train.py`` runs ``worker()`` in every worker and passes hooks
that report metrics and checkpoints to Ray. Every rank runs the same loop; the sampler
draws the same global batch everywhere and each rank trains on its slice.

This module holds only what is pretraining's own (training/loop.py holds the rest): the
token cache and curriculum sampler, the LM + MoE balance loss, the router-bias update after
each step, expert-load metrics, and the validation loss per domain and difficulty every
``eval_every`` steps. At the end rank 0 writes the model (safetensors + config) and the
tokenizer files.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from training.config import DataConfig, PretrainConfig
from training.distributed import all_sum, file_view, on_leaders, rank_slice, rank_world
from training.engine import Engine, StepResult, ensure_process_group, lm_loss
from training.loop import Hooks, NonFiniteLoss, SamplerJob, choose_checkpoint, train  # noqa: F401 - re-exported
from training.model import Transformer, flops_per_token
from training.pretrain_data import PHASES, CurriculumSampler, PackedCorpus, build_token_cache
from training.tokenizer import load_tokenizer


@dataclass
class Paths:
    data_files: list[Path]
    tokenizer_dir: Path
    work: Path           # token cache
    checkpoints: Path    # survives crashes; Ray Train's experiment folder under Ray
    out: Path            # model/ and train_log.jsonl go here (rank 0)
    exclude_ids: Path | None = None  # a JSON list of document ids to leave out (decontamination)


# ----------------------------------------------------------------------------- metrics


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
    rank, world = rank_world()
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
    sums = torch.tensor(all_sum(sums.flatten().tolist()), dtype=torch.float64).view(-1, 2)
    return _group_losses(corpus, sums)


def _group_losses(corpus: PackedCorpus, sums: torch.Tensor) -> dict:
    groups: dict[str, list[float]] = {"val/loss": [0.0, 0.0]}
    for pool, (nll, n) in zip(corpus.val, sums.tolist()):
        for key in ("val/loss", f"val/domain/{pool.domain}", f"val/difficulty/{pool.difficulty}"):
            acc = groups.setdefault(key, [0.0, 0.0])
            acc[0], acc[1] = acc[0] + nll, acc[1] + n
    return {k: nll / n for k, (nll, n) in groups.items() if n}


# ----------------------------------------------------------------------------- the job


class PretrainJob(SamplerJob):
    """Curriculum batches of packed sequences, LM + balance loss, router bias after each step."""

    summary_keys = ("lm_loss",)

    def __init__(self, cfg: PretrainConfig, corpus: PackedCorpus, sampler: CurriculumSampler, model_cfg):
        self.cfg, self.corpus, self.sampler, self.model_cfg = cfg, corpus, sampler, model_cfg
        self.rank, self.world = rank_world()
        self.flops_per_token = flops_per_token(model_cfg, cfg.data.seq_len)
        self.tokens_per_step = cfg.data.global_batch * cfg.data.seq_len
        self.loss_fn = lm_loss

    def next_step(self) -> tuple[list, dict]:
        phase = self.sampler.phase()
        ids = rank_slice(self.sampler.next_batch(), self.rank, self.world)
        micro = self.corpus.micro_batches(ids, self.cfg.data.micro_batch)
        return micro, {"tokens": self.tokens_per_step, "phase": phase, "phase_name": PHASES[phase]}

    def after_step(self, engine: Engine, result: StepResult) -> dict:
        if not result.skipped:
            engine.module.update_router_bias(dist.all_reduce if self.world > 1 else None)
        return expert_metrics(engine.module)

    def evaluate(self, engine: Engine) -> dict:
        return evaluate(engine, self.corpus, self.cfg.data)



# ----------------------------------------------------------------------------- the run


def pretrain(cfg: PretrainConfig, paths: Paths, *, seed: int, hooks: Hooks | None = None) -> dict:
    """Train to cfg.steps (resuming from the newest good checkpoint); returns rank 0's summary."""
    ensure_process_group()
    rank, _ = rank_world()
    tok_file = Path(paths.tokenizer_dir) / "tokenizer.json"
    exclude = set(json.loads(Path(paths.exclude_ids).read_text())) if paths.exclude_ids else None

    def token_cache() -> Path:  # tokenized once per copy of the work folder, then found by every rank
        return build_token_cache(paths.data_files, tok_file, paths.work, val_fraction=cfg.data.val_fraction,
                                 text_column=cfg.data.text_column, exclude_ids=exclude)
    on_leaders(file_view(Path(paths.work)), token_cache)
    corpus = PackedCorpus(token_cache(), cfg.data.seq_len)
    sampler = CurriculumSampler(corpus, cfg.data, cfg.steps, seed)
    tokenizer = load_tokenizer(paths.tokenizer_dir)
    model_cfg = cfg.model.build(vocab_size=round_up(tokenizer.get_vocab_size(), 64))

    def make_model() -> Transformer:
        torch.manual_seed(seed)  # identical initial weights on every rank
        return Transformer(model_cfg)

    job = PretrainJob(cfg, corpus, sampler, model_cfg)
    loop = train(cfg, job, checkpoints=paths.checkpoints, hooks=hooks, make_model=make_model,
                 micro_batch=cfg.data.micro_batch, global_batch=cfg.data.global_batch)
    loop.save_model(Path(paths.out) / "model", tokenizer, model_max_length=cfg.data.seq_len)
    if rank != 0:
        return {}
    return {**loop.summary(), "params": loop.engine.module.param_counts(),
            "docs_excluded": len(exclude or ())}


def worker(payload: dict, hooks: Hooks) -> dict:
    """The gang's entry point (cluster/train.py): JSON payload in, rank 0's summary out."""
    paths = Paths(**{k: ([Path(f) for f in v] if k == "data_files" else Path(v) if v is not None else None)
                     for k, v in payload["paths"].items()})
    return pretrain(PretrainConfig.model_validate(payload["config"]), paths, seed=payload["seed"], hooks=hooks)


def round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple
