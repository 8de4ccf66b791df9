"""A DeepSeek-style Mixture-of-Experts decoder, in pure torch.

Reads top to bottom: config and presets, the attention pieces (RMSNorm, RoPE,
KV cache, attention), the feed-forward pieces (dense SwiGLU, the MoE layer with
its router, dispatch and balancing), then the model and its parameter/FLOP
counts. It imports only torch and pydantic; the experts' grouped-matmul kernels
live beside it (training/moe_kernels.py), DeepSpeed and HF elsewhere.

Shape legend (suffixes on tensor names):
    B batch, T query length, S key length (cached + new),
    D d_model, H query heads, G key/value heads, Dh head dim,
    N tokens in a flat batch (B*T), E routed experts, K experts per token,
    M kept (token, expert) assignments, F expert hidden, V vocab.

    cfg = ModelConfig.from_preset("tiny", vocab_size=8192)
    model = Transformer(cfg)
    out = model(idx_BT, targets_BT)      # out.logits, out.aux_loss, out.loss
    (out.loss + out.aux_loss).backward(); opt.step(); model.update_router_bias()
"""
from __future__ import annotations

import math
from typing import Callable, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from training.moe_kernels import expert_matmul


class ModelConfig(BaseModel):
    """Every knob of the model; one typed tree, no other source of truth."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(8192, ge=1)
    d_model: int = Field(128, ge=2)
    n_layers: int = Field(4, ge=1)
    n_heads: int = Field(4, ge=1)
    n_kv_heads: int | None = Field(None, ge=1, description="None = n_heads (no grouped-query)")
    max_seq_len: int = Field(512, ge=1)
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-6, gt=0)
    init_std: float = Field(0.02, gt=0)
    # Dense SwiGLU layers before the first MoE layer (DeepSeek keeps the first ones dense).
    n_dense_layers: int = Field(0, ge=0)
    dense_hidden: int = Field(512, ge=1)
    # Routed experts, top-k routing with softmax(x W / router_temperature).
    n_experts: int = Field(4, ge=1)
    top_k: int = Field(2, ge=1)
    expert_hidden: int = Field(256, ge=1)
    n_shared_experts: int = Field(0, ge=0, description="each of width expert_hidden, seen by every token")
    router_temperature: float = Field(1.0, gt=0)
    norm_topk_prob: bool = True
    balance: Literal["aux_loss", "bias", "none"] = "aux_loss"
    aux_loss_coef: float = Field(0.01, ge=0)
    bias_update_rate: float = Field(1e-3, ge=0)
    capacity_factor: float | None = Field(None, gt=0, description="None = drop no token")
    expert_kernel: Literal["auto", "loop"] = Field(
        "auto", description="auto: one grouped GEMM per projection (torch._grouped_mm) for bf16 on "
                            "a Hopper GPU, no host sync; elsewhere, and with loop, one matmul per expert")

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dim d_model/n_heads={self.head_dim} must be even for RoPE")
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k={self.top_k} exceeds n_experts={self.n_experts}")
        if self.n_dense_layers > self.n_layers:
            raise ValueError(f"n_dense_layers={self.n_dense_layers} exceeds n_layers={self.n_layers}")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict] = {
    # trains on 2 CPU cores in the demo in a couple of minutes
    "tiny": dict(vocab_size=8192, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=512,
                 n_dense_layers=1, dense_hidden=512, n_experts=4, top_k=2, expert_hidden=256,
                 n_shared_experts=1),
    "small": dict(vocab_size=32768, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, max_seq_len=1024,
                  n_dense_layers=1, dense_hidden=2048, n_experts=8, top_k=2, expert_hidden=1024,
                  n_shared_experts=1),
    # cluster scale: 16 routed experts, top-2, plus 2 shared. The aux loss (not the bias) keeps it
    # exportable to Qwen2-MoE, which cannot express a selection-only bias
    "moe-1b": dict(vocab_size=65536, d_model=1536, n_layers=24, n_heads=12, n_kv_heads=4, max_seq_len=4096,
                   rope_theta=500000.0, n_dense_layers=1, dense_hidden=6144, n_experts=16, top_k=2,
                   expert_hidden=1024, n_shared_experts=2, aux_loss_coef=0.001),
}


# ----------------------------------------------------------------------------- attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics, cast back before the gain: the same order as Qwen2/Llama, so export matches in bf16
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions_BT: torch.Tensor, cfg: ModelConfig, dtype: torch.dtype):
    """cos/sin per (row, position); per-row positions are what make left padding work.

    The frequencies are rebuilt in fp32 on each call (Dh/2 numbers), not kept in a buffer that
    a .bfloat16() cast of the model would round.
    """
    dims = torch.arange(0, cfg.head_dim, 2, dtype=torch.float, device=positions_BT.device)
    inv_freq = 1.0 / cfg.rope_theta ** (dims / cfg.head_dim)  # the same expression as HF's default RoPE
    freqs_BTh = positions_BT[..., None].float() * inv_freq  # (B, T, Dh/2)
    emb_BTDh = torch.cat((freqs_BTh, freqs_BTh), dim=-1)  # (B, T, Dh)
    return emb_BTDh.cos().to(dtype), emb_BTDh.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # the half-split convention of HF Llama/Qwen2, so exported q/k weights need no permutation
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHTDh: torch.Tensor, cos_BTDh: torch.Tensor, sin_BTDh: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_BTDh[:, None], sin_BTDh[:, None]  # broadcast over heads
    return x_BHTDh * cos + rotate_half(x_BHTDh) * sin


class KVCache:
    """Preallocated keys/values of every layer, for incremental decoding."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layers, batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions already stored; advanced once per model forward

    def update(self, layer: int, k_BGTDh: torch.Tensor, v_BGTDh: torch.Tensor):
        end = self.length + k_BGTDh.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"KV cache holds {self.k.shape[3]} positions; {end} requested")
        self.k[layer, :, :, self.length:end] = k_BGTDh
        self.v[layer, :, :, self.length:end] = v_BGTDh
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, G, S, Dh)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.h, self.g, self.dh = layer, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, self.h * self.dh, bias=False)
        self.wk = nn.Linear(cfg.d_model, self.g * self.dh, bias=False)
        self.wv = nn.Linear(cfg.d_model, self.g * self.dh, bias=False)
        self.wo = nn.Linear(self.h * self.dh, cfg.d_model, bias=False)

    def forward(self, x_BTD, cos, sin, mask_B1TS, cache: KVCache | None):
        B, T, _ = x_BTD.shape
        q = self.wq(x_BTD).view(B, T, self.h, self.dh).transpose(1, 2)  # (B, H, T, Dh)
        k = self.wk(x_BTD).view(B, T, self.g, self.dh).transpose(1, 2)  # (B, G, T, Dh)
        v = self.wv(x_BTD).view(B, T, self.g, self.dh).transpose(1, 2)  # (B, G, T, Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, G, S, Dh)
        if self.g != self.h:  # query head i reads kv head i // (H/G), as HF's repeat_kv does
            k = k.repeat_interleave(self.h // self.g, dim=1)
            v = v.repeat_interleave(self.h // self.g, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1TS, is_causal=mask_B1TS is None)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.h * self.dh))  # (B, T, D)


# ----------------------------------------------------------------------------- feed-forward


def residual_std(cfg: ModelConfig) -> float:
    # residual-branch outputs scaled by 1/sqrt(2L) (GPT-2) so the stream's variance stays put
    return cfg.init_std / math.sqrt(2 * cfg.n_layers)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


def switch_aux_loss(probs_NE: torch.Tensor, counts_E: torch.Tensor, real_N: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer balance loss E * sum_e f_e * P_e.

    f_e is the fraction of (token, slot) assignments sent to expert e, P_e its mean router
    probability (over the real tokens when real_N marks padding); the value is 1.0 at perfect
    balance whatever E and K are.
    """
    f_E = counts_E.float() / counts_E.sum().clamp(min=1)
    if real_N is None:
        P_E = probs_NE.mean(0)
    else:  # a weighted mean, not probs_NE[real_N]: boolean indexing would sync a GPU with the host
        P_E = (probs_NE * real_N[:, None]).sum(0) / real_N.sum().clamp(min=1)
    return probs_NE.shape[-1] * (f_E * P_E).sum()


class MoE(nn.Module):
    """Routed SwiGLU experts (stacked weights) + optional shared experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, Fh = cfg.n_experts, cfg.d_model, cfg.expert_hidden
        self.cfg = cfg
        self.router = nn.Linear(D, E, bias=False)
        # stacked (E, in, out) so DeepSpeed/export see plain parameters, not E modules
        self.w_gate = nn.Parameter(torch.empty(E, D, Fh))
        self.w_up = nn.Parameter(torch.empty(E, D, Fh))
        self.w_down = nn.Parameter(torch.empty(E, Fh, D))
        nn.init.normal_(self.w_gate, std=cfg.init_std)
        nn.init.normal_(self.w_up, std=cfg.init_std)
        nn.init.normal_(self.w_down, std=residual_std(cfg))
        # n shared experts summed == one SwiGLU n times as wide: one matmul instead of n
        self.shared = SwiGLU(D, Fh * cfg.n_shared_experts) if cfg.n_shared_experts else None
        # aux-loss-free balancing (DeepSeek-V3): shifts selection only, never the gate values
        self.register_buffer("expert_bias", torch.zeros(E))
        # integer counts: exact whatever dtype the model is cast to, and summable across ranks
        self.register_buffer("load_since_update", torch.zeros(E, dtype=torch.long), persistent=False)
        self.last_load = torch.zeros(E, dtype=torch.long)  # tokens per expert of the last forward

    def _apply(self, fn, recurse=True):
        # .bfloat16()/.half() would cast the bias too, and its +-1e-3 steps vanish in bf16 above ~0.25
        super()._apply(fn, recurse)
        self.expert_bias = self.expert_bias.float()
        return self

    def forward(self, x_BTD: torch.Tensor, real_BT: torch.Tensor | None = None):
        """real_BT marks real tokens in a padded batch: padding is routed (its output is never
        used) but not counted in the load, the balance loss or the bias, and loses capacity first."""
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        probs_NE = (self.router(x_ND) / self.cfg.router_temperature).float().softmax(-1)
        idx_NK, gates_NK = self.route(probs_NE)
        # scatter_add, not bincount: on CUDA bincount reads the max index back to the host (a sync)
        flat_M = idx_NK.flatten()
        counts_E = torch.zeros(self.cfg.n_experts, dtype=torch.long, device=flat_M.device)
        counts_E.scatter_add_(0, flat_M, torch.ones_like(flat_M))  # every assignment: the segments
        real_N = None if real_BT is None else real_BT.reshape(-1).to(probs_NE.dtype)
        load_E = counts_E if real_N is None else torch.zeros_like(counts_E).scatter_add_(
            0, flat_M, real_N.long().repeat_interleave(idx_NK.shape[1]))
        self.last_load = load_E.detach()
        if self.training:
            self.load_since_update += load_E.detach()
        y_ND = self.dispatch(x_ND, idx_NK, gates_NK.to(x_ND.dtype), counts_E, real_N)
        if self.shared is not None:
            y_ND = y_ND + self.shared(x_ND)
        return y_ND.view_as(x_BTD), self.aux_loss(probs_NE, load_E, real_N)

    def route(self, probs_NE):
        select_NE = probs_NE + self.expert_bias if self.cfg.balance == "bias" else probs_NE
        idx_NK = select_NE.topk(self.cfg.top_k, dim=-1).indices  # (N, K)
        gates_NK = probs_NE.gather(1, idx_NK)  # the bias never enters the gate values
        if self.cfg.norm_topk_prob:
            gates_NK = gates_NK / gates_NK.sum(-1, keepdim=True)
        return idx_NK, gates_NK

    def dispatch(self, x_ND, idx_NK, gates_NK, counts_E, real_N=None):
        """Sort assignments by expert, one matmul per expert segment, scatter back weighted."""
        K = idx_NK.shape[1]
        expert_M = idx_NK.flatten()
        # stable: earlier tokens win when capacity is short; padding sorts after real tokens
        key_M = expert_M if real_N is None else 2 * expert_M + (1 - real_N.long()).repeat_interleave(K)
        order_M = key_M.argsort(stable=True)
        token_M, gate_M = order_M // K, gates_NK.flatten()[order_M]
        if self.training and self.cfg.capacity_factor is not None:
            token_M, gate_M, counts_E = self.apply_capacity(expert_M[order_M], token_M, gate_M, counts_E)
        # gathered so each expert's tokens are one contiguous segment; index_select's backward is
        # an index_add_, cheaper on CPU than the accumulating index_put_ of x_ND[token_M]
        xs_MD = x_ND.index_select(0, token_M)
        # one grouped GEMM per projection, or one matmul per expert (training/moe_kernels.py)
        mm = expert_matmul(xs_MD, self.w_gate, counts_E, self.cfg.expert_kernel)
        h_MF = F.silu(mm(xs_MD, self.w_gate)) * mm(xs_MD, self.w_up)
        out_MD = mm(h_MF, self.w_down) * gate_M[:, None]
        return torch.zeros_like(x_ND).index_add_(0, token_M, out_MD.to(x_ND.dtype))

    def apply_capacity(self, sorted_expert_M, token_M, gate_M, counts_E):
        # training only: dropping at inference would make outputs depend on the batch and on the cache
        cap = math.ceil(self.cfg.capacity_factor * sorted_expert_M.numel() / self.cfg.n_experts)
        starts_E = counts_E.cumsum(0) - counts_E
        rank_M = torch.arange(sorted_expert_M.numel(), device=token_M.device) - starts_E[sorted_expert_M]
        keep_M = rank_M < cap
        return token_M[keep_M], gate_M[keep_M], counts_E.clamp(max=cap)

    def aux_loss(self, probs_NE, counts_E, real_N=None) -> torch.Tensor:
        if self.cfg.balance != "aux_loss" or self.cfg.aux_loss_coef == 0:
            return probs_NE.new_zeros(())
        return self.cfg.aux_loss_coef * switch_aux_loss(probs_NE, counts_E, real_N)

    @torch.no_grad()
    def apply_bias_update(self, load_E: torch.Tensor) -> None:
        # overloaded experts get less likely to be picked, underloaded more, by a fixed step
        load_E = load_E.float()
        if load_E.sum() > 0:
            self.expert_bias += self.cfg.bias_update_rate * torch.sign(load_E.mean() - load_E)
        self.load_since_update.zero_()


# ----------------------------------------------------------------------------- the model


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.dense_hidden) if layer < cfg.n_dense_layers else MoE(cfg)

    def forward(self, x_BTD, cos, sin, mask, cache, real_BT=None):
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos, sin, mask, cache)
        if isinstance(self.ffn, MoE):
            h_BTD, aux = self.ffn(self.ffn_norm(x_BTD), real_BT)
        else:
            h_BTD, aux = self.ffn(self.ffn_norm(x_BTD)), None
        return x_BTD + h_BTD, aux


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, V)
    aux_loss: torch.Tensor  # scalar, already times aux_loss_coef, summed over MoE layers
    loss: torch.Tensor | None  # mean next-token cross-entropy when targets are given


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # the experts' stacked weights are initialised by MoE itself
        std, out_std = self.cfg.init_std, residual_std(self.cfg)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, (Attention, SwiGLU)):
            last = module.wo if isinstance(module, Attention) else module.w_down
            nn.init.normal_(last.weight, std=out_std)

    def forward(self, idx_BT, targets_BT=None, *, positions_BT=None, key_mask_BS=None, doc_ids_BT=None,
                real_BT=None, cache: KVCache | None = None, last_only: bool = False) -> ModelOutput:
        """idx_BT token ids; targets_BT next-token ids (-100 = ignore).

        positions_BT and key_mask_BS (True = a real token, over cached + new keys) are for
        left-padded batches; cache appends this call's keys/values and advances. doc_ids_BT
        packs several sequences into a row: a token attends only to earlier tokens of its own
        document (a block-diagonal causal mask; pass positions that restart at each document).
        real_BT (True = a real token) keeps padding out of the MoE's load, balance loss and bias.
        last_only returns logits (B, 1, V) of the last position: decoding needs no more, and the
        lm_head over every position would dominate a small model's step.
        """
        if last_only and targets_BT is not None:
            raise ValueError("last_only=True computes no loss: pass targets_BT=None")
        x_BTD, aux = self._blocks(idx_BT, positions_BT, key_mask_BS, doc_ids_BT, real_BT, cache)
        if last_only:
            x_BTD = x_BTD[:, -1:]
        logits_BTV = self.lm_head(self.norm(x_BTD))
        loss = None
        if targets_BT is not None:
            loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(), ignore_index=-100)
        return ModelOutput(logits_BTV, aux, loss)

    def hidden(self, idx_BT, *, real_BT=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The final normalised hidden states (B, T, D) and the MoE balance loss: the forward
        without the lm_head, for a head of another kind (a reward model's score)."""
        x_BTD, aux = self._blocks(idx_BT, None, None, None, real_BT, None)
        return self.norm(x_BTD), aux

    def _blocks(self, idx_BT, positions_BT, key_mask_BS, doc_ids_BT, real_BT, cache):
        B, T = idx_BT.shape
        past = cache.length if cache is not None else 0
        if past + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {past + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        if positions_BT is None:
            positions_BT = torch.arange(past, past + T, device=idx_BT.device).expand(B, T)
        x_BTD = self.embed(idx_BT)
        cos, sin = rope_cos_sin(positions_BT, self.cfg, x_BTD.dtype)
        if doc_ids_BT is not None and (cache is not None or key_mask_BS is not None):
            raise ValueError("doc_ids_BT (packed rows) cannot be combined with a KV cache or key_mask_BS")
        mask = self.attention_mask(T, past, key_mask_BS, idx_BT.device, doc_ids_BT)
        aux = x_BTD.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            x_BTD, layer_aux = block(x_BTD, cos, sin, mask, cache, real_BT)
            aux = aux + layer_aux if layer_aux is not None else aux
        if cache is not None:
            cache.length += T
        return x_BTD, aux

    @staticmethod
    def attention_mask(T: int, past: int, key_mask_BS, device, doc_ids_BT=None):
        """None means plain causal (SDPA's fast path); else a bool (B|1, 1, T, S) mask."""
        if doc_ids_BT is not None:
            causal_TT = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            same_BTT = doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :]
            return (same_BTT & causal_TT)[:, None]  # every token sees itself: no empty row
        if past == 0 and key_mask_BS is None:
            return None
        S = past + T
        q_pos_T1 = torch.arange(past, S, device=device)[:, None]
        k_pos_S = torch.arange(S, device=device)
        mask = (k_pos_S <= q_pos_T1)[None, None]  # (1, 1, T, S): causal, shifted by the cache
        if key_mask_BS is not None:
            # pad queries still see themselves: an all-False row would make SDPA return NaN
            mask = (mask & key_mask_BS[:, None, None, :].bool()) | (k_pos_S == q_pos_T1)
        return mask

    # ---- balancing and logging hooks, called by the training loop

    def moe_layers(self) -> dict[int, MoE]:
        return {i: b.ffn for i, b in enumerate(self.blocks) if isinstance(b.ffn, MoE)}

    def expert_loads(self) -> dict[int, torch.Tensor]:
        """Tokens per expert of the last forward, per MoE layer index, for logging."""
        return {i: moe.last_load for i, moe in self.moe_layers().items()}

    @torch.no_grad()
    def update_router_bias(self, all_reduce: Callable[[torch.Tensor], None] | None = None) -> None:
        """Call after optimizer.step(): moves each expert's bias against its observed load.

        all_reduce (e.g. torch.distributed.all_reduce) sums the loads over data-parallel ranks,
        so every rank applies the same update and the biases never drift apart.
        """
        layers = self.moe_layers()
        if self.cfg.balance != "bias" or not layers:
            return
        loads_LE = torch.stack([moe.load_since_update for moe in layers.values()])
        if all_reduce is not None:
            all_reduce(loads_LE)
        for moe, load_E in zip(layers.values(), loads_LE):
            moe.apply_bias_update(load_E)

    def param_counts(self) -> dict[str, int]:
        return param_counts(self.cfg)

    def flops_per_token(self, seq_len: int) -> int:
        return flops_per_token(self.cfg, seq_len)


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Total and active (used per token) parameters, embeddings and lm_head included."""
    D, dh = cfg.d_model, cfg.head_dim
    attn = D * cfg.n_heads * dh * 2 + D * cfg.kv_heads * dh * 2
    norms = 2 * D
    dense = attn + norms + 3 * D * cfg.dense_hidden
    expert = 3 * D * cfg.expert_hidden
    moe_all = attn + norms + D * cfg.n_experts + expert * (cfg.n_experts + cfg.n_shared_experts)
    moe_active = moe_all - expert * (cfg.n_experts - cfg.top_k)
    n_moe = cfg.n_layers - cfg.n_dense_layers
    outer = 2 * cfg.vocab_size * D + D  # embedding, lm_head, final norm
    total = outer + cfg.n_dense_layers * dense + n_moe * moe_all
    active = outer + cfg.n_dense_layers * dense + n_moe * moe_active
    return {"total": total, "active": active, "embedding": cfg.vocab_size * D}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward), PaLM's convention for MFU.

    6 per active non-embedding weight (lm_head included, the lookup is free) plus 12*L*D*T for
    the attention scores and values, without halving for causality.
    """
    n = param_counts(cfg)
    return 6 * (n["active"] - n["embedding"]) + 12 * cfg.n_layers * cfg.d_model * seq_len
