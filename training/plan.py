"""Capacity planning for one training stage: memory per GPU and step time, from the model's shape.

    need = memory_per_gpu(cfg, engine, world=8, seq_len=4096, micro_batch=2)
    need.total / 2**30                              # GiB on each GPU
    largest_micro_batch(cfg, engine, world=8, seq_len=4096, gpu_bytes=80 * 2**30)

Model states follow DeepSpeed's own accounting (`estimate_zero2_model_states_mem_needs`,
`estimate_zero3_model_states_mem_needs`; tests/training/test_plan.py checks them against it), per
parameter, mixed bf16:
    weights     2 (bf16), replicated below ZeRO-3; ZeRO-3: 2/W plus the largest layer gathered
                (its bf16 weights and gradients: 4 per parameter of that layer)
    gradients   2 bf16 + 4 fp32; ZeRO-2/3 partition them (ZeRO-3 keeps only the fp32 part),
                ZeRO-0/1 keep the bf16 ones whole
    optimizer   4 fp32 master + 8 Adam moments, partitioned from ZeRO-1 on
fp32 training has no master copy: weights 4, gradients 4, optimizer 8. Offloading the optimizer
moves the fp32 gradients and optimizer to host memory; offloading parameters (ZeRO-3) the rest.

Activations are an estimate from the shapes (bf16 values kept for backward, attention through
SDPA/flash, so no T x T scores; the logits, their fp32 log-softmax and its gradient), per micro-batch: every layer's
inputs to its matmuls and nonlinearities, or with activation checkpointing only each block's input
plus one block recomputed. Not measured: real use adds allocator fragmentation and workspace,
which `overhead` (a fraction of the GPU) stands for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from training.config import EngineConfig
from training.model import ModelConfig, flops_per_token, param_counts

GiB = 2 ** 30


@dataclass(frozen=True)
class GpuPreset:
    name: str
    gpus_per_node: int
    gpu_bytes: int
    peak_flops: float  # dense bf16 of the spec, FLOP/s
    cpus_per_node: int
    host_bytes: int


PRESETS = {
    "a100-80g-x8": GpuPreset("a100-80g-x8", 8, 80 * GiB, 312e12, 96, 1024 * GiB),
    "h100-80g-x8": GpuPreset("h100-80g-x8", 8, 80 * GiB, 989.4e12, 192, 2048 * GiB),
}


@dataclass(frozen=True)
class Memory:
    """Bytes on each GPU."""
    weights: float
    gradients: float
    optimizer: float
    activations: float
    frozen: float = 0.0  # frozen copies beside the trained model (a reference, a rollout copy)

    @property
    def model_states(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.activations + self.frozen


def largest_layer_params(cfg: ModelConfig) -> int:
    """Parameters of the largest module holding its own parameters (DeepSpeed's "largest layer"):
    the embedding or LM head (V x D), or an MoE layer's stacked experts."""
    experts = 3 * cfg.d_model * cfg.expert_hidden * cfg.n_experts  # the router is a module of its own
    return max(cfg.vocab_size * cfg.d_model, experts if cfg.n_layers > cfg.n_dense_layers else 0)


def model_states(cfg: ModelConfig, engine: EngineConfig, world: int) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes per GPU for the trained model."""
    n = param_counts(cfg)["total"]
    z = engine.zero_stage
    if engine.precision == "bf16":
        w16, g16, g32, master, moments = 2, 2, 4, 4, 8
    else:
        w16, g16, g32, master, moments = 4, 4, 0, 0, 8
    weights = w16 * n if z < 3 else w16 * n / world + 2 * w16 * largest_layer_params(cfg)
    grads_low = g16 * n / world if z == 2 else (0 if z == 3 else g16 * n)
    grads_high = g32 * n / world if z >= 2 else g32 * n  # fp32 gradients (mixed precision)
    optimizer = (master + moments) * n / (world if z >= 1 else 1)
    if engine.offload_optimizer:
        grads_high, optimizer = 0.0, 0.0
        grads_low = 0.0 if z >= 2 else grads_low
    if engine.offload_params:
        weights = 2 * w16 * largest_layer_params(cfg)
    return float(weights), float(grads_low + grads_high), float(optimizer)


def activation_bytes(cfg: ModelConfig, seq_len: int, micro_batch: int, checkpointing: bool) -> float:
    """Activations kept for backward by one micro-batch (an estimate; see the module docstring)."""
    tokens = seq_len * micro_batch
    D, v = cfg.d_model, 2  # bf16
    kv = 2 * cfg.kv_heads * cfg.head_dim
    attention = D + D + (D + kv) + D + D  # norm in, qkv in, q k v, attention out, wo in
    dense_ffn = D + D + 4 * cfg.dense_hidden  # norm in, gate/up in, gate, up, silu, product
    shared = 4 * cfg.expert_hidden * cfg.n_shared_experts
    moe_ffn = D + D + cfg.top_k * (D + 4 * cfg.expert_hidden) + shared + 2 * cfg.n_experts  # router fp32
    per_layer = [attention + (dense_ffn if i < cfg.n_dense_layers else moe_ffn) for i in range(cfg.n_layers)]
    # the logits: bf16 from the head, their fp32 log-softmax kept by the loss, and its fp32
    # gradient at the start of backward (the peak), per token
    logits = cfg.vocab_size * (v + 4 + 4)  # bytes per token
    if checkpointing:
        kept = cfg.n_layers * D + max(per_layer)  # block inputs, plus one block recomputed
    else:
        kept = sum(per_layer)
    return float(tokens * (v * kept + logits))


def memory_per_gpu(cfg: ModelConfig, engine: EngineConfig, *, world: int, seq_len: int, micro_batch: int,
                   frozen_copies: int = 0) -> Memory:
    weights, grads, optimizer = model_states(cfg, engine, world)
    frozen = frozen_copies * param_counts(cfg)["total"] * (2 if engine.precision == "bf16" else 4)
    return Memory(weights, grads, optimizer,
                  activation_bytes(cfg, seq_len, micro_batch, engine.activation_checkpointing), frozen)


def largest_micro_batch(cfg: ModelConfig, engine: EngineConfig, *, world: int, seq_len: int, gpu_bytes: float,
                        frozen_copies: int = 0, overhead: float = 0.1) -> int:
    """The largest micro-batch whose estimate fits ``gpu_bytes`` less ``overhead`` of it (0: none)."""
    base = memory_per_gpu(cfg, engine, world=world, seq_len=seq_len, micro_batch=0, frozen_copies=frozen_copies)
    per_sequence = activation_bytes(cfg, seq_len, 1, engine.activation_checkpointing)
    room = gpu_bytes * (1 - overhead) - base.total
    return max(0, math.floor(room / per_sequence))


def step_seconds(cfg: ModelConfig, *, seq_len: int, tokens_per_step: int, world: int, peak_flops: float,
                 mfu: float) -> float:
    """Seconds per optimizer step at ``mfu`` of ``peak_flops`` on each of ``world`` GPUs."""
    return flops_per_token(cfg, seq_len) * tokens_per_step / (world * peak_flops * mfu)
