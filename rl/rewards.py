"""RL rewards: each term a function of a batch of samples, combined with a stage's weights.

    rewards = Rewards({"accuracy": 1.0, "format": 0.2, "conciseness": 0.1}, RewardParams())
    scored = rewards.score(samples)         # scored.total_B, scored.terms["accuracy"] (each logged)

A term takes the whole batch (``Sample``s, the G samples of a prompt consecutive) and returns
one float per sample:

| term | value | why |
|---|---|---|
| ``accuracy`` | 1 if the task's checker accepts the answer, else 0 | the verifiable reward (R1) |
| ``format`` | 1 for one think block then one answer, else 0 | R1's format reward |
| ``conciseness`` | 1 - length / budget, clipped to [-1, 1]; with ``conciseness_gate: correct`` a wrong answer gets only the part below 0 | shorter is better, past the budget it costs; gated, a short wrong answer earns nothing (Kimi k1.5's length reward) |
| ``safety`` | -1 if the completion hits the blocklist or holds PII (the quality stage's detectors), else 0 | a penalty |
| ``novelty`` | share of the completion's word n-grams not in the other samples of its group nor the recent history | diversity against collapse |
| ``overlong`` | 0 up to max_new_tokens - buffer, then falling linearly to -1 at max_new_tokens | DAPO's soft overlong penalty |
| ``reward_model`` | the trained reward model's score (rl/reward_model.py) | a learned reward |

A recipe adds its own term by import path, ``"my_pkg.rewards:brevity"``, with the same batch
signature ``fn(samples: list[Sample], **params) -> list[float]`` (params: RewardParams' fields). Rewards read completions as text;
nothing a model writes is ever executed (a python_eval task is checked against its known answer).
"""
from __future__ import annotations

import importlib
import math
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from data_engine.generators.tasks import check, format_ok
from rl.config import REWARD_TERMS


@dataclass(frozen=True)
class Sample:
    prompt: str
    completion: str            # decoded, without padding and the end-of-sequence token
    answer: str
    checker: str = "answer"
    group: int = 0             # index of its prompt in the batch
    n_tokens: int = 0          # completion tokens, stop token included
    truncated: bool = False    # stopped by max_new_tokens, not by a stop token
    system: str | None = None
    family: str = ""
    difficulty: str = ""


@dataclass
class RewardParams:
    length_budget: int = 128                 # conciseness: tokens at which the term is 0
    conciseness_gate: str = "none"           # conciseness: "correct" = only right answers earn the bonus
    novelty_n: int = 3                       # novelty: word n-gram order
    novelty_history: int = 256               # novelty: completions of earlier batches remembered
    max_new_tokens: int = 256                # overlong: the hard limit
    overlong_buffer: int = 32                # overlong: the penalty ramps over this many tokens
    reward_model: str | None = None          # folder of a reward_model stage's model/
    quality: object | None = None            # data_engine.quality.QualityConfig for safety


@dataclass
class Scored:
    total_B: torch.Tensor                    # the weighted sum
    terms: dict[str, torch.Tensor] = field(default_factory=dict)   # each term, unweighted

    def metrics(self) -> dict[str, float]:
        out = {"reward/mean": float(self.total_B.mean()), "reward/std": float(self.total_B.std(unbiased=False))}
        for name, v in self.terms.items():
            out[f"reward/{name}/mean"] = float(v.mean())
            out[f"reward/{name}/std"] = float(v.std(unbiased=False))
        return out


# ----------------------------------------------------------------------------- the terms


def accuracy(samples: Sequence[Sample], **_) -> list[float]:
    return [float(check(s.checker, s.answer, s.completion)) for s in samples]


def format_reward(samples: Sequence[Sample], **_) -> list[float]:
    return [float(format_ok(s.completion)) for s in samples]


def conciseness(samples: Sequence[Sample], length_budget: int = 128, conciseness_gate: str = "none", **_) -> list[float]:
    """1 - length / budget, clipped to [-1, 1]. Gated ("correct"), a completion the task's checker
    rejects keeps only the penalty past the budget (min(0, .)): shortening a wrong answer earns nothing,
    so the term cannot pay the policy to cut the reasoning a right answer needs."""
    if length_budget < 1:
        raise ValueError(f"length_budget={length_budget} must be >= 1")
    if conciseness_gate not in ("none", "correct"):
        raise ValueError(f"conciseness_gate={conciseness_gate!r}: expected 'none' or 'correct'")
    out = [max(-1.0, min(1.0, 1.0 - s.n_tokens / length_budget)) for s in samples]
    if conciseness_gate == "correct":
        out = [v if right else min(0.0, v) for v, right in zip(out, accuracy(samples))]
    return out


def safety(samples: Sequence[Sample], quality=None, **_) -> list[float]:
    from data_engine.quality import QualityConfig
    from data_engine.safety import PII_KINDS, blocklist_pattern, find_pii
    cfg = quality or QualityConfig()
    regex = blocklist_pattern(cfg)
    out = []
    for s in samples:
        hit = bool(regex is not None and regex.search(s.completion))
        hit = hit or any(find_pii(s.completion, kind, cfg) for kind in PII_KINDS)
        out.append(-1.0 if hit else 0.0)
    return out


