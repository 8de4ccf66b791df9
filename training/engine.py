"""The DeepSpeed seam: the only module of r1pipe that imports deepspeed.

Our typed ``EngineConfig`` becomes a DeepSpeed config dict; ``Engine`` wraps the
DeepSpeed engine with the few calls a training loop needs (OpenRLHF's strategy
object, smaller): ``train_step`` (micro-batches -> one optimizer step, with a
non-finite loss skipping the step), ``evaluate_batch``, ``save``/``load``, and
``full_state_dict`` for the final model. ``FrozenModel`` is the same seam for a model
that never trains (a DPO or RL reference, a reward model): no optimizer, no gradients,
eval mode, its weights sharded under ZeRO-3 like a trained model's.

    cfg = EngineConfig(zero_stage=2, precision="bf16")
    engine = Engine(model, cfg, micro_batch=4, global_batch=32, total_steps=1000)
    result = engine.train_step([(x_BT, y_BT), ...])      # one list per optimizer step; LM + aux loss
    result = engine.train_step(batches, loss_fn=my_loss)  # any loss: my_loss(model, batch) -> (loss, metrics)
    engine.save("ckpt/step_000100")                       # every rank calls it
    engine.load("ckpt/step_000100")                       # same world size
    to_universal("ckpt/step_000100", zero_stage=2)        # then Engine(..., load_universal=True)
    ref = FrozenModel.from_folder("runs/r1/sft/model", cfg)  # ref(ids_BT).logits, no grad

The loss and its metrics are averaged over micro-batches and ranks, DeepSpeed's own
convention (it divides each backward by the accumulation steps and averages gradients over
ranks). A loss that must be normalised by a count over the whole global batch (response
tokens in SFT) scales itself: ``sum / global_count * micro_batches_per_step * world``.

The MoE decision. Our experts are stacked ``nn.Parameter``s of ``training.model.MoE``
(one (E, D, F) tensor per projection), not DeepSpeed's native MoE layer. To DeepSpeed
they are ordinary weights, so every ZeRO stage applies to them, ZeRO-3 included: its
parameter hooks gather the whole stacked tensor when the MoE module runs. We do not use
DeepSpeed's expert parallelism: it needs ``deepspeed.moe.layer.MoE``, which refuses
ZeRO-3, has its own routing math and checkpoint layout, and would split the model
across two code paths. GPU runs default to ZeRO-2 (params replicated, grads and Adam
states sharded; fine up to a few billion parameters on 80 GB devices) and use ZeRO-3
above that; the CPU demo uses ZeRO-1, whose per-step cost on CPU is lowest (BENCHMARKS.md).
Expert parallelism becomes worth its cost only when one device can no longer hold a
layer's experts even with ZeRO-3's gather, which none of our presets reach.

Non-finite steps. A loss that is NaN/inf on any rank skips the whole optimizer step on
every rank: the flag is all-reduced before the accumulation boundary. DeepSpeed skips
by itself where it checks gradients (ZeRO-1/2, bf16 without ZeRO); elsewhere (fp32 ZeRO-0,
ZeRO-3) our client optimizer and LR scheduler see the same flag and do nothing, so
parameters, Adam moments and the LR schedule are untouched by a skipped step.
"""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from training.compile import compile_model
from training.config import EngineConfig, OptimizerConfig
from training.distributed import collective_device  # noqa: F401 - part of the seam's API

DS_TAG = "ds"              # DeepSpeed's own tag folder inside one checkpoint folder
UNIVERSAL = "universal"    # ds_to_universal's output, beside DS_TAG
_QUIET = 1 << 30           # steps_per_print: DeepSpeed's own progress lines are noise here


def accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Micro-batches per optimizer step; the global batch stays fixed when the world changes."""
    if global_batch % (micro_batch * world_size):
        raise ValueError(f"data.global_batch={global_batch} must be a multiple of data.micro_batch="
                         f"{micro_batch} x {world_size} workers")
    return global_batch // (micro_batch * world_size)


def deepspeed_config(cfg: EngineConfig, *, micro_batch: int, global_batch: int, world_size: int,
                     load_universal: bool = False) -> dict:
    """The DeepSpeed JSON config for our typed one."""
    gas = accumulation_steps(global_batch, micro_batch, world_size)
    # the contiguous gradient buffer fights GPU memory fragmentation; on CPU it is only
    # an extra copy of every gradient per micro-batch (~15% of a tiny model's step, measured)
    zero: dict = {"stage": cfg.zero_stage, "contiguous_gradients": torch.cuda.is_available()}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.zero_stage == 3:
        # gather whole stacked expert tensors at once, never in pieces
        zero["stage3_param_persistence_threshold"] = 0
    bf16 = {"enabled": cfg.precision == "bf16"}
    if bf16["enabled"]:
        bf16["check_grad_overflow"] = True  # ZeRO-1/2 skip non-finite gradient steps in bf16 too
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": bf16,
        # our client AdamW: DeepSpeed would otherwise insist on its own (CPU) Adam
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": _QUIET,
        "wall_clock_breakdown": False,
    }


def lr_at(step: int, cfg: OptimizerConfig, total_steps: int) -> float:
    """Linear warmup to lr, then cosine down to min_lr_ratio * lr at total_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _scalar(value: torch.Tensor | float) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().double().cpu().reshape(())
    return torch.tensor(float(value), dtype=torch.float64)


class _SkipFlag:
    """Shared by the optimizer and the scheduler: set for a step whose loss was not finite."""
    value = False


class _SkippableAdamW(torch.optim.AdamW):
    def __init__(self, params, skip: _SkipFlag, **kwargs):
        super().__init__(params, **kwargs)
        self._skip = skip

    @property
    def overflow(self) -> bool:
        # DeepSpeed reads `optimizer.overflow` after step() when it drives this optimizer
        # directly (fp32 ZeRO-0): True makes it count a skipped step and hold the scheduler
        return self._skip.value

    def step(self, closure=None):
        if self._skip.value:
            return None
        return super().step(closure)


class _WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    def __init__(self, optimizer, cfg: OptimizerConfig, total_steps: int, skip: _SkipFlag):
        self._skip = skip
        super().__init__(optimizer, lambda s: lr_at(s, cfg, total_steps) / cfg.lr)

    def step(self, epoch=None):
        if not self._skip.value:
            super().step(epoch)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # matrices decay; norms' gains and 1-D vectors do not (GPT-2/nanoGPT convention)
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def ensure_process_group() -> None:
    """A group of one for single-process runs (NCCL on a CUDA device, else gloo); Ray Train's
    group is reused as is.

    DeepSpeed's CPU shared-memory all-reduce serves inference only, yet loading it probes
    every op builder and JIT-compiles one (40 s on a fresh machine, NOTES.md); marking it
    unavailable makes DeepSpeed use torch.distributed's all-reduce, as training does anyway.
    """
    deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
    if dist.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
        os.environ.setdefault(key, value)
    backend = "nccl" if get_accelerator().device_name() == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of storing them.

    Non-reentrant torch checkpointing works with ZeRO-3's parameter hooks. The MoE load
    counters see each forward twice; bias balancing only uses the sign of load - mean,
    which doubling leaves unchanged.
    """
    for block in model.blocks:
        forward = block.forward
        block.forward = lambda *args, _f=forward: torch_checkpoint(_f, *args, use_reentrant=False)


Batch = Any  # whatever a loss function takes: a tuple of tensors, a dict, a dataclass
LossFn = Callable[[nn.Module, Batch], "tuple[torch.Tensor, dict[str, torch.Tensor | float]]"]


def lm_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pretraining's loss: next-token cross-entropy plus the MoE balance loss."""
    x, y = batch
    out = model(x, y)
    return out.loss + out.aux_loss, {"lm_loss": out.loss, "aux_loss": out.aux_loss}


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Every tensor of a (nested) tuple, list or dict batch moved to device."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


@dataclass
class StepResult:
    loss: float            # mean over micro-batches and ranks
    grad_norm: float | None
    lr: float
    skipped: bool          # the loss was not finite somewhere: no update happened
    metrics: dict[str, float] = field(default_factory=dict)  # the loss function's, same means


class _Wrapped:
    """What both wrappers expose of their DeepSpeed engine (``self.ds``)."""

    ds: Any

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    @property
    def device(self) -> torch.device:
        return self.ds.device


