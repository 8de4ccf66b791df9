"""torch.compile of the model's dense parts (``EngineConfig.compile``), in place.

    compile_model(model, "dense")    # norms, attention, SwiGLU FFNs (dense layers and shared
                                     # experts) and the LM head; the MoE layer (routing, dispatch) eager
    compile_model(model, "blocks")   # every whole Block, MoE layer included (the compiler breaks
                                     # its graph where the router's choices set the shapes)

``nn.Module.compile`` compiles a module where it stands: parameter names, state dicts and
DeepSpeed checkpoints stay those of the eager model, so a compiled run resumes from an eager
checkpoint and the other way round. The MoE dispatch (sorting tokens by expert, one grouped GEMM
over per-expert row counts) has data-dependent shapes, which is why "dense" leaves it eager.
Compilation happens on a module's first call; on CPU the default is "off" (inductor's C++
compile costs more than the tiny CPU models gain).
"""
from __future__ import annotations

from typing import Literal

from torch import nn

CompileMode = Literal["off", "dense", "blocks"]


def compile_targets(model: nn.Module, mode: CompileMode) -> list[nn.Module]:
    """The modules that ``mode`` compiles, in model order (the Transformer is found inside
    wrappers such as a LoRA model)."""
    from training.model import MoE, SwiGLU, Transformer
    if mode == "off":
        return []
    net = next((m for m in model.modules() if isinstance(m, Transformer)), None)
    if net is None:
        raise ValueError(f"engine.compile={mode!r}: {type(model).__name__} holds no r1pipe Transformer")
    if mode == "blocks":
        return list(net.blocks)
    targets: list[nn.Module] = []
    for block in net.blocks:
        targets += [block.attn_norm, block.attn, block.ffn_norm]
        if isinstance(block.ffn, SwiGLU):
            targets.append(block.ffn)
        elif isinstance(block.ffn, MoE) and block.ffn.shared is not None:
            targets.append(block.ffn.shared)
    return targets + [net.norm, net.lm_head]


def compile_model(model: nn.Module, mode: CompileMode, *, backend: str = "inductor") -> int:
    """Compile ``mode``'s modules in place; returns how many. ``backend`` other than inductor
    is for tests (``aot_eager`` traces the same graphs without generating code)."""
    if mode not in ("off", "dense", "blocks"):
        raise ValueError(f"engine.compile: {mode!r} is not one of off, dense, blocks")
    targets = compile_targets(model, mode)
    for module in targets:
        module.compile(backend=backend)
    return len(targets)
