"""Advantage estimators: pure functions of token rewards (and values), behind a registry.

    adv = estimate("grpo", token_rewards_BT=r_BT, mask_BT=m_BT, group_size=8)
    adv.advantages_BT, adv.returns_BT            # returns only where a critic learns from them

Conventions. Row b of a batch is one sampled completion; the G completions of one prompt are
consecutive rows (group_size G). Position t is an action position: mask_BT[b, t] is True where
the token after t is a completion token (training/logprobs.py's alignment), so per-token
log-probs, values and rewards share the positions. The sequence's reward sits on its last
action position; a KL penalty in the reward adds -beta x kl on every action position.

| name | advantage of a token of completion i | critic | paper |
|---|---|---|---|
| ``gae`` | sum_l (gamma lambda)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t | yes | Schulman et al. 2016 (PPO's) |
| ``grpo`` | (R_i - mean_group R) / (std_group R + eps) | no | DeepSeekMath / R1 |
| ``dr_grpo`` | R_i - mean_group R (no std; pair it with seq-mean-token-sum-norm) | no | Liu et al. 2025 |
| ``rloo`` | R_i - mean of the other G-1 rewards of the group | no | Ahmadian et al. 2024 |
| ``reinforce_pp`` | token return sum_{k>=t} gamma^(k-t) r_k, whitened over the batch | no | Hu 2025 (REINFORCE++) |

R_i is the sum of a completion's token rewards (its sequence reward, plus any KL penalty).
Shape legend: B completions (rows), T positions, G group size.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class Advantages(NamedTuple):
    advantages_BT: torch.Tensor           # 0 outside the mask
    returns_BT: torch.Tensor | None       # the critic's targets (gae only)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, sum_over_ranks=None) -> torch.Tensor:
    """(x - mean) / std over the masked entries; 0 outside the mask. sum_over_ranks(list of floats)
    -> their sums over the data-parallel ranks makes the statistics the whole batch's."""
    m = mask.to(x.dtype)
    parts = [float((x * m).sum()), float((x * x * m).sum()), float(m.sum())]
    total, total_sq, n = sum_over_ranks(parts) if sum_over_ranks is not None else parts
    n = max(n, 1.0)
    mean = total / n
    var = max(total_sq / n - mean * mean, 0.0)
    return ((x - mean) * (var + eps) ** -0.5) * m


