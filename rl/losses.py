"""Preference losses: pure functions of per-sequence log-probs, one row per (chosen, rejected) pair.

    out = preference_loss("sigmoid", logps, beta=0.1)      # DPO
    out.losses_B, out.chosen_rewards_B, out.rejected_rewards_B

``PairLogps`` holds, per pair, the summed log-prob of the chosen and the rejected response under
the policy and (except for SimPO) under the frozen reference, and each response's token count.
Shape legend: B pairs.

| name | loss per pair (z = policy log-ratio - reference log-ratio) | paper |
|---|---|---|
| ``sigmoid`` | -log sigmoid(beta z) | DPO, Rafailov et al. 2023 |
| ``cdpo`` | -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z) | conservative DPO (label smoothing eps) |
| ``ipo`` | (z' - 1 / (2 beta))^2, z' from log-probs averaged per token | IPO, Azar et al. 2023 |
| ``simpo`` | -log sigmoid(beta (avg_c - avg_r) - gamma), no reference | SimPO, Meng et al. 2024 |

IPO uses per-token averages as TRL's ``DPOTrainer`` does, so the two agree on a pair's loss.
The implicit rewards (``rewards/chosen``, ``rewards/rejected``) are beta x the policy's gain
over the reference; for SimPO, beta x the per-token average log-prob.

``bradley_terry`` is the reward model's loss on scores: -log sigmoid(s_chosen - s_rejected).

RL's per-token losses (second half of this file) take per-token log-probs aligned as in
training/logprobs.py, with a mask of action positions; shape legend there: B completions,
T positions, V vocabulary.

| name | per-token policy loss (r = pi / pi_old, A the advantage) | paper |
|---|---|---|
| ``ppo`` | -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A); dual-clip: for A < 0, at most -c A | Schulman et al. 2017; clip-higher: DAPO; dual-clip: Ye et al. 2020 |
| ``gspo`` | the same with the sequence ratio s_i = exp(mean_t log r_t) in place of r_t | Zheng et al. 2025 (GSPO) |

Aggregation (``AGGREGATIONS``) turns per-token losses into one number: ``token-mean`` (every
response token weighs the same: DAPO, and the seeds' PPO as OpenRLHF/veRL run it),
``seq-mean-token-mean`` (each response's mean, then the mean over responses: R1's GRPO as
DeepSeekMath writes it, and GSPO) and ``seq-mean-token-sum-norm`` (each response's sum over a
fixed length, then the mean: Dr. GRPO, no length bias).
KL estimators of KL(pi || pi_ref) per token, x = log pi_ref - log pi: k1 = -x, k2 = x^2 / 2,
k3 = exp(x) - x - 1 (Schulman's unbiased, non-negative one, R1's choice in the loss).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class PairLogps:
    policy_chosen_B: torch.Tensor
    policy_rejected_B: torch.Tensor
    chosen_tokens_B: torch.Tensor
    rejected_tokens_B: torch.Tensor
    ref_chosen_B: torch.Tensor | None = None
    ref_rejected_B: torch.Tensor | None = None

    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ref_chosen_B, ref_rejected_B), or an error for a loss that needs them."""
        if self.ref_chosen_B is None or self.ref_rejected_B is None:
            raise ValueError("this loss needs the reference's log-probs (ref_chosen_B, ref_rejected_B)")
        return self.ref_chosen_B, self.ref_rejected_B

    def log_ratio_B(self) -> torch.Tensor:
        """z: the policy's log-ratio of chosen over rejected, minus the reference's."""
        ref_c, ref_r = self.reference()
        return (self.policy_chosen_B - self.policy_rejected_B) - (ref_c - ref_r)


@dataclass
class PairLoss:
    losses_B: torch.Tensor
    chosen_rewards_B: torch.Tensor
    rejected_rewards_B: torch.Tensor

    def metrics(self, logps: PairLogps) -> dict[str, float]:
        """The anchors' names: TRL's DPOTrainer logs the same keys."""
        c, r = self.chosen_rewards_B.detach(), self.rejected_rewards_B.detach()
        return {"loss": float(self.losses_B.detach().mean()),
                "rewards/chosen": float(c.mean()), "rewards/rejected": float(r.mean()),
                "rewards/margins": float((c - r).mean()), "rewards/accuracies": float((c > r).float().mean()),
                "logps/chosen": float(logps.policy_chosen_B.detach().mean()),
                "logps/rejected": float(logps.policy_rejected_B.detach().mean())}


