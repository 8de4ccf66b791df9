"""`r1pipe plan RECIPE`: what each training stage of a recipe needs on a GPU cluster, before it runs.

    r1pipe plan recipes/cluster.yaml --preset h100-80g-x8 --nodes 2 --mfu 0.35

For every training stage: parameters (total, active), memory per GPU for its ZeRO stage and
precision (weights, gradients, optimizer, activations at its sequence length and micro-batch,
frozen copies such as DPO's reference), the largest micro-batch that fits, and the step time from
the model's FLOPs at a stated MFU. A stage whose estimate passes the GPU's memory, or whose gang
needs more GPUs than the nodes have, gets a warning naming it. The figures are training/plan.py's
(DeepSpeed's model-state accounting plus an activation estimate); they plan, they do not measure.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.config import PipelineConfig
from training.plan import GiB, GpuPreset, largest_micro_batch, memory_per_gpu, step_seconds


@dataclass
class StagePlan:
    stage: str
    world: int
    engine: str
    params_total: int
    params_active: int
    seq_len: int
    micro_batch: int          # sequences per forward (a preference pair is two)
    tokens_per_step: int
    memory: dict              # GiB per GPU: weights, gradients, optimizer, activations, frozen, total
    largest_micro_batch: int
    step_seconds: float
    warnings: list[str]


def _model_config(cfg: PipelineConfig):
    """The recipe's model: the pretrain section's preset at the tokenizer's vocabulary."""
    if "pretrain" not in cfg.stages:
        raise ValueError("r1pipe plan needs the recipe's model: put `pretrain` in stages (its `model:` "
                         "section is the shape every later training stage trains)")
    vocab = cfg.section("tokenizer").vocab_size if "tokenizer" in cfg.stages else 8192
    return cfg.section("pretrain").model.build(vocab)


def _shape(name: str, section, model) -> tuple[int, int, int, int, int]:
    """(sequence length, sequences per micro-batch, tokens per step, frozen copies, trained copies)."""
    data = getattr(section, "data", None)
    if name.startswith("prl_"):
        # rollouts: prompt and completion up to the model's context; the reference and the rollout
        # copy, where they share the gang's GPUs (not actor groups of their own), are frozen; a
        # separate critic is a second model
        seq = model.max_seq_len
        critic = section.critic or ("separate" if section.algorithm == "ppo" else "none")
        frozen = (section.roles.reference.workers == 0) + (section.rollout.workers == 0)
        return seq, section.micro_batch, section.minibatch * seq, frozen, 2 if critic == "separate" else 1
    pairs = name in ("dpo", "reward_model")
    per = 2 if pairs else 1  # chosen and rejected go through together
    reference = int(name == "dpo" and section.loss.name != "simpo")
    return data.seq_len, per * data.micro_batch, per * data.global_batch * data.seq_len, reference, 1


def plan_recipe(cfg: PipelineConfig, preset: GpuPreset, *, nodes: int = 1, mfu: float = 0.4,
                overhead: float = 0.1) -> list[StagePlan]:
    """One StagePlan per training stage of the recipe (a stage with a gang), in run order."""
    from training.model import param_counts
    model = _model_config(cfg)
    counts = param_counts(model)
    plans = []
    for name in cfg.stages:
        section = cfg.section(name)
        if getattr(section, "gang", None) is None:
            continue
        world, engine = section.gang.num_workers, section.engine
        seq, micro, tokens, frozen, copies = _shape(name, section, model)
        mem = memory_per_gpu(model, engine, world=world, seq_len=seq, micro_batch=micro, frozen_copies=frozen)
        states = copies * mem.model_states
        total = states + mem.activations + mem.frozen
        fits = largest_micro_batch(model, engine, world=world, seq_len=seq, gpu_bytes=preset.gpu_bytes / copies,
                                   frozen_copies=frozen, overhead=overhead)
        warnings = []
        if total > preset.gpu_bytes * (1 - overhead):
            warnings.append(f"{name}: about {total / GiB:.1f} GiB per GPU, more than the "
                            f"{preset.gpu_bytes * (1 - overhead) / GiB:.0f} GiB a {preset.name} GPU leaves; "
                            f"lower {name} micro-batch (largest that fits: {fits}), raise engine.zero_stage, "
                            "or turn on engine.activation_checkpointing")
        if world > nodes * preset.gpus_per_node:
            warnings.append(f"{name}.gang: {world} workers need {world} GPUs; {nodes} node(s) of "
                            f"{preset.name} have {nodes * preset.gpus_per_node}")
        plans.append(StagePlan(
            name, world, f"ZeRO-{engine.zero_stage} {engine.precision}", counts["total"], counts["active"], seq,
            micro, tokens,
            {"weights": copies * mem.weights / GiB, "gradients": copies * mem.gradients / GiB,
             "optimizer": copies * mem.optimizer / GiB, "activations": mem.activations / GiB,
             "frozen": mem.frozen / GiB, "total": total / GiB},
            fits, step_seconds(model, seq_len=seq, tokens_per_step=tokens, world=world,
                               peak_flops=preset.peak_flops, mfu=mfu), warnings))
    return plans


def render(plans: list[StagePlan], preset: GpuPreset, mfu: float, console) -> None:
    from rich.table import Table
    table = Table(title=f"capacity plan on {preset.name} ({preset.gpu_bytes / GiB:.0f} GiB per GPU), "
                        f"step time at MFU {mfu:.2f} of {preset.peak_flops / 1e12:.0f} TFLOP/s")
    for col in ("stage", "GPUs", "engine", "params (active)", "seq x micro", "weights", "grads", "optim",
                "activ.", "frozen", "total GiB", "max micro", "step s"):
        table.add_column(col, justify="left" if col in ("stage", "engine") else "right")
    for p in plans:
        m = p.memory
        table.add_row(p.stage, str(p.world), p.engine, f"{_n(p.params_total)} ({_n(p.params_active)})",
                      f"{p.seq_len} x {p.micro_batch}", *(f"{m[k]:.2f}" for k in
                      ("weights", "gradients", "optimizer", "activations", "frozen", "total")),
                      str(p.largest_micro_batch), f"{p.step_seconds:.3g}")
    console.print(table)
    for p in plans:
        for warning in p.warnings:
            console.print(f"[yellow]warn[/]  {warning}")


def _n(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)
