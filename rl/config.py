"""Typed config of the post-training side: evaluation (and, as they land, DPO and RL).

Plain pydantic, no torch at import, so loading a recipe stays cheap.

    cfg = EvalConfig(max_new_tokens=384, pass_at_k={"k": 8, "tasks": 64})
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
