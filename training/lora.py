"""LoRA adapters on the attention and dense layers, with peft; merged back before saving.

    model = add_lora(load_model("runs/r1/pretrain/model"), LoraConfig(enabled=True, r=16))
    ...train (only the adapters have requires_grad)...
    plain = merge_lora(model)          # a Transformer again, adapters folded into the weights

Targets are nn.Linear modules by name: ``attention`` = wq, wk, wv, wo of every block;
``dense`` = the SwiGLU projections of dense layers and of the shared experts. The routed
experts are stacked (E, D, F) parameters that peft cannot wrap; with LoRA they stay frozen,
as do the router, embeddings and lm_head.
"""
from __future__ import annotations

from torch import nn

from training.config import LoraConfig


def add_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """The model wrapped with adapters (peft.PeftModel); only adapter weights train."""
    import peft
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=cfg.target_regex(), bias="none")
    return peft.get_peft_model(model, config)


def merge_lora(model: nn.Module) -> nn.Module:
    """The base model with the adapters folded into its weights (W + B A * alpha / r)."""
    return model.merge_and_unload()
