"""Typed config of the training stages: engine, data/curriculum, checkpoints, the pretrain run.

``TrainConfig`` holds what every training stage shares (steps, engine, checkpoints, evaluation
cadence, non-finite limit); ``PretrainConfig`` and the SFT config (training/sft.py) extend it.

Plain pydantic, no torch or DeepSpeed at import, so loading a recipe stays cheap; the
pipeline's config tree (pipelines/config.py) nests these as the `pretrain:` section.

    cfg = PretrainConfig.model_validate({"steps": 200, "engine": {"zero_stage": 2}})
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OptimizerConfig(Strict):
    """AdamW with linear warmup, then cosine decay to a floor."""

    lr: float = Field(3e-3, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor, as a fraction of lr")
    warmup_steps: int = Field(10, ge=0, description="linear warmup from lr/warmup_steps to lr")
    weight_decay: float = Field(0.1, ge=0, description="on matrices only, never on norms")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    fused: bool | None = Field(None, description=(
        "torch's fused AdamW kernel (one launch for every tensor); None: on CUDA only, where it replaces "
        "hundreds of small kernels per step; the CPU path keeps the foreach implementation"))


class EngineConfig(Strict):
    """How a model trains under DeepSpeed: ZeRO stage, precision, clipping, offload."""

    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="2 shards grads + Adam states; 3 shards weights too")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 on GPUs; fp32 is the CPU default")
    grad_clip: float = Field(1.0, ge=0, description="global-norm clip; 0 = off")
    optimizer: OptimizerConfig = OptimizerConfig()
    activation_checkpointing: bool = Field(False, description="recompute each block in backward")
    offload_optimizer: bool = Field(False, description="optimizer states in host memory (ZeRO 1-3)")
    offload_params: bool = Field(False, description="parameters in host memory (ZeRO-3 only)")
    compile: Literal["off", "dense", "blocks"] = Field("off", description=(
        "torch.compile in place (training/compile.py): off; dense (norms, attention, SwiGLU FFNs, LM head; the "
        "MoE layer eager); blocks (whole blocks, MoE included, with graph breaks)"))

    @model_validator(mode="after")
    def _check_combinations(self) -> "EngineConfig":
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage=3 (got zero_stage={self.zero_stage}): "
                             "only ZeRO-3 partitions the parameters it would offload")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1: ZeRO-0 keeps the optimizer "
                             "states inside the client optimizer, where DeepSpeed cannot move them")
        return self


class CurriculumConfig(Strict):
    """basic only -> + advanced -> + expert and all domains, at fractions of the steps."""

    enabled: bool = Field(True, description="false: every pool from step 0 (plain shuffled order)")
    boundaries: tuple[float, float] = Field((0.2, 0.6), description=(
        "where phases 2 and 3 start, fractions of steps"))
    early_domains: list[str] | None = Field(None, description="domains of phases 1-2; None = all domains")

    @field_validator("boundaries")
    @classmethod
    def _ordered(cls, b: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= b[0] <= b[1] <= 1:
            raise ValueError(f"boundaries {list(b)} must satisfy 0 <= first <= second <= 1")
        return b


class DataConfig(Strict):
    """Packing, batch sizes, the validation split and the domain mixture."""

    seq_len: int = Field(128, ge=8, description="tokens per training sequence")
    micro_batch: int = Field(4, ge=1, description="sequences per worker per forward")
    global_batch: int = Field(16, ge=1, description="sequences per optimizer step, all workers together")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="documents held out for validation, by id hash")
    val_max_sequences: int = Field(32, ge=1, description="validation sequences per (domain, difficulty)")
    domain_weights: dict[str, float] = Field(default_factory=dict, description="relative; {} = token shares")
    text_column: str = Field("text", description="the Parquet column to tokenize")
    curriculum: CurriculumConfig = CurriculumConfig()

    @field_validator("domain_weights")
    @classmethod
    def _non_negative(cls, w: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in w.items() if v < 0}
        if bad:
            raise ValueError(f"negative weight(s) {bad}")
        if w and not sum(w.values()) > 0:
            raise ValueError("at least one domain weight must be positive")
        return w


class ModelSection(Strict):
    """A model preset of training/model.py plus field overrides (vocab_size comes from the tokenizer)."""

    preset: str = Field("tiny", description="tiny | small | moe-1b (training/model.py PRESETS)")
    overrides: dict[str, Any] = Field(default_factory=dict, description=(
        "ModelConfig fields, e.g. {n_layers: 2}"))

    @model_validator(mode="after")
    def _valid(self) -> "ModelSection":
        self.build(vocab_size=self.overrides.get("vocab_size", 8192))  # a bad preset or field fails here
        return self

    def build(self, vocab_size: int):
        from training.model import ModelConfig  # torch: only when a recipe has a model
        return ModelConfig.from_preset(self.preset, **{**self.overrides, "vocab_size": vocab_size})


class CheckpointConfig(Strict):
    """Elastic checkpoints: a gang restart or a rerun resumes from the newest."""

    every: int = Field(50, ge=1, description="steps between checkpoints; one more at the end")
    keep: int = Field(2, ge=1, description="newest checkpoints kept")


class TrainConfig(Strict):
    """What every training stage shares: steps, engine, checkpoints, evaluation, safety limits."""

    steps: int = Field(200, ge=1, description="optimizer steps")
    engine: EngineConfig = EngineConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval_every: int = Field(50, ge=1, description="steps between validation passes; one more at the end")
    max_nonfinite: int = Field(5, ge=1, description="abort after this many non-finite steps in a row")
    peak_flops: float | None = Field(None, gt=0, description="per device, for MFU; None on CPU = measured")


class PretrainConfig(TrainConfig):
    """One pretraining run: model, engine, data, checkpoints, evaluation, safety limits."""

    steps: int = Field(200, ge=1, description="optimizer steps (the curriculum's budget)")
    model: ModelSection = Field(default_factory=ModelSection, description="built lazily: torch only when used")
    data: DataConfig = DataConfig()

    @model_validator(mode="after")
    def _fits(self) -> "PretrainConfig":
        max_len = self.model.build(8192).max_seq_len
        if self.data.seq_len > max_len:
            raise ValueError(f"data.seq_len={self.data.seq_len} exceeds the model's max_seq_len={max_len}")
        if self.data.global_batch % self.data.micro_batch:
            raise ValueError(f"data.global_batch={self.data.global_batch} must be a multiple of "
                             f"data.micro_batch={self.data.micro_batch}")
        return self


_LORA_PATTERNS = {"attention": r".*\.attn\.(wq|wk|wv|wo)",
                  "dense": r".*\.ffn(\.shared)?\.(w_gate|w_up|w_down)"}


class LoraConfig(Strict):
    """Low-rank adapters instead of full fine-tuning; merged into the saved model."""

    enabled: bool = Field(False, description=(
        "true: train LoRA adapters only (peft), merged into the saved model"))
    r: int = Field(16, ge=1, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scale alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    targets: list[Literal["attention", "dense"]] = Field(
        default_factory=lambda: ["attention", "dense"], min_length=1, description=(
            "attention: wq/wk/wv/wo; dense: dense-layer and shared-expert SwiGLU (routed experts stay "
            "frozen)"))

    def target_regex(self) -> str:
        return "(" + "|".join(_LORA_PATTERNS[t] for t in self.targets) + ")$"


class SftDataConfig(Strict):
    """Sequences, batches, packing, the family mixture and the difficulty curriculum."""

    seq_len: int = Field(512, ge=8, description=(
        "longest example (the packed row's length); longer ones are left out (counted)"))
    micro_batch: int = Field(8, ge=1, description="sequences per worker per forward")
    global_batch: int = Field(32, ge=1, description="sequences per optimizer step, all workers together")
    packing: bool = Field(True, description=(
        "true: whole examples packed into rows (block-diagonal mask); false: padded micro-batches (sorted by "
        "length within each rank's share). Packing: 0.91 real tokens vs 0.63-0.70 (BENCHMARKS.md)"))
    family_weights: dict[str, float] = Field(default_factory=dict, description="relative; {} = example shares")
    curriculum: CurriculumConfig = Field(CurriculumConfig(enabled=False), description=(
        "by task difficulty, as in pretraining"))
    val_max_examples: int = Field(64, ge=0, description=(
        "held-out examples (eval split) for the validation loss"))


class SftConfig(TrainConfig):
    """One SFT run: steps, engine, data, LoRA, checkpoints, evaluation cadence, safety limits."""

    steps: int = Field(300, ge=1, description="optimizer steps")
    engine: EngineConfig = EngineConfig(optimizer=OptimizerConfig(lr=1e-3, warmup_steps=10))
    data: SftDataConfig = SftDataConfig()
    lora: LoraConfig = LoraConfig()

    @model_validator(mode="after")
    def _batches(self) -> "SftConfig":
        if self.data.global_batch % self.data.micro_batch:
            raise ValueError(f"data.global_batch={self.data.global_batch} must be a multiple of "
                             f"data.micro_batch={self.data.micro_batch}")
        return self
