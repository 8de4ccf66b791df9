"""Per-token log-probabilities of given tokens under a model: the quantity SFT, DPO and RL share.

    logp_BT = token_logprobs(logits_BTV, targets_BT)               # log p(target_t | prefix)
    logp_BT, mask_BT = completion_logprobs(model, ids_BT, completion_mask_BT)
    seq_BT = logp_BT.sum(-1)                                         # with mask applied: a sequence's log-prob

Shape legend: B batch, T positions, V vocabulary.

``token_logprobs`` is one gather minus one logsumexp, in fp32, in chunks of rows: the same
numbers as ``log_softmax(logits).gather(targets)`` without its (B, T, V) output. Under no_grad
(a frozen reference) the fp32 copy of bf16 logits is then never whole in memory; with gradients
autograd keeps each chunk's copy for the backward pass.
"""
from __future__ import annotations

import torch
from torch import nn

IGNORE = -100  # a target that has no log-probability (prompt, padding)


def token_logprobs(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """log softmax(logits)[target] per position, fp32; IGNORE targets give 0."""
    if logits_BTV.shape[:-1] != targets_BT.shape:
        raise ValueError(f"logits {tuple(logits_BTV.shape)} and targets {tuple(targets_BT.shape)} "
                         "must agree on every dimension but the last")
    flat_NV = logits_BTV.reshape(-1, logits_BTV.shape[-1])
    flat_N = targets_BT.reshape(-1)
    keep_N = flat_N != IGNORE
    safe_N = flat_N.masked_fill(~keep_N, 0)
    out = []
    for lo in range(0, flat_NV.shape[0], chunk_rows):
        rows = flat_NV[lo:lo + chunk_rows].float()
        picked = rows.gather(1, safe_N[lo:lo + chunk_rows, None]).squeeze(1)
        out.append(picked - rows.logsumexp(-1))
    logp_N = torch.cat(out) if out else flat_NV.new_zeros(0, dtype=torch.float32)
    # where, not a product: a -inf logit at a masked position must give 0, not NaN
    return torch.where(keep_N, logp_N, torch.zeros_like(logp_N)).view(targets_BT.shape)


def shift_targets(ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Next-token targets: position t predicts ids[t+1]; positions whose next token is outside
    the mask (or past the end) get IGNORE."""
    targets_BT = torch.full_like(ids_BT, IGNORE)
    targets_BT[:, :-1] = ids_BT[:, 1:].masked_fill(~mask_BT[:, 1:].bool(), IGNORE)
    return targets_BT


def completion_logprobs(model: nn.Module, ids_BT: torch.Tensor, completion_mask_BT: torch.Tensor,
                        **forward_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp_BT, mask_BT) of the tokens marked in completion_mask_BT, each under its prefix.

    Position t of the result is the log-probability of ids[t+1]: the outputs line up with the
    logits that produced them, and mask_BT says which positions count. forward_kwargs go to the
    model (positions and masks of a packed or left-padded batch). Gradients flow when the caller
    allows them (the policy in DPO/RL); a frozen model's call is already no-grad.
    """
    targets_BT = shift_targets(ids_BT, completion_mask_BT)
    logits_BTV = model(ids_BT, **forward_kwargs).logits
    return token_logprobs(logits_BTV, targets_BT), targets_BT != IGNORE