def sequence_scores(token_rewards_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """R_i: each row's token rewards summed over its action positions."""
    return (token_rewards_BT * mask_BT.to(token_rewards_BT.dtype)).sum(-1)


def _groups(scores_B: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 1 or scores_B.shape[0] % group_size:
        raise ValueError(f"{scores_B.shape[0]} completions do not split into groups of group_size={group_size}")
    return scores_B.view(-1, group_size)


def _per_token(adv_B: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    return adv_B[:, None] * mask_BT.to(adv_B.dtype)


def gae(token_rewards_BT, mask_BT, values_BT, gamma: float = 1.0, lam: float = 0.95, whiten: bool = True,
        sum_over_ranks=None, **_) -> Advantages:
    """Generalised advantage estimation with a critic; the returns (advantages + values) are the
    critic's targets. whiten normalises the advantages over the batch (PPO's usual step)."""
    if values_BT is None:
        raise ValueError("advantage estimator 'gae' needs a critic: set critic to shared or separate")
    m_BT = mask_BT.to(values_BT.dtype)
    r_BT, v_BT = token_rewards_BT * m_BT, values_BT * m_BT
    adv_BT = torch.zeros_like(v_BT)
    last_B = torch.zeros_like(v_BT[:, 0])
    T = v_BT.shape[1]
    for t in reversed(range(T)):
        next_m = m_BT[:, t + 1] if t + 1 < T else torch.zeros_like(last_B)
        next_v = v_BT[:, t + 1] if t + 1 < T else torch.zeros_like(last_B)
        delta = r_BT[:, t] + gamma * next_v * next_m - v_BT[:, t]
        last_B = (delta + gamma * lam * next_m * last_B) * m_BT[:, t]
        adv_BT[:, t] = last_B
    returns_BT = (adv_BT + v_BT) * m_BT
    return Advantages(masked_whiten(adv_BT, mask_BT, sum_over_ranks=sum_over_ranks) if whiten else adv_BT, returns_BT)


def grpo(token_rewards_BT, mask_BT, group_size: int, eps: float = 1e-6, **_) -> Advantages:
    """Group-normalised: each completion against its group's mean, in units of the group's std."""
    g_GN = _groups(sequence_scores(token_rewards_BT, mask_BT), group_size)
    std = g_GN.std(-1, keepdim=True) if group_size > 1 else torch.ones_like(g_GN[:, :1])
    adv = ((g_GN - g_GN.mean(-1, keepdim=True)) / (std + eps)).reshape(-1)
    return Advantages(_per_token(adv, mask_BT), None)


def dr_grpo(token_rewards_BT, mask_BT, group_size: int, **_) -> Advantages:
    """GRPO done right: the group mean subtracted, no division by the std."""
    g_GN = _groups(sequence_scores(token_rewards_BT, mask_BT), group_size)
    return Advantages(_per_token((g_GN - g_GN.mean(-1, keepdim=True)).reshape(-1), mask_BT), None)


def rloo(token_rewards_BT, mask_BT, group_size: int, **_) -> Advantages:
    """Leave one out: each completion against the mean of the others of its group."""
    if group_size < 2:
        raise ValueError("advantage estimator 'rloo' needs group_size >= 2")
    g_GN = _groups(sequence_scores(token_rewards_BT, mask_BT), group_size)
    others = (g_GN.sum(-1, keepdim=True) - g_GN) / (group_size - 1)
    return Advantages(_per_token((g_GN - others).reshape(-1), mask_BT), None)


def reinforce_pp(token_rewards_BT, mask_BT, gamma: float = 1.0, sum_over_ranks=None, **_) -> Advantages:
    """Discounted token returns (KL penalty included per token), whitened over the whole batch."""
    m_BT = mask_BT.to(token_rewards_BT.dtype)
    r_BT = token_rewards_BT * m_BT
    ret_BT = torch.zeros_like(r_BT)
    running = torch.zeros_like(r_BT[:, 0])
    for t in reversed(range(r_BT.shape[1])):
        running = r_BT[:, t] + gamma * running
        ret_BT[:, t] = running
    return Advantages(masked_whiten(ret_BT * m_BT, mask_BT, sum_over_ranks=sum_over_ranks), None)


ESTIMATORS: dict[str, Callable[..., Advantages]] = {
    "gae": gae, "grpo": grpo, "dr_grpo": dr_grpo, "rloo": rloo, "reinforce_pp": reinforce_pp}
NEEDS_CRITIC = {"gae": True, "grpo": False, "dr_grpo": False, "rloo": False, "reinforce_pp": False}


def estimate(name: str, *, token_rewards_BT: torch.Tensor, mask_BT: torch.Tensor,
             values_BT: torch.Tensor | None = None, group_size: int = 1, **params) -> Advantages:
    """The estimator `name` (a key of ESTIMATORS); params: gamma, lam, whiten, eps, sum_over_ranks
    (batch-wide whitening over every rank's completions: gae, reinforce_pp)."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {sorted(ESTIMATORS)}")
    if token_rewards_BT.shape != mask_BT.shape:
        raise ValueError(f"token rewards {tuple(token_rewards_BT.shape)} and mask {tuple(mask_BT.shape)} differ")
    return ESTIMATORS[name](token_rewards_BT=token_rewards_BT.float(), mask_BT=mask_BT.bool(),
                            values_BT=None if values_BT is None else values_BT.float(),
                            group_size=group_size, **params)


def token_rewards(scores_B: torch.Tensor, mask_BT: torch.Tensor, kl_BT: torch.Tensor | None = None,
                  kl_coef: float = 0.0) -> torch.Tensor:
    """Per-token rewards: the sequence score on each row's last action position, minus
    kl_coef x kl on every action position (the KL-in-reward form of PPO's RLHF)."""
    m_BT = mask_BT.float()
    T = m_BT.shape[1]
    last_B = torch.where(m_BT.any(-1), (m_BT * torch.arange(T, device=m_BT.device)).argmax(-1), 0)
    out_BT = torch.zeros_like(m_BT)
    out_BT[torch.arange(m_BT.shape[0], device=m_BT.device), last_B] = scores_B.float() * m_BT.any(-1).float()
    if kl_BT is not None and kl_coef:
        out_BT = out_BT - kl_coef * kl_BT.float() * m_BT
    return out_BT


def informative_groups(scores_B: torch.Tensor, group_size: int) -> torch.Tensor:
    """(G,) True for groups whose rewards are not all equal: DAPO's dynamic sampling keeps these,
    since a tied group has zero advantage under every group estimator."""
    g_GN = _groups(scores_B, group_size)
    return (g_GN.max(-1).values - g_GN.min(-1).values) > 1e-9
