"""Supervised fine-tuning on worked solutions: the loss covers the response, never the prompt.

One machine:   r1pipe run recipes/demo.yaml --stages sft           (a Ray Train gang of CPU workers)
In-process:    sft(SftConfig(steps=50), SftPaths(...), seed=0)      (a group of one: gloo, NCCL on a GPU)
A cluster:     r1pipe run recipes/cluster.yaml --address auto      (NCCL workers, same code)

The model starts from a model folder (pretrain's, or any the recipe names) and trains under the
same loop as pretraining (training/loop.py: checkpoints, elastic resume, non-finite steps). Its
own parts: examples rendered by the one chat template and tokenized once (training/sft_data.py),
packed rows with a block-diagonal mask or padded batches, an optional curriculum over task
difficulty with the pretraining sampler, optional LoRA (merged into the saved model), and the
loss: the mean over the global batch's response tokens (each micro-batch scales its sum by the
global count, so the mean does not depend on how the batch was split) plus the MoE balance loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from training.config import SftConfig
from training.distributed import all_sum, file_view, on_leaders, rank_slice, rank_world
from training.engine import Engine, StepResult, ensure_process_group
from training.export import load_model, load_model_config
from training.logprobs import IGNORE
from training.lora import add_lora, merge_lora
from training.loop import Hooks, SamplerJob, paths_from_payload, train
from training.model import Transformer, flops_per_token
from training.pretrain import expert_metrics
from training.pretrain_data import CurriculumSampler
from training.sft_data import SftCorpus, build_sft_cache, val_examples
from training.tokenizer import load_tokenizer


@dataclass
class SftPaths:
    train_files: list[Path]     # the tasks stage's train split
    val_files: list[Path]       # its eval split: worked solutions for the validation loss
    init_model: Path            # a model folder (model.safetensors + config.json + tokenizer.json)
    work: Path                  # example cache
    checkpoints: Path
    out: Path                   # model/ goes here (rank 0)


def sft_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Summed response-token NLL times batch["scale"] (micro-batches x ranks / global count) + aux."""
    out = model(batch["x"], positions_BT=batch.get("positions"), doc_ids_BT=batch.get("doc"), real_BT=batch.get("real"))
    nll = F.cross_entropy(out.logits.float().flatten(0, 1), batch["y"].flatten(), ignore_index=IGNORE,
                          reduction="sum")
    lm = nll * batch["scale"]
    return lm + out.aux_loss, {"lm_loss": lm, "aux_loss": out.aux_loss}


class SftJob(SamplerJob):
    summary_keys = ("lm_loss",)
    loss_fn = staticmethod(sft_loss)

    def __init__(self, cfg: SftConfig, corpus: SftCorpus, sampler: CurriculumSampler, model_cfg, val: list):
        self.cfg, self.corpus, self.sampler, self.model_cfg, self.val = cfg, corpus, sampler, model_cfg, val
        self.rank, self.world = rank_world()
        self.flops_per_token = flops_per_token(model_cfg, cfg.data.seq_len)
        self.gas = cfg.data.global_batch // (cfg.data.micro_batch * self.world)

    def next_step(self) -> tuple[list, dict]:
        phase = self.sampler.phase()
        ids = self.sampler.next_batch()  # the same global batch on every rank
        train = self.corpus.train
        scale = self.gas * self.world / max(1, self.corpus.n_targets(train, ids))
        mine = rank_slice(ids, self.rank, self.world)
        if not self.cfg.data.packing:  # this rank's examples by length: less padding, same global batch
            mine = sorted(mine, key=lambda ps: self.corpus.n_tokens(train, [ps]))
        micro = self.corpus.micro_batches(mine, self.cfg.data.micro_batch)
        for m in micro:
            m["scale"] = scale
        padded = sum(m["x"].numel() for m in micro)
        return micro, {"tokens": self.corpus.n_tokens(train, ids),
                       "packing_efficiency": self.corpus.n_tokens(train, mine) / padded,
                       "phase": phase}

    def after_step(self, engine: Engine, result: StepResult) -> dict:
        if not result.skipped and not self.cfg.lora.enabled:
            engine.module.update_router_bias(dist.all_reduce if self.world > 1 else None)
        return expert_metrics(_base(engine.module))

    @torch.no_grad()
    def evaluate(self, engine: Engine) -> dict:
        """Response-token loss on held-out worked solutions, overall and per family; all ranks."""
        if not self.val:
            return {}
        families = sorted({f for _, _, f in self.val})
        sums = torch.zeros(len(families), 2, dtype=torch.float64)
        per_rank = math.ceil(len(self.val) / self.world)
        mine = self.val[self.rank * per_rank:(self.rank + 1) * per_rank]
        engine.module.eval()
        for i in range(per_rank):  # equal calls per rank (ZeRO-3 gathers collectively)
            ids, n_prompt, family = mine[i] if i < len(mine) else self.val[0]
            x = torch.tensor([ids[:-1]], device=engine.device)
            y = torch.tensor([ids[1:]], device=engine.device)
            y[:, :n_prompt - 1] = IGNORE
            logits = engine.module(x).logits.float()
            nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum")
            if i < len(mine):
                sums[families.index(family)] += torch.tensor([float(nll), float((y != IGNORE).sum())])
        engine.module.train()
        sums = torch.tensor(all_sum(sums.flatten().tolist()), dtype=torch.float64).view(-1, 2)
        out = {"val/loss": float(sums[:, 0].sum() / sums[:, 1].sum())}
        out.update({f"val/family/{f}": float(s / n) for f, (s, n) in zip(families, sums.tolist()) if n})
        return out

    def final_model(self, weights: dict) -> Transformer:
        if not self.cfg.lora.enabled:
            return super().final_model(weights)
        wrapped = add_lora(Transformer(self.model_cfg), self.cfg.lora)
        wrapped.load_state_dict(weights)
        return merge_lora(wrapped)


