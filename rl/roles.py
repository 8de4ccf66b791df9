"""RL's roles as plain classes: policy (+ critic), reference, rollout and reward.

    model = ActorCritic.from_folder("runs/r1/sft/model", critic="shared")   # the trainable role(s)
    rollout = Rollout(model.policy.cfg, tok)                                 # sampling, own weights
    rollout.sync(policy_weights(engine))                                     # before every rollout
    gen = rollout.generate(prompt_ids, cfg.rollout, generator)
    ref = Reference(frozen, temperature, micro_batch)                        # a FrozenModel, or None
    ref.logprobs(ids_BT, real_BT, action_BT)                                 # the whole batch

The rewards are rl/rewards.py's ``Rewards`` (its reward_model term rl/reward_model.py's scorer).
Rollout, reference and the reward model run in the gang's processes or, behind the same calls
(``RolloutGroup``, ``ReferenceRole``, the reward term's signature), as Ray actor groups
(cluster/roles.py).

The policy and the critic train in one DeepSpeed engine over ``ActorCritic`` (their parameters
are disjoint, so one AdamW over both equals two with the same settings; the clip norm is joint).
``critic="shared"`` puts a value head on the policy's trunk; ``"separate"`` copies the start
model's trunk (no lm_head) for the critic, as OpenRLHF/veRL initialise it from the SFT model.

Rollout and training share one model module (training/model.py). The MoE router picks experts
from the same weights and tokens in both, so ``ActorCritic`` turns off the training-only token
dropping (capacity_factor), which would make the trained log-probs differ from the sampled ones.

Shape legend: B completions, T positions, V vocabulary, D model width.
"""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from training.generate import Generation, generate
from training.model import Transformer


def no_token_dropping(model: Transformer) -> Transformer:
    """The same model with MoE capacity dropping off (it applies in training mode only)."""
    cfg = model.cfg.model_copy(update={"capacity_factor": None})
    model.cfg = cfg
    for moe in model.moe_layers().values():
        moe.cfg = cfg
    return model


class ActorCritic(nn.Module):
    """The policy and, unless critic is "none", a value model: one forward gives (logits, values, aux)."""

    def __init__(self, policy: Transformer, critic: str = "none"):
        super().__init__()
        if critic not in ("none", "shared", "separate"):
            raise ValueError(f"critic={critic!r}: expected none, shared or separate")
        self.critic_kind = critic
        self.policy = no_token_dropping(policy)
        self.critic_trunk = None
        if critic == "separate":
            trunk = copy.deepcopy(self.policy)
            trunk.lm_head = None  # a value model: no vocabulary projection, no weights for it
            self.critic_trunk = trunk
        self.value_head = None
        if critic != "none":
            self.value_head = nn.Linear(policy.cfg.d_model, 1)
            nn.init.zeros_(self.value_head.weight)  # values start at 0: the first advantages are the returns
            nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_folder(cls, folder: str | Path, critic: str = "none") -> "ActorCritic":
        from training.export import load_model
        return cls(load_model(folder), critic)

    def forward(self, ids_BT: torch.Tensor, real_BT: torch.Tensor | None = None):
        """(logits_BTV, values_BT or None, aux loss) of right-padded rows."""
        x_BTD, aux = self.policy._blocks(ids_BT, None, None, None, real_BT, None)
        h_BTD = self.policy.norm(x_BTD)
        logits_BTV = self.policy.lm_head(h_BTD)
        values_BT = None
        if self.critic_kind == "shared":
            values_BT = self.value_head(h_BTD).squeeze(-1).float()
        elif self.critic_kind == "separate":
            hc_BTD, aux_c = self.critic_trunk.hidden(ids_BT, real_BT=real_BT)
            values_BT = self.value_head(hc_BTD).squeeze(-1).float()
            aux = aux + aux_c
        return logits_BTV, values_BT, aux

    # what the loop's metrics and balancing call, and activation checkpointing walks
    @property
    def blocks(self) -> list[nn.Module]:
        return [*self.policy.blocks, *(self.critic_trunk.blocks if self.critic_trunk is not None else [])]

    def expert_loads(self) -> dict[int, torch.Tensor]:
        return self.policy.expert_loads()

    def update_router_bias(self, all_reduce=None) -> None:
        self.policy.update_router_bias(all_reduce)
        if self.critic_trunk is not None:
            self.critic_trunk.update_router_bias(all_reduce)


