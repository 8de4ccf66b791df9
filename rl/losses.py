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