class Engine(_Wrapped):
    """One DeepSpeed engine around a model; the loss is a function of the model and a batch."""

    def __init__(self, model: nn.Module, cfg: EngineConfig, *, micro_batch: int, global_batch: int,
                 total_steps: int, load_universal: bool = False):
        ensure_process_group()
        self.cfg = cfg
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        compile_model(model, cfg.compile)  # in place: parameter names and checkpoints unchanged
        self._skip = _SkipFlag()
        opt = cfg.optimizer
        fused = torch.cuda.is_available() if opt.fused is None else opt.fused
        optimizer = _SkippableAdamW(_param_groups(model, opt.weight_decay), self._skip, lr=opt.lr,
                                    betas=opt.betas, eps=opt.eps, fused=fused or None)
        ds_config = deepspeed_config(cfg, micro_batch=micro_batch, global_batch=global_batch,
                                     world_size=self.world_size, load_universal=load_universal)
        self.ds, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda o: _WarmupCosine(o, opt, total_steps, self._skip))
        self.gas = ds_config["gradient_accumulation_steps"]

    @property
    def lr(self) -> float:
        return self.ds.get_lr()[0]

    def train_step(self, micro_batches: list[Batch], loss_fn: LossFn = lm_loss) -> StepResult:
        """Forward/backward every micro-batch through loss_fn, then one optimizer step (or a skip).

        loss_fn(model, batch) returns the scalar loss to minimise and a dict of scalar metrics;
        the model is the DeepSpeed engine (call it like the module)."""
        if len(micro_batches) != self.gas:
            raise ValueError(f"train_step got {len(micro_batches)} micro-batches; the config needs {self.gas}")
        self.module.train()
        names: list[str] | None = None
        stats = None  # loss, metrics..., non-finite count
        lr = self.lr
        for i, batch in enumerate(micro_batches):
            loss, metrics = loss_fn(self.ds, to_device(batch, self.device))
            names = names if names is not None else list(metrics)
            if list(metrics) != names:
                raise ValueError(f"loss_fn returned metrics {names} on the first micro-batch, then {list(metrics)}: "
                                 "keep them the same")
            row = torch.stack([_scalar(loss), *(_scalar(metrics[k]) for k in names),
                               (~torch.isfinite(loss.detach())).double().cpu()])
            stats = row if stats is None else stats + row
            self.ds.backward(loss)
            if i == len(micro_batches) - 1:
                stats = self._all_reduce(stats)
                self._skip.value = bool(stats[-1] > 0)
                grad_norm = self._zero0_grad_norm()
            self.ds.step()
        skipped = self._skip.value or not self.ds.was_step_applied()
        self._skip.value = False
        n = len(micro_batches) * self.world_size
        norm = grad_norm if grad_norm is not None else self.ds.get_global_grad_norm()
        return StepResult(loss=float(stats[0] / n), grad_norm=None if norm is None else float(norm), lr=lr,
                          skipped=skipped, metrics={k: float(stats[1 + j] / n) for j, k in enumerate(names)})

    @torch.no_grad()
    def evaluate_batch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sequence summed next-token loss and token counts, (B, 2); every rank must call it
        the same number of times (ZeRO-3 gathers parameters collectively)."""
        self.module.eval()
        out = self.module(x.to(self.device))
        logits = out.logits.float()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.to(self.device).flatten(),
                                                ignore_index=-100, reduction="none").view(y.shape)
        counts = (y != -100).sum(1)
        self.module.train()
        return torch.stack([nll.sum(1).cpu().double(), counts.cpu().double()], dim=1)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            t = t.to(collective_device())
            dist.all_reduce(t)
        return t.cpu()

    def _zero0_grad_norm(self) -> float | None:
        # fp32 ZeRO-0 clips inside DeepSpeed without keeping the norm; the grads are already
        # all-reduced here (boundary backward), so every rank computes the same value
        if self.cfg.zero_stage != 0 or self.cfg.precision != "fp32":
            return None
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    # ---- checkpoints: every rank calls these

    def save(self, folder: str | Path) -> None:
        """DeepSpeed's model/optimizer/scheduler shards into folder/ds (this rank's part)."""
        self.ds.save_checkpoint(str(folder), tag=DS_TAG)

    def load(self, folder: str | Path, universal: bool = False) -> None:
        from training.safe_load import weights_only_loads
        tag = UNIVERSAL if universal else DS_TAG
        with weights_only_loads(checkpoint_classes()):  # DeepSpeed's reads would unpickle anything otherwise
            path, _ = self.ds.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise ValueError(f"checkpoint {folder}/{tag}: DeepSpeed found nothing to load")

    def full_state_dict(self, everywhere: bool = False) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on rank 0 (None elsewhere; on every rank with everywhere, as
        RL's rollout needs them); collective under ZeRO-3."""
        params = list(self.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.cfg.zero_stage == 3):
            if self.rank != 0 and not everywhere:
                return None
            return {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}