def policy_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The policy's weights (and router biases) out of an ActorCritic state dict."""
    return {k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")}


class RolloutGroup(Protocol):
    """What the RL loop needs of its sampler: load the policy's weights, sample completions.

    ``Rollout`` is one in the worker's own process (colocated with the policy);
    cluster/roles.py's ``RayRolloutGroup`` spreads the same work over Ray actors. Batch b of a
    call samples with seed (seed, b), so the completions do not depend on where batches run."""

    def sync(self, weights: dict[str, torch.Tensor]) -> None: ...

    def generate(self, prompts: list[list[int]], cfg, seed: int) -> Generation: ...


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (any size): no overflow, no collisions between nearby tuples."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def batch_seed(seed: int, batch: int) -> int:
    return mix_seed(seed, batch)


def plan_rollout(prompts: list[list[int]], batch_size: int) -> list[tuple[int, list[list[int]]]]:
    """(batch number, its prompts): the unit of work a rollout group spreads."""
    return [(b, prompts[lo:lo + batch_size]) for b, lo in enumerate(range(0, len(prompts), batch_size))]


def stack_generations(parts: list[Generation], pad_id: int) -> Generation:
    """Batches' generations as one, tokens padded to the longest completion."""
    tokens = [t for g in parts for t in g.tokens]
    width = max(len(t) for t in tokens)
    padded = torch.full((len(tokens), width), pad_id, dtype=torch.long)
    for i, t in enumerate(tokens):
        padded[i, :len(t)] = t.cpu()
    return Generation(padded, torch.cat([g.lengths.cpu() for g in parts]))


class Rollout:
    """Batched sampling with the KV cache on a model of its own, synced from the policy."""

    def __init__(self, model_cfg, stop_ids: list[int], pad_id: int, device: torch.device | str = "cpu"):
        self.model = no_token_dropping(Transformer(model_cfg)).to(device).eval()
        self.model.requires_grad_(False)
        self.stop_ids, self.pad_id, self.device = list(stop_ids), pad_id, torch.device(device)

    @torch.no_grad()
    def sync(self, weights: dict[str, torch.Tensor]) -> None:
        """The policy's current weights (every parameter and buffer, the router bias included)."""
        self.model.load_state_dict(weights, strict=True)

    def generate_batch(self, batch: int, prompts: list[list[int]], cfg, seed: int) -> Generation:
        g = torch.Generator(device=self.device).manual_seed(batch_seed(seed, batch))
        out = generate(self.model, prompts, max_new_tokens=cfg.max_new_tokens, stop_ids=self.stop_ids,
                       pad_id=self.pad_id, temperature=cfg.temperature,
                       top_p=cfg.top_p if cfg.top_p < 1 else None, generator=g)
        return Generation(out.tokens.cpu(), out.lengths.cpu())

    def generate(self, prompts: list[list[int]], cfg, seed: int) -> Generation:
        """Completions of each prompt (prompts repeat G times for a group), cfg.batch_size at a time."""
        parts = [self.generate_batch(b, chunk, cfg, seed) for b, chunk in plan_rollout(prompts, cfg.batch_size)]
        return stack_generations(parts, self.pad_id)


class ReferenceRole(Protocol):
    """What the RL loop needs of the frozen reference: per-token log-probs of a whole batch.

    ``Reference`` computes them in the worker's process (over the gang's FrozenModel, sharded under
    ZeRO-3); cluster/roles.py's ``RayReferenceGroup`` spreads the same micro-batches over Ray
    actors holding a whole copy each, with equal results."""

    def logprobs(self, ids_BT: torch.Tensor, real_BT: torch.Tensor, action_BT: torch.Tensor) -> torch.Tensor: ...


def micro_batches(n: int, micro_batch: int) -> list[slice]:
    """The row slices a reference pass goes through, wherever it runs."""
    return [slice(lo, lo + micro_batch) for lo in range(0, n, micro_batch)]


class Reference:
    """The frozen reference policy's per-token log-probs, micro_batch rows per forward.

    model: a training.engine.FrozenModel (the gang's), or a plain Transformer in eval mode
    (``Reference.from_folder``: a Ray actor's own copy)."""

    def __init__(self, model, temperature: float = 1.0, micro_batch: int = 8):
        self.model, self.temperature, self.micro_batch = model, temperature, micro_batch
        self.device = getattr(model, "device", None) or next(model.parameters()).device

    @classmethod
    def from_folder(cls, folder: str | Path, *, temperature: float = 1.0, micro_batch: int = 8,
                    device: str | torch.device = "cpu") -> "Reference":
        from training.export import load_model
        model = load_model(folder, device).eval()
        model.requires_grad_(False)
        return cls(model, temperature, micro_batch)

    @torch.no_grad()
    def logprobs_chunk(self, ids_BT: torch.Tensor, real_BT: torch.Tensor, action_BT: torch.Tensor) -> torch.Tensor:
        """One forward: (B, T) log-probs of the next tokens at action positions, 0 elsewhere."""
        from training.logprobs import token_logprobs
        ids, real, action = (t.to(self.device) for t in (ids_BT, real_BT, action_BT))
        logits = self.model(ids, real_BT=real).logits / self.temperature
        return token_logprobs(logits, action_targets(ids, action)).cpu()

    def logprobs(self, ids_BT: torch.Tensor, real_BT: torch.Tensor, action_BT: torch.Tensor) -> torch.Tensor:
        parts = [self.logprobs_chunk(ids_BT[s], real_BT[s], action_BT[s])
                 for s in micro_batches(ids_BT.shape[0], self.micro_batch)]
        return torch.cat(parts)


def action_targets(ids_BT: torch.Tensor, action_BT: torch.Tensor) -> torch.Tensor:
    """Next-token targets at action positions, IGNORE elsewhere."""
    from training.logprobs import IGNORE
    targets = torch.full_like(ids_BT, IGNORE)
    targets[:, :-1] = ids_BT[:, 1:]
    return targets.masked_fill(~action_BT.bool(), IGNORE)
