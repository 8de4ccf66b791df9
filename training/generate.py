"""Batched generation with a KV cache: greedy, temperature, top-k and top-p sampling.

Prompts of different lengths are left-padded; every row carries its own positions and a
key mask, so a row's tokens are exactly what it would get alone. Each row stops at its first
stop id (eos, `</answer>`) or after max_new_tokens.

    ids = special_token_ids(tok)
    out = generate(model, [tok.encode(p).ids for p in prompts], max_new_tokens=256,
                   stop_ids=[ids["</s>"], ids["</answer>"]], pad_id=ids["<pad>"],
                   temperature=0.7, top_p=0.95)
    texts = [tok.decode(row[:n].tolist()) for row, n in zip(out.tokens, out.lengths)]
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, NamedTuple, Sequence

import torch

from training.model import KVCache, Transformer


class Generation(NamedTuple):
    tokens: torch.Tensor  # (B, T_new) new tokens, stop token included, pad_id after it
    lengths: torch.Tensor  # (B,) new tokens per row, stop token included


def sample_next(logits_BV: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row; temperature 0 is greedy (argmax)."""
    if temperature == 0.0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits_BV = _nucleus(logits_BV, top_p)
    probs_BV = logits_BV.softmax(-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def _nucleus(logits_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    # keep the smallest prefix of the sorted distribution whose mass reaches top_p (always >= 1 token)
    sorted_BV, order_BV = logits_BV.sort(-1, descending=True)
    mass_before_BV = sorted_BV.softmax(-1).cumsum(-1) - sorted_BV.softmax(-1)
    drop_BV = mass_before_BV >= top_p
    return logits_BV.masked_fill(drop_BV.scatter(-1, order_BV, drop_BV), float("-inf"))


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None):
    """(ids_BP, mask_BP): prompts right-aligned so every row's next token lands in one column."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: need at least one prompt, and no prompt may be empty")
    width = max(len(p) for p in prompts)
    ids_BP = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask_BP = torch.zeros((len(prompts), width), dtype=torch.bool, device=device)
    for row, p in enumerate(prompts):
        ids_BP[row, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask_BP[row, width - len(p):] = True
    return ids_BP, mask_BP


@contextmanager
def _eval_mode(model: torch.nn.Module):
    # eval: MoE never drops tokens and routing statistics are not mixed into training's load
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_args(model: Transformer, width: int, max_new_tokens: int, temperature, top_k, top_p) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if width + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"longest prompt ({width}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_seq_len={model.cfg.max_seq_len}")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")


@torch.no_grad()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             stop_ids: Iterable[int] = (), pad_id: int = 0, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None) -> Generation:
    device = next(model.parameters()).device
    ids_BS, mask_BS = left_pad(prompts, pad_id, device)
    _check_args(model, ids_BS.shape[1], max_new_tokens, temperature, top_k, top_p)
    stop_X = torch.as_tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    pos_BS = (mask_BS.long().cumsum(-1) - 1).clamp(min=0)  # pads sit at 0, real tokens count from 0
    done_B = torch.zeros(ids_BS.shape[0], dtype=torch.bool, device=device)
    new_tokens = []
    with _eval_mode(model):
        cache = None
        if use_cache:
            cache = KVCache(model.cfg, ids_BS.shape[0], ids_BS.shape[1] + max_new_tokens, device,
                            next(model.parameters()).dtype)
        logits_BV = _last_logits(model, ids_BS, pos_BS, mask_BS, cache, ids_BS.shape[1])
        for step in range(max_new_tokens):
            next_B = sample_next(logits_BV, temperature, top_k, top_p, generator).masked_fill(done_B, pad_id)
            new_tokens.append(next_B)
            live_B = ~done_B  # the token just produced is real for rows that were still running
            done_B = done_B | torch.isin(next_B, stop_X)
            if done_B.all() or step == max_new_tokens - 1:
                break
            ids_BS = torch.cat([ids_BS, next_B[:, None]], dim=1)
            mask_BS = torch.cat([mask_BS, live_B[:, None]], dim=1)
            pos_BS = torch.cat([pos_BS, pos_BS[:, -1:] + 1], dim=1)
            logits_BV = _last_logits(model, ids_BS, pos_BS, mask_BS, cache, 1)
    tokens_BT = torch.stack(new_tokens, dim=1)
    return Generation(tokens_BT, _lengths(tokens_BT, stop_X))


def _last_logits(model, ids_BS, pos_BS, mask_BS, cache: KVCache | None, new: int) -> torch.Tensor:
    """(B, V) logits after the last column; with a cache only the `new` newest columns are fed."""
    if cache is not None:
        ids_BS, pos_BS = ids_BS[:, -new:], pos_BS[:, -new:]
    out = model(ids_BS, positions_BT=pos_BS, key_mask_BS=mask_BS, cache=cache, last_only=True)
    return out.logits[:, -1]


def _lengths(tokens_BT: torch.Tensor, stop_X: torch.Tensor) -> torch.Tensor:
    """Tokens up to and including each row's first stop id (all of them when it never stopped)."""
    T = tokens_BT.shape[1]
    is_stop_BT = torch.isin(tokens_BT, stop_X)
    first_BT = torch.where(is_stop_BT, torch.arange(T, device=tokens_BT.device), T)
    return (first_BT.min(-1).values + 1).clamp(max=T)