class FrozenModel(_Wrapped):
    """A model that never trains, under the same seam: no optimizer, no gradients, eval mode.

    With ``cfg.zero_stage == 3`` DeepSpeed partitions its weights over the ranks like a trained
    model's (ZeRO-Offload's inference path: each forward gathers a layer's weights, then frees
    them), so a reference or reward model costs 1/world of its size per rank; every rank must
    then call it the same number of times. Other stages keep one whole copy per rank (ZeRO
    stages 1-2 shard optimizer state and gradients, which a frozen model has none of). bf16
    precision casts the weights, since there are no fp32 master weights to keep.
    """

    def __init__(self, model: nn.Module, cfg: EngineConfig, *, micro_batch: int = 1):
        ensure_process_group()
        model.requires_grad_(False)
        model.eval()
        sharded = cfg.zero_stage == 3
        zero: dict = {"stage": 3 if sharded else 0}
        if sharded:
            zero["stage3_param_persistence_threshold"] = 0  # whole stacked expert tensors
            if cfg.offload_params:
                zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        bf16 = cfg.precision == "bf16"
        if bf16 and not sharded:
            model = model.to(torch.bfloat16)
        config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
                  "train_batch_size": micro_batch * dist.get_world_size(),
                  "zero_optimization": zero, "bf16": {"enabled": bf16 and sharded},
                  "steps_per_print": _QUIET, "wall_clock_breakdown": False}
        self.ds, _, _, _ = deepspeed.initialize(model=model, config=config)
        self.ds.eval()
        self.cfg = cfg
        self.sharded = sharded

    @classmethod
    def from_folder(cls, model_dir: str | Path, cfg: EngineConfig, *, micro_batch: int = 1) -> "FrozenModel":
        """A model folder written by a training stage (model.safetensors + config.json)."""
        from training.export import load_model
        return cls(load_model(model_dir), cfg, micro_batch=micro_batch)

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        """The model's forward, tensors moved to its device, never recording a graph."""
        return self.ds(*to_device(args, self.device), **to_device(kwargs, self.device))

    def local_numel(self) -> int:
        """Weights this rank holds: the whole model, or its 1/world shard under ZeRO-3."""
        return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                   for p in self.module.parameters())


def needs_universal(zero_stage: int, precision: str, saved_world: int, world: int) -> bool:
    """A checkpoint with partitioned optimizer state loads under another world size only
    after conversion; fp32 ZeRO-0 keeps it whole and loads anywhere."""
    partitioned = zero_stage > 0 or precision == "bf16"
    return partitioned and saved_world != world


def checkpoint_classes() -> list[type]:
    """The classes DeepSpeed's checkpoint files hold besides tensors and containers: what
    training/safe_load.py lets a weights-only load rebuild."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [_SkipFlag, LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def ds_to_universal_main(argv: list[str]) -> None:
    """DeepSpeed's ds_to_universal converter, every read a weights-only one."""
    from deepspeed.checkpoint import ds_to_universal

    from training.safe_load import weights_only_loads
    sys.argv = [sys.argv[0], *argv]
    with weights_only_loads(checkpoint_classes()):
        ds_to_universal.main(ds_to_universal.parse_arguments())


def to_universal(folder: str | Path, zero_stage: int) -> Path:
    """Convert folder/ds into folder/universal (DeepSpeed's resharding format), once."""
    folder = Path(folder)
    out = folder / UNIVERSAL
    done = folder / ".universal.done"
    if done.exists():
        return out
    cmd = [sys.executable, "-m", "training.safe_load",  # ds_to_universal, reading with weights_only=True
           "--input_folder", str(folder / DS_TAG), "--output_folder", str(out),
           "--num_extract_workers", "1", "--num_merge_workers", "1"]
    if zero_stage == 2:
        cmd.append("--inject_missing_state")  # ZeRO-2 files lack a field the converter wants
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed on {folder}:\n{proc.stderr[-2000:]}")
    done.write_text("ok\n")
    return out
