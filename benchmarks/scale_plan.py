"""The planner's figures for docs/scale.md: the seeds' MoE shape (16 routed experts, top-2, shared
experts) at ~1B, 2.3B (the moe-1b preset), 16B and 100B+ total parameters.

    .venv/bin/python benchmarks/scale_plan.py > /tmp/scale.md     # CPU, a second

Memory per GPU comes from training/plan.py (DeepSpeed's model-state accounting, an activation
estimate); communication is per GPU, for the data-parallel collectives of each ZeRO stage (ring
reduce-scatter / all-gather move (W-1)/W of the buffer) and for expert parallelism's all-to-all
(dispatch and combine, forward and backward).
"""
from __future__ import annotations

from training.config import EngineConfig
from training.model import ModelConfig, flops_per_token, param_counts
from training.plan import GiB, largest_layer_params, memory_per_gpu

SEQ, MICRO = 4096, 1
SHAPES = {
    "~1B": dict(vocab_size=65536, d_model=1024, n_layers=16, n_heads=8, n_kv_heads=4, n_dense_layers=1,
                dense_hidden=4096, n_experts=16, top_k=2, expert_hidden=704, n_shared_experts=2, max_seq_len=SEQ),
    "moe-1b (2.3B)": dict(preset="moe-1b"),
    "~17B": dict(vocab_size=65536, d_model=2048, n_layers=28, n_heads=16, n_kv_heads=8, n_dense_layers=1,
                 dense_hidden=10944, n_experts=16, top_k=2, expert_hidden=5632, n_shared_experts=2, max_seq_len=SEQ),
    "~130B": dict(vocab_size=65536, d_model=5120, n_layers=60, n_heads=40, n_kv_heads=8, n_dense_layers=1,
                  dense_hidden=27648, n_experts=16, top_k=2, expert_hidden=7680, n_shared_experts=2, max_seq_len=SEQ),
}


def config(shape: dict) -> ModelConfig:
    shape = dict(shape)
    preset = shape.pop("preset", "tiny")
    return ModelConfig.from_preset(preset, **shape)


def gib(x: float) -> str:
    return f"{x / GiB:,.1f}"


def main() -> None:
    print(f"Sequences of {SEQ} tokens, micro-batch {MICRO}, bf16, activation checkpointing on.\n")
    print("| shape | total | active | largest layer | GFLOP/token | ZeRO-2 W=8 | ZeRO-2 W=64 | ZeRO-3 W=8 | "
          "ZeRO-3 W=64 | ZeRO-3 W=256 | ZeRO-3 W=256 + optimizer offload |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, shape in SHAPES.items():
        cfg = config(shape)
        n = param_counts(cfg)
        cells = []
        for z, w, off in ((2, 8, False), (2, 64, False), (3, 8, False), (3, 64, False), (3, 256, False), (3, 256, True)):
            eng = EngineConfig(zero_stage=z, precision="bf16", activation_checkpointing=True, offload_optimizer=off)
            cells.append(gib(memory_per_gpu(cfg, eng, world=w, seq_len=SEQ, micro_batch=MICRO).total))
        print(f"| {name} | {n['total'] / 1e9:.2f}B | {n['active'] / 1e9:.2f}B | {largest_layer_params(cfg) / 1e6:,.0f}M "
              f"| {flops_per_token(cfg, SEQ) / 1e9:.1f} | " + " | ".join(cells) + " |")
    w = 64
    print(f"\nCommunication per GPU (GiB) at W={w}: ZeRO-2 reduce-scatters the gradients in every micro-batch's "
          "backward and all-gathers the updated weights once a step; ZeRO-3 also all-gathers the weights in "
          "every micro-batch's forward and backward; expert parallelism's all-to-all moves each token's "
          f"hidden state to its top-k experts and back, forward and backward ({SEQ * MICRO} tokens per GPU "
          "per micro-batch):\n")
    print("| shape | gradients, per micro-batch | weights, per step (ZeRO-1/2) | weights, per micro-batch "
          "(ZeRO-3) | expert all-to-all, per micro-batch |")
    print("|---|---:|---:|---:|---:|")
    ring = (w - 1) / w
    for name, shape in SHAPES.items():
        cfg = config(shape)
        n = param_counts(cfg)["total"]
        moe_layers = cfg.n_layers - cfg.n_dense_layers
        a2a = 4 * SEQ * MICRO * cfg.top_k * cfg.d_model * 2 * moe_layers * ring  # 2 directions x fwd/bwd, bf16
        print(f"| {name} | {gib(2 * n * ring)} | {gib(2 * n * ring)} | {gib(2 * 2 * n * ring)} | {gib(a2a)} |")


if __name__ == "__main__":
    main()
