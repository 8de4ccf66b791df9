"""Our model folder (safetensors + config) and its export to HF transformers' Qwen2-MoE.

    save_model(model, "runs/r1/pretrain/model")           # model.safetensors + config.json
    model = load_model("runs/r1/pretrain/model")          # safetensors only, never pickle
    export_hf(model, "out/hf", tokenizer=tok)             # loads with AutoModelForCausalLM, no custom code
    export_folder("runs/r1/sft/model", "out/hf")          # the same from a stage's model folder

The mapping onto Qwen2MoeForCausalLM (checked against transformers' modeling_qwen2_moe.py):
  - RoPE: both use the half-split rotate_half convention and the same inverse frequencies;
  - RMSNorm: both normalise in fp32 and cast back before the gain; eps is rms_norm_eps;
  - attention: Qwen2 has q/k/v biases, exported as zeros; grouped-query heads map one to one;
  - router: softmax over x W^T, top-k, optional renormalisation (norm_topk_prob), like ours;
    our temperature is folded in as W / T;
  - shared experts: ours are one SwiGLU n_shared * expert_hidden wide; Qwen2-MoE multiplies
    its shared expert by sigmoid(x w_g), so w_g = 0 gives 0.5 and down_proj is doubled;
  - dense first layers: mlp_only_layers with intermediate_size = dense_hidden.
Export refuses, with a ValueError, what Qwen2-MoE would compute differently.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from training.model import MoE, ModelConfig, SwiGLU, Transformer
from training.tokenizer import BOS, EOS, PAD, load_tokenizer, save_tokenizer

WEIGHTS, CONFIG = "model.safetensors", "config.json"
REWARD_CONFIG = "reward_model.json"  # marks a reward model folder (rl/reward_model.py)


# ----------------------------------------------------------------------------- our own folder


def save_model(model: Transformer, out_dir: str | Path) -> Path:
    """model.safetensors (weights + expert biases) and config.json (our ModelConfig)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(model.cfg.model_dump(), indent=2) + "\n")
    return out


def refuse_reward_model(folder: Path) -> None:
    if (folder / REWARD_CONFIG).is_file():
        raise ValueError(f"model folder {str(folder)!r} holds a reward model, not a language model "
                         f"(score with rl.reward_model.RewardScorer)")


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """The ModelConfig of save_model's folder, without reading the weights."""
    folder = Path(model_dir)
    refuse_reward_model(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
        raise ValueError(f"model folder {str(folder)!r}: needs {WEIGHTS} and {CONFIG}")
    raw = json.loads((folder / CONFIG).read_text())
    if "model_type" in raw:
        raise ValueError(f"model folder {str(folder)!r} holds a transformers export, not an r1pipe model")
    return ModelConfig.model_validate(raw)


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """Rebuild a Transformer from save_model's folder; reads safetensors only."""
    folder = Path(model_dir)
    model = Transformer(load_model_config(folder))
    model.load_state_dict(load_file(str(folder / WEIGHTS), device=str(device)), strict=True)
    return model.to(device)


# ----------------------------------------------------------------------------- Qwen2-MoE export


def check_exportable(model: Transformer) -> None:
    """Raise ValueError for anything Qwen2-MoE cannot compute exactly as we do."""
    for i, moe in model.moe_layers().items():
        bias = moe.expert_bias
        # a uniform bias leaves every top-k unchanged, so only an uneven one changes routing
        if model.cfg.balance == "bias" and not torch.all(bias == bias[0]):
            raise ValueError(
                f"balance='bias': layer {i} has a non-uniform expert_bias (range "
                f"{bias.min().item():.4g}..{bias.max().item():.4g}); it changes which experts are "
                "selected and Qwen2-MoE routes by router probabilities alone, so the export would "
                "compute a different model")
    # capacity_factor needs no check: tokens are dropped only in training, never at inference


def hf_config(cfg: ModelConfig, special: dict[str, int] | None = None) -> dict:
    special = special or {}
    return {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x reads this key, 5.x rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "qkv_bias": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(cfg.n_dense_layers)),
        "intermediate_size": cfg.dense_hidden,
        "moe_intermediate_size": cfg.expert_hidden,
        "shared_expert_intermediate_size": cfg.expert_hidden * cfg.n_shared_experts,
        "num_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.top_k,
        "norm_topk_prob": cfg.norm_topk_prob,
        "router_aux_loss_coef": cfg.aux_loss_coef,
        "output_router_logits": False,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "bos_token_id": special.get(BOS),
        "eos_token_id": special.get(EOS),
        "pad_token_id": special.get(PAD),
    }