def _base(module) -> Transformer:
    """The Transformer under a LoRA wrapper (or the module itself)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def check_model(cfg: SftConfig, init_model: Path, key: str = "data.seq_len"):
    """The init model's config, once it is known to hold this run's sequences and tokenizer."""
    model_cfg = load_model_config(init_model)
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"{key}={cfg.data.seq_len} exceeds the max_seq_len={model_cfg.max_seq_len} of the model "
                         f"in {init_model}")
    vocab = load_tokenizer(init_model).get_vocab_size()
    if vocab > model_cfg.vocab_size:
        raise ValueError(f"{init_model}: the tokenizer has {vocab} tokens, the model only {model_cfg.vocab_size}")
    return model_cfg


def sft(cfg: SftConfig, paths: SftPaths, *, seed: int, hooks: Hooks | None = None) -> dict:
    """Fine-tune to cfg.steps (resuming from the newest good checkpoint); returns rank 0's summary."""
    ensure_process_group()
    rank, _ = rank_world()

    def cache() -> Path:  # tokenized once per copy of the work folder, then found by every rank
        return build_sft_cache(paths.train_files, paths.init_model, paths.work, seq_len=cfg.data.seq_len)
    on_leaders(file_view(Path(paths.work)), cache)
    corpus = SftCorpus(cache(), cfg.data.seq_len, cfg.data.packing)
    sampler = CurriculumSampler(corpus, cfg.data, cfg.steps, seed, weights=cfg.data.family_weights,
                                weights_key="data.family_weights")
    val = val_examples(paths.val_files, paths.init_model, cfg.data.seq_len, cfg.data.val_max_examples)
    model_cfg = check_model(cfg, paths.init_model)
    tokenizer = load_tokenizer(paths.init_model)

    def make_model() -> torch.nn.Module:
        torch.manual_seed(seed)  # LoRA's initial adapters: identical on every rank
        model = load_model(paths.init_model)
        return add_lora(model, cfg.lora) if cfg.lora.enabled else model

    job = SftJob(cfg, corpus, sampler, model_cfg, val)
    loop = train(cfg, job, checkpoints=paths.checkpoints, hooks=hooks, make_model=make_model,
                 micro_batch=cfg.data.micro_batch, global_batch=cfg.data.global_batch)
    loop.save_model(Path(paths.out) / "model", tokenizer, model_max_length=model_cfg.max_seq_len)
    if rank != 0:
        return {}
    return {**loop.summary(), "examples": sum(len(r) for p in corpus.train for r in p.rows),
            "examples_too_long": corpus.too_long, "sequences": sum(p.n for p in corpus.train),
            "packing": cfg.data.packing, "lora": cfg.lora.enabled,
            "trainable_params": sum(getattr(p, "ds_numel", p.numel()) for p in loop.engine.module.parameters()
                                    if p.requires_grad)}  # ds_numel: the whole size of a ZeRO-3 shard


def worker(payload: dict, hooks: Hooks) -> dict:
    """The gang's entry point (cluster/train.py): JSON payload in, rank 0's summary out."""
    paths = SftPaths(**paths_from_payload(payload["paths"]))
    return sft(SftConfig.model_validate(payload["config"]), paths, seed=payload["seed"], hooks=hooks)
