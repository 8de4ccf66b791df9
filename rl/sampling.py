"""Which prompts an RL iteration trains on; the sampler's position is part of the checkpoint
(rl/ppo.py's RlJob), so a resumed run draws the same prompts.

    PromptSampler(n, seed)                       # uniform: a seeded order, reshuffled each pass
    LearnabilitySampler(cells, seed)             # prompts of the cells the policy half solves, more often
    sampler.take(8) -> task indices; sampler.observe(task indices, accuracies) after scoring

The learnability curriculum groups the tasks into cells (family x difficulty) and keeps, per cell,
a running estimate p of the policy's sampled accuracy. A group of G completions teaches only when
its rewards differ, which happens most often where p(1 - p) is largest (half solved) and never where
the policy always or never succeeds, so each prompt's cell is drawn with weight
max(p(1 - p), floor): cells the policy never solves are still visited (floor) and can come back.
Every cell starts at p = 0.5 (all alike: the first draws are uniform over cells). Within a cell,
prompts come in a seeded shuffled order, reshuffled each pass. Every rank draws and observes
the same (the caller gathers every rank's groups), so the ranks stay in step.
"""
from __future__ import annotations

import torch

from rl.roles import mix_seed


class PromptSampler:
    """Prompts in a seeded shuffled order, reshuffled each pass; the same on every rank."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._permutation()


class LearnabilitySampler:
    """Cells of prompts drawn by how much a group there can teach: max(p(1 - p), floor)."""

    def __init__(self, cells: list[str], seed: int, *, rate: float = 0.2, floor: float = 0.02):
        """cells: each task's cell (e.g. "arithmetic/basic"); rate: weight of a new observation in
        the running accuracy of its cell."""
        self.names = sorted(set(cells))
        self.cell_of = [self.names.index(c) for c in cells]
        members = [[i for i, c in enumerate(self.cell_of) if c == j] for j in range(len(self.names))]
        self.seed, self.rate, self.floor = seed, rate, floor
        self.cells = [_Cell(m, mix_seed(seed, j)) for j, m in enumerate(members)]
        self.accuracy = [0.5] * len(self.names)
        self.draws = 0

    def weights(self) -> torch.Tensor:
        p = torch.tensor(self.accuracy, dtype=torch.float64)
        return torch.clamp(p * (1 - p), min=self.floor)

    def take(self, k: int) -> list[int]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, -1, self.draws))
        self.draws += 1
        picks = torch.multinomial(self.weights(), k, replacement=True, generator=g).tolist()
        return [self.cells[j].next() for j in picks]

    def observe(self, tasks: list[int], accuracies: list[float]) -> None:
        """Each group's mean accuracy moves its cell's running accuracy (in the order given: every
        rank passes the same gathered list)."""
        for task, acc in zip(tasks, accuracies):
            j = self.cell_of[task]
            self.accuracy[j] += self.rate * (float(acc) - self.accuracy[j])

    def metrics(self) -> dict[str, float]:
        w = self.weights()
        share = w / w.sum()
        # how far from uniform over cells the draws are: the share of the 1/4 most drawn cells
        top = torch.sort(share, descending=True).values[:max(1, len(share) // 4)].sum()
        return {"curriculum/top_quarter_share": float(top),
                "curriculum/mean_cell_accuracy": float(sum(self.accuracy) / len(self.accuracy))}

    def state_dict(self) -> dict:
        return {"draws": self.draws, "accuracy": list(self.accuracy), "cells": [c.state() for c in self.cells]}

    def load_state_dict(self, state: dict) -> None:
        self.draws, self.accuracy = state["draws"], list(state["accuracy"])
        for cell, s in zip(self.cells, state["cells"]):
            cell.load(s)


class _Cell:
    """One cell's prompts in a seeded order, reshuffled each pass."""

    def __init__(self, members: list[int], seed: int):
        self.members, self.seed, self.epoch, self.pos = members, seed, 0, 0
        self.order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        return [self.members[i] for i in torch.randperm(len(self.members), generator=g).tolist()]

    def next(self) -> int:
        if self.pos == len(self.order):
            self.epoch, self.pos = self.epoch + 1, 0
            self.order = self._permutation()
        self.pos += 1
        return self.order[self.pos - 1]

    def state(self) -> list[int]:
        return [self.epoch, self.pos]

    def load(self, state: list[int]) -> None:
        self.epoch, self.pos = state
        self.order = self._permutation()