def _attention_tensors(p: str, blk) -> dict[str, torch.Tensor]:
    attn = blk.attn
    out = {f"{p}.input_layernorm.weight": blk.attn_norm.weight,
           f"{p}.post_attention_layernorm.weight": blk.ffn_norm.weight,
           f"{p}.self_attn.o_proj.weight": attn.wo.weight}
    for ours, hf in ((attn.wq, "q_proj"), (attn.wk, "k_proj"), (attn.wv, "v_proj")):
        out[f"{p}.self_attn.{hf}.weight"] = ours.weight
        out[f"{p}.self_attn.{hf}.bias"] = ours.weight.new_zeros(ours.weight.shape[0])  # we have none
    return out


def _swiglu_tensors(p: str, mlp: SwiGLU, down_scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {f"{p}.gate_proj.weight": mlp.w_gate.weight,
            f"{p}.up_proj.weight": mlp.w_up.weight,
            f"{p}.down_proj.weight": mlp.w_down.weight * down_scale}


def _moe_tensors(p: str, moe: MoE, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    # our router computes (x W^T) / T; W / T is the same map with T folded into the weight
    out = {f"{p}.gate.weight": moe.router.weight / cfg.router_temperature}
    for e in range(cfg.n_experts):  # the hub's per-expert layout, which 4.x and 5.x both load
        out[f"{p}.experts.{e}.gate_proj.weight"] = moe.w_gate[e].T  # (F, D)
        out[f"{p}.experts.{e}.up_proj.weight"] = moe.w_up[e].T  # (F, D)
        out[f"{p}.experts.{e}.down_proj.weight"] = moe.w_down[e].T  # (D, F)
    D = cfg.d_model
    # sigmoid(0) = 0.5 exactly, and doubling down_proj undoes it exactly (powers of two)
    out[f"{p}.shared_expert_gate.weight"] = moe.router.weight.new_zeros(1, D)
    if moe.shared is not None:
        out.update(_swiglu_tensors(f"{p}.shared_expert", moe.shared, down_scale=2.0))
    else:  # width 0: Qwen2-MoE always builds a shared expert, an empty one adds nothing
        empty = moe.router.weight.new_zeros
        out.update({f"{p}.shared_expert.gate_proj.weight": empty(0, D),
                    f"{p}.shared_expert.up_proj.weight": empty(0, D),
                    f"{p}.shared_expert.down_proj.weight": empty(D, 0)})
    return out


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under Qwen2MoeForCausalLM's (hub-layout) names."""
    out = {"model.embed_tokens.weight": model.embed.weight,
           "model.norm.weight": model.norm.weight,
           "lm_head.weight": model.lm_head.weight}
    for i, blk in enumerate(model.blocks):
        p = f"model.layers.{i}"
        out.update(_attention_tensors(p, blk))
        if isinstance(blk.ffn, MoE):
            out.update(_moe_tensors(f"{p}.mlp", blk.ffn, model.cfg))
        else:
            out.update(_swiglu_tensors(f"{p}.mlp", blk.ffn))
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def _generation_config(special: dict[str, int]) -> dict:
    stops = [special[t] for t in (EOS, "</answer>") if special.get(t) is not None]
    return {"bos_token_id": special.get(BOS), "eos_token_id": stops or None,
            "pad_token_id": special.get(PAD), "do_sample": False}


def export_hf(model: Transformer, out_dir: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write a folder that transformers.AutoModelForCausalLM.from_pretrained loads as Qwen2-MoE."""
    check_exportable(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special = {}
    if tokenizer is not None:
        if tokenizer.get_vocab_size() > model.cfg.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but the model's "
                             f"vocab_size is {model.cfg.vocab_size}")
        special = {t: tokenizer.token_to_id(t) for t in (BOS, EOS, PAD, "</answer>")}
        save_tokenizer(tokenizer, out, model_max_length=model.cfg.max_seq_len)
    save_file(hf_state_dict(model), str(out / WEIGHTS), metadata={"format": "pt"})
    dtype = str(model.embed.weight.dtype).removeprefix("torch.")
    config = {**hf_config(model.cfg, special), "torch_dtype": dtype}
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(_generation_config(special), indent=2) + "\n")
    return out


def export_folder(model_dir: str | Path, out_dir: str | Path,
                  tokenizer_path: str | Path | None = None) -> Path:
    """`r1pipe export`: a stage's model folder (+ its tokenizer.json when there is one) to OUT."""
    model_dir = Path(model_dir)
    if tokenizer_path is None and (model_dir / "tokenizer.json").is_file():
        tokenizer_path = model_dir
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path is not None else None
    return export_hf(load_model(model_dir), out_dir, tokenizer)


# ----------------------------------------------------------------------------- back from Qwen2-MoE


def config_from_hf(hf: dict) -> ModelConfig:
    """Our ModelConfig for a Qwen2-MoE config.json that export_hf wrote."""
    dense = hf.get("mlp_only_layers") or []
    if dense != list(range(len(dense))) or hf.get("decoder_sparse_step", 1) != 1:
        raise ValueError("config.json: only leading dense layers (mlp_only_layers = 0..k-1) and "
                         "decoder_sparse_step = 1 map onto r1pipe's model")
    shared = hf.get("shared_expert_intermediate_size", 0)
    if shared % hf["moe_intermediate_size"]:
        raise ValueError("config.json: shared_expert_intermediate_size is not a multiple of moe_intermediate_size")
    rope = hf.get("rope_parameters") or {}
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"),
        max_seq_len=hf["max_position_embeddings"], rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        norm_eps=hf["rms_norm_eps"], init_std=hf.get("initializer_range", 0.02), n_dense_layers=len(dense),
        dense_hidden=hf["intermediate_size"], n_experts=hf["num_experts"], top_k=hf["num_experts_per_tok"],
        expert_hidden=hf["moe_intermediate_size"], n_shared_experts=shared // hf["moe_intermediate_size"],
        norm_topk_prob=hf.get("norm_topk_prob", True), aux_loss_coef=hf.get("router_aux_loss_coef", 0.0))


def load_hf(folder: str | Path) -> Transformer:
    """A folder written by export_hf, back as our Transformer (the inverse of hf_state_dict), so a
    model that left the pipeline is evaluated by the very same code. Refuses what export_hf never
    writes: q/k/v biases or a shared-expert gate that are not zero."""
    folder = Path(folder)
    cfg = config_from_hf(json.loads((folder / CONFIG).read_text()))
    hf = load_file(str(folder / WEIGHTS))
    model = Transformer(cfg)
    ours = {k: v for k, v in model.state_dict().items() if not k.endswith("expert_bias")}
    template = hf_state_dict(model)  # the names and shapes export_hf gives each of our tensors
    missing = sorted(set(template) - set(hf))
    if missing:
        raise ValueError(f"{folder}/{WEIGHTS}: not an r1pipe export; missing {missing[:3]}")
    for name in template:
        if (name.endswith(("_proj.bias", "shared_expert_gate.weight"))) and hf[name].abs().max() > 0:
            raise ValueError(f"{folder}: {name} is not zero; r1pipe's model has no such term")
    state = {}
    for i, blk in enumerate(model.blocks):
        p = f"model.layers.{i}"
        state.update(_attention_from(p, i, hf))
        if isinstance(blk.ffn, MoE):
            state.update(_moe_from(f"{p}.mlp", i, hf, cfg))
        else:
            state.update({f"blocks.{i}.ffn.{ours_}": hf[f"{p}.mlp.{theirs}.weight"]
                          for ours_, theirs in (("w_gate.weight", "gate_proj"), ("w_up.weight", "up_proj"),
                                                ("w_down.weight", "down_proj"))})
    state.update({"embed.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
                  "lm_head.weight": hf["lm_head.weight"]})
    model.load_state_dict({**{k: v for k, v in model.state_dict().items() if k.endswith("expert_bias")},
                           **{k: state[k].to(ours[k].dtype) for k in ours}}, strict=True)
    return model


def _attention_from(p: str, i: int, hf: dict) -> dict[str, torch.Tensor]:
    b = f"blocks.{i}"
    return {f"{b}.attn_norm.weight": hf[f"{p}.input_layernorm.weight"],
            f"{b}.ffn_norm.weight": hf[f"{p}.post_attention_layernorm.weight"],
            f"{b}.attn.wq.weight": hf[f"{p}.self_attn.q_proj.weight"], f"{b}.attn.wk.weight": hf[f"{p}.self_attn.k_proj.weight"],
            f"{b}.attn.wv.weight": hf[f"{p}.self_attn.v_proj.weight"], f"{b}.attn.wo.weight": hf[f"{p}.self_attn.o_proj.weight"]}


def _moe_from(p: str, i: int, hf: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    b = f"blocks.{i}.ffn"
    out = {f"{b}.router.weight": hf[f"{p}.gate.weight"]}
    for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
        out[f"{b}.{ours}"] = torch.stack([hf[f"{p}.experts.{e}.{theirs}.weight"].T for e in range(cfg.n_experts)])
    if cfg.n_shared_experts:
        out[f"{b}.shared.w_gate.weight"] = hf[f"{p}.shared_expert.gate_proj.weight"]
        out[f"{b}.shared.w_up.weight"] = hf[f"{p}.shared_expert.up_proj.weight"]
        out[f"{b}.shared.w_down.weight"] = hf[f"{p}.shared_expert.down_proj.weight"] / 2.0  # export doubled it
    return out


def load_any(folder: str | Path) -> Transformer:
    """Our model folder or a transformers export of one."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise ValueError(f"{folder}: no {CONFIG}; expected a model folder (a stage's model/ or an export)")
    is_hf = "model_type" in json.loads((folder / CONFIG).read_text())
    return load_hf(folder) if is_hf else load_model(folder)