_WORD = re.compile(r"\w+|[^\w\s]")


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


class Novelty:
    """Distinct n-grams against the group's other samples and a bounded history of earlier
    batches; the history is part of a run's state (state_dict), so a resumed run scores alike."""

    def __init__(self, n: int = 3, history: int = 256):
        self.n, self.history = n, deque(maxlen=history)

    def __call__(self, samples: Sequence[Sample], **_) -> list[float]:
        grams = [ngrams(s.completion, self.n) for s in samples]
        past: set = set().union(*(ngrams(t, self.n) for t in self.history)) if self.history else set()
        out = []
        for i, (s, mine) in enumerate(zip(samples, grams)):
            if not mine:
                out.append(0.0)
                continue
            seen = set(past)
            for j, other in enumerate(samples):
                if j != i and other.group == s.group:
                    seen |= grams[j]
            out.append(len(mine - seen) / len(mine))
        return out

    def remember(self, completions: Sequence[str]) -> None:
        self.history.extend(completions)

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history.clear()
        self.history.extend(state.get("history", []))


def overlong(samples: Sequence[Sample], max_new_tokens: int = 256, overlong_buffer: int = 32, **_) -> list[float]:
    start = max_new_tokens - overlong_buffer
    return [0.0 if s.n_tokens <= start else max(-1.0, (start - s.n_tokens) / max(overlong_buffer, 1))
            for s in samples]


class RewardModelTerm:
    """The trained reward model's score, loaded once per process."""

    def __init__(self, folder: str, batch_size: int = 16):
        from rl.reward_model import RewardScorer
        self.scorer = RewardScorer.from_folder(folder)
        self.batch_size = batch_size

    def __call__(self, samples: Sequence[Sample], **_) -> list[float]:
        return self.scorer.score([s.prompt for s in samples], [s.completion for s in samples],
                                 systems=[s.system for s in samples], batch_size=self.batch_size)


# the stateless terms; novelty (a history) and reward_model (a model) are built per Rewards
BUILTIN: dict[str, Callable[..., list[float]]] = {
    "accuracy": accuracy, "format": format_reward, "conciseness": conciseness, "safety": safety,
    "overlong": overlong}


def load_function(path: str) -> Callable[..., list[float]]:
    """A user's reward function, "package.module:function"; errors name the path."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward {path!r}: give a custom reward as 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward {path!r}: cannot import {module_name!r} ({err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {path!r}: {module_name} has no function {attr!r}")
    return fn


def known_term(name: str) -> bool:
    return name in REWARD_TERMS or ":" in name


class Rewards:
    """The reward of a stage: its terms with weights; every term is computed (and logged) even at
    weight 0, so curves of unweighted terms (accuracy in a conciseness stage) stay visible."""

    def __init__(self, weights: dict[str, float], params: RewardParams | None = None,
                 always: Sequence[str] = ("accuracy", "format"),
                 served: dict[str, Callable[..., list[float]]] | None = None):
        """served: terms computed elsewhere with the term signature (the reward model as a Ray actor
        group, cluster/roles.py), used instead of building them here."""
        self.params = params or RewardParams()
        self.served = dict(served or {})
        unknown = [n for n in weights if not known_term(n)]
        if unknown:
            raise ValueError(f"unknown reward term(s) {unknown}; known: {list(REWARD_TERMS)} "
                             "or a custom 'package.module:function'")
        self.weights = dict(weights)
        self.novelty = Novelty(self.params.novelty_n, self.params.novelty_history)
        self.fns: dict[str, Callable[..., list[float]]] = {}
        for name in [*always, *[n for n in weights if n not in always]]:
            self.fns[name] = self._function(name)

    def _function(self, name: str) -> Callable[..., list[float]]:
        if name in self.served:
            return self.served[name]
        if name in BUILTIN:
            return BUILTIN[name]
        if name == "novelty":
            return self.novelty
        if name == "reward_model":
            if not self.params.reward_model:
                raise ValueError("reward term 'reward_model' needs a reward model folder (a reward_model "
                                 "stage in the recipe, or prl.reward_model)")
            return RewardModelTerm(self.params.reward_model)
        return load_function(name)

    def score(self, samples: Sequence[Sample]) -> Scored:
        kwargs = {k: v for k, v in vars(self.params).items() if k != "reward_model"}
        terms = {}
        for name, fn in self.fns.items():
            values = list(fn(samples, **kwargs))
            if len(values) != len(samples) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise ValueError(f"reward term {name!r} must return one finite number per sample "
                                 f"({len(samples)}); got {str(values)[:120]}")
            terms[name] = torch.tensor(values, dtype=torch.float32)
        total = torch.zeros(len(samples), dtype=torch.float32)
        for name, w in self.weights.items():
            total += w * terms[name]
        return Scored(total, terms)

    def remember(self, completions: Sequence[str]) -> None:
        """Add a batch's completions (every rank's, in rank order) to the novelty history."""
        self.novelty.remember(completions)