def _implicit_rewards(lp: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    ref_c, ref_r = lp.reference()
    return beta * (lp.policy_chosen_B - ref_c).detach(), beta * (lp.policy_rejected_B - ref_r).detach()


def dpo_sigmoid(lp: PairLogps, beta: float, label_smoothing: float = 0.0, **_) -> PairLoss:
    """DPO; with label_smoothing = eps > 0 it is cDPO (the preference label is wrong with prob. eps)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 0.5)")
    z_B = beta * lp.log_ratio_B()
    losses_B = -(1 - label_smoothing) * F.logsigmoid(z_B) - label_smoothing * F.logsigmoid(-z_B)
    return PairLoss(losses_B, *_implicit_rewards(lp, beta))


def cdpo(lp: PairLogps, beta: float, label_smoothing: float = 0.1, **_) -> PairLoss:
    if label_smoothing <= 0:
        raise ValueError(f"cdpo needs label_smoothing > 0, got {label_smoothing}")
    return dpo_sigmoid(lp, beta, label_smoothing)


def _per_token(logp_B: torch.Tensor, n_B: torch.Tensor) -> torch.Tensor:
    return logp_B / n_B.clamp(min=1).to(logp_B.dtype)


def ipo(lp: PairLogps, beta: float, **_) -> PairLoss:
    """IPO: the averaged log-ratio regressed onto 1 / (2 beta)."""
    ref_c, ref_r = lp.reference()
    z_B = ((_per_token(lp.policy_chosen_B, lp.chosen_tokens_B) - _per_token(lp.policy_rejected_B, lp.rejected_tokens_B))
           - (_per_token(ref_c, lp.chosen_tokens_B) - _per_token(ref_r, lp.rejected_tokens_B)))
    return PairLoss((z_B - 1 / (2 * beta)) ** 2, *_implicit_rewards(lp, beta))


def simpo(lp: PairLogps, beta: float, gamma: float = 0.5, label_smoothing: float = 0.0, **_) -> PairLoss:
    """SimPO: reference-free, length-normalised, with a target margin gamma."""
    c_B = beta * _per_token(lp.policy_chosen_B, lp.chosen_tokens_B)
    r_B = beta * _per_token(lp.policy_rejected_B, lp.rejected_tokens_B)
    z_B = c_B - r_B - gamma
    losses_B = -(1 - label_smoothing) * F.logsigmoid(z_B) - label_smoothing * F.logsigmoid(-z_B)
    return PairLoss(losses_B, c_B.detach(), r_B.detach())


PREFERENCE_LOSSES: dict[str, Callable[..., PairLoss]] = {
    "sigmoid": dpo_sigmoid, "cdpo": cdpo, "ipo": ipo, "simpo": simpo}
NEEDS_REFERENCE = {"sigmoid": True, "cdpo": True, "ipo": True, "simpo": False}


def preference_loss(name: str, lp: PairLogps, **params) -> PairLoss:
    """The loss `name` (a key of PREFERENCE_LOSSES) with its parameters (beta, label_smoothing, gamma)."""
    if name not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; known: {sorted(PREFERENCE_LOSSES)}")
    return PREFERENCE_LOSSES[name](lp, **params)


def chosen_nll(lp: PairLogps) -> torch.Tensor:
    """The chosen responses' negative log-likelihood per token over the batch (RPO's extra term)."""
    return -lp.policy_chosen_B.sum() / lp.chosen_tokens_B.sum().clamp(min=1)


def bradley_terry(chosen_scores_B: torch.Tensor, rejected_scores_B: torch.Tensor) -> torch.Tensor:
    """The reward model's loss per pair: -log P(chosen beats rejected) = -log sigmoid(s_c - s_r)."""
    return -F.logsigmoid(chosen_scores_B - rejected_scores_B)


# ----------------------------------------------------------------------------- RL: policy, value, KL


@dataclass
class PolicyLoss:
    loss_BT: torch.Tensor            # per-token loss, 0 outside the mask
    clipped_low_BT: torch.Tensor     # bool: the lower clip bound was active (A < 0)
    clipped_high_BT: torch.Tensor    # bool: the upper clip bound was active (A > 0)
    ratio_BT: torch.Tensor           # the ratio the loss used (detached)


