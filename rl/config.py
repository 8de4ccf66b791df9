"""Typed config of the post-training side: evaluation, DPO, the reward model (and, as it lands, RL).

Plain pydantic, no torch at import, so loading a recipe stays cheap.

    cfg = EvalConfig(max_new_tokens=384, pass_at_k={"k": 8, "tasks": 64})
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from training.config import CurriculumConfig, EngineConfig, OptimizerConfig, TrainConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PassAtKConfig(Strict):
    """pass@k by temperature sampling on a subset of the held-out tasks (Chen et al.'s unbiased estimator)."""

    k: int = Field(8, ge=1)  # the k of pass@k
    samples: int | None = Field(None, ge=1)  # completions per task (n >= k); None: k
    tasks: int = Field(64, ge=0)  # how many held-out tasks get sampled (spread over families and difficulties); 0: off
    temperature: float = Field(0.8, gt=0)  # sampling temperature of the k completions
    top_p: float = Field(0.95, gt=0, le=1)  # nucleus sampling mass

    @model_validator(mode="after")
    def _enough_samples(self) -> "PassAtKConfig":
        if self.samples is not None and self.samples < self.k:
            raise ValueError(f"pass_at_k.samples={self.samples} must be >= pass_at_k.k={self.k}")
        return self

    @property
    def n(self) -> int:
        return self.samples or self.k


class EvalConfig(Strict):
    """Held-out evaluation at the end of a training stage: greedy accuracy, format, length, pass@k."""

    enabled: bool = True  # needs a `tasks` stage in the recipe
    max_tasks: int | None = Field(None, ge=1)  # at most this many eval tasks (spread over families and difficulties); None: all
    max_new_tokens: int = Field(384, ge=1)  # per completion (capped by the model's max_seq_len)
    batch_size: int = Field(32, ge=1)  # prompts decoded together (KV cache, left padding)
    workers: int | None = Field(None, ge=1)  # Ray tasks the prompts are spread over; None: one per CPU (GPU)
    use_gpu: bool = False  # one GPU per worker
    pass_at_k: PassAtKConfig = PassAtKConfig()


# ----------------------------------------------------------------------------- DPO


class DpoLossConfig(Strict):
    """The preference loss (rl/losses.py) and its parameters."""

    name: Literal["sigmoid", "cdpo", "ipo", "simpo"] = "sigmoid"  # sigmoid = DPO; simpo needs no reference
    beta: float = Field(0.1, gt=0)  # strength of the KL-like pull toward the reference
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # cdpo (and simpo): probability a label is wrong
    gamma: float = Field(0.5, ge=0)  # simpo: the target reward margin
    #: + rpo_alpha x the chosen responses' per-token NLL (Pang et al. 2024, iterative RPO; TRL's "sft"
    #: loss term, formerly rpo_alpha): keeps the chosen responses likely while the margin grows; 0: off
    rpo_alpha: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _cdpo_smooths(self) -> "DpoLossConfig":
        if self.name == "cdpo" and self.label_smoothing <= 0:
            raise ValueError("loss.label_smoothing must be > 0 for loss.name=cdpo")
        return self

    def params(self) -> dict:
        out = {"beta": self.beta}
        if self.name in ("cdpo", "sigmoid", "simpo"):
            out["label_smoothing"] = self.label_smoothing
        if self.name == "simpo":
            out["gamma"] = self.gamma
        return out


class PairDataConfig(Strict):
    """Pairs per batch: a pair is two sequences (prompt + chosen, prompt + rejected)."""

    seq_len: int = Field(512, ge=8)  # longest sequence; pairs with a longer one are left out (counted)
    micro_batch: int = Field(4, ge=1)  # pairs per worker per forward
    global_batch: int = Field(16, ge=1)  # pairs per optimizer step, all workers together
    val_max_pairs: int = Field(64, ge=0)  # held-out pairs (the pairs stage's eval split) for val/*
    curriculum: CurriculumConfig = CurriculumConfig(enabled=False)  # by task difficulty, as in SFT

    @model_validator(mode="after")
    def _batches(self) -> "PairDataConfig":
        if self.global_batch % self.micro_batch:
            raise ValueError(f"data.global_batch={self.global_batch} must be a multiple of "
                             f"data.micro_batch={self.micro_batch}")
        return self


class DpoConfig(TrainConfig):
    """One DPO run: the policy starts from a model folder; the reference is the same weights, frozen."""

    steps: int = Field(100, ge=1)
    engine: EngineConfig = EngineConfig(optimizer=OptimizerConfig(lr=1e-5, warmup_steps=10))
    loss: DpoLossConfig = DpoLossConfig()
    data: PairDataConfig = PairDataConfig()
    #: precomputed: the reference's log-probs of every pair once, before step 1, stored and reused on
    #: resume; online: a frozen copy (ZeRO-3 shards it) scores each batch. Both give the same losses.
    reference: Literal["precomputed", "online"] = "precomputed"


# ----------------------------------------------------------------------------- reward model


class RewardModelConfig(TrainConfig):
    """A reward model: the start model's trunk with a linear head that scores (prompt, response),
    trained with the Bradley-Terry loss on preference pairs."""

    steps: int = Field(100, ge=1)
    engine: EngineConfig = EngineConfig(optimizer=OptimizerConfig(lr=1e-5, warmup_steps=10))
    data: PairDataConfig = PairDataConfig()
    #: pulls the mean score toward 0 (TRL's center_rewards_coefficient): + coef x mean((s_c + s_r)^2),
    #: so a reward term for RL stays centred; 0: off
    center_coef: float = Field(0.0, ge=0)