def ppo_clip(logp_BT, old_logp_BT, adv_BT, mask_BT, eps_low: float = 0.2, eps_high: float = 0.2,
             dual_clip: float | None = None, ratio_BT: torch.Tensor | None = None) -> PolicyLoss:
    """PPO's clipped surrogate with an asymmetric range (clip-higher) and optional dual clip."""
    if ratio_BT is None:
        ratio_BT = torch.exp((logp_BT - old_logp_BT).clamp(max=20.0))
    surr1 = ratio_BT * adv_BT
    surr2 = ratio_BT.clamp(1 - eps_low, 1 + eps_high) * adv_BT
    loss_BT = -torch.minimum(surr1, surr2)
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip={dual_clip} must be > 1")
        loss_BT = torch.where(adv_BT < 0, torch.minimum(loss_BT, -dual_clip * adv_BT), loss_BT)
    m = mask_BT.bool()
    r = ratio_BT.detach()
    low = m & (adv_BT < 0) & (r < 1 - eps_low)
    high = m & (adv_BT > 0) & (r > 1 + eps_high)
    return PolicyLoss(loss_BT * m.to(loss_BT.dtype), low, high, r)


def gspo(logp_BT, old_logp_BT, adv_BT, mask_BT, eps_low: float = 3e-4, eps_high: float = 4e-4,
         dual_clip: float | None = None) -> PolicyLoss:
    """GSPO: one importance ratio per sequence, the geometric mean of its token ratios; its
    gradient reaches every token through s_i x pi_t / sg(pi_t)."""
    m = mask_BT.to(logp_BT.dtype)
    log_s_B = ((logp_BT - old_logp_BT) * m).sum(-1) / m.sum(-1).clamp(min=1)
    ratio_BT = torch.exp((log_s_B.detach()[:, None] + logp_BT - logp_BT.detach()).clamp(max=20.0))
    return ppo_clip(logp_BT, old_logp_BT, adv_BT, mask_BT, eps_low, eps_high, dual_clip, ratio_BT=ratio_BT)


POLICY_LOSSES: dict[str, Callable[..., PolicyLoss]] = {"ppo": ppo_clip, "gspo": gspo}


def policy_loss(name: str, logp_BT, old_logp_BT, adv_BT, mask_BT, **params) -> PolicyLoss:
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; known: {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name](logp_BT, old_logp_BT, adv_BT, mask_BT, **params)


AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def aggregate_parts(loss_BT: torch.Tensor, mask_BT: torch.Tensor, mode: str,
                    norm_length: int | None = None) -> tuple[torch.Tensor, float]:
    """(numerator, denominator) of an aggregation, so a minibatch split over micro-batches and
    ranks divides the summed numerators by the summed denominators: the same number as one batch."""
    m = mask_BT.to(loss_BT.dtype)
    per_row = (loss_BT * m).sum(-1)
    if mode == "token-mean":
        return per_row.sum(), float(m.sum())
    if mode == "seq-mean-token-mean":
        return (per_row / m.sum(-1).clamp(min=1)).sum(), float(loss_BT.shape[0])
    if mode == "seq-mean-token-sum-norm":
        if not norm_length:
            raise ValueError("seq-mean-token-sum-norm needs norm_length (the longest allowed response)")
        return (per_row / norm_length).sum(), float(loss_BT.shape[0])
    raise ValueError(f"unknown loss aggregation {mode!r}; known: {list(AGGREGATIONS)}")


def aggregate(loss_BT: torch.Tensor, mask_BT: torch.Tensor, mode: str, norm_length: int | None = None) -> torch.Tensor:
    num, den = aggregate_parts(loss_BT, mask_BT, mode, norm_length)
    return num / max(den, 1.0)


def kl_penalty(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs."""
    x = ref_logp_BT - logp_BT
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x ** 2
    if estimator == "k3":
        return torch.exp(x.clamp(max=20.0)) - x - 1
    raise ValueError(f"unknown KL estimator {estimator!r}; known: k1, k2, k3")


def value_loss(values_BT, old_values_BT, returns_BT, mask_BT, clip: float | None = 0.2) -> torch.Tensor:
    """Per-token 0.5 (V - R)^2; with clip, the larger of it and the loss of V kept within
    +-clip of the rollout's value (PPO's value clipping)."""
    loss = (values_BT - returns_BT) ** 2
    if clip is not None:
        clipped = old_values_BT + (values_BT - old_values_BT).clamp(-clip, clip)
        loss = torch.maximum(loss, (clipped - returns_BT) ** 2)
    return 0.5 * loss * mask_BT.to(loss.dtype)


def entropy_from_logits(logits_BTV: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """Per-position entropy of the softmax, fp32, in chunks of rows (no whole fp32 copy)."""
    flat = logits_BTV.reshape(-1, logits_BTV.shape[-1])
    out = []
    for lo in range(0, flat.shape[0], chunk_rows):
        rows = flat[lo:lo + chunk_rows].float()
        p = rows.softmax(-1)
        out.append(rows.logsumexp(-1) - (p * rows).sum(-1))
    ent = torch.cat(out) if out else flat.new_zeros(0, dtype=torch.float32)
    return ent.view(logits_BTV.shape[:-1])
