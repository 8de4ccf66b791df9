"""RL's roles as Ray actor groups: the plain classes of rl/roles.py (and rl/reward_model.py), wrapped
at the edge.

    group = RayRolloutGroup(model_cfg, stop_ids, pad_id, workers=4, use_gpu=True)
    group.sync(weights)                          # one object-store copy, every actor loads it
    gen = group.generate(prompts, rollout_cfg, seed)   # batches spread round robin over the actors

    ref = RayReferenceGroup("runs/r1/dpo/model", workers=2, temperature=1.0, micro_batch=16)
    logp_BT = ref.logprobs(ids_BT, real_BT, action_BT) # micro-batches spread over the actors

    rm = RayRewardModelGroup("runs/r1/reward_model/model", workers=1)
    scores = rm(samples)                         # the reward_model term: batches spread likewise

    group.shutdown()

Each group's actors sit in one placement group (PACK: together on one machine where they fit;
SPREAD over GPUs of a cluster), sized and checked before any actor starts: a group that cannot
fit beside the gang that uses it is refused by its recipe key. Work is cut into the same units
the in-process class uses (rollout batch b samples with seed (seed, b); the reference's
micro-batches; the reward model's length-sorted batches), so a group gives what the class gives
in process (tested). The RL gang's workers share the groups: each rank sends its own share.
"""
from __future__ import annotations

from pathlib import Path

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster import storage
from cluster.gang import shortfall, summed
from rl.reward_model import RewardEncoder, RewardScorer
from rl.roles import Reference, Rollout, micro_batches, plan_rollout, stack_generations
from training.generate import Generation


class ActorGroup:
    """N actors of one class in one placement group; calls go round robin over them."""

    role = "role"

    def __init__(self, cls, args: tuple, *, workers: int, use_gpu: bool, cpus_per_worker: float, strategy: str,
                 key: str, reserve: dict[str, float] | None):
        """reserve: resources that must stay free beside the group (the gang that will use it)."""
        if workers < 1:
            raise ValueError(f"{key}={workers}: a {self.role} group needs at least one worker")
        bundle = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
        self._check_fits(bundle, workers, key, reserve or {})
        self.pg = placement_group([bundle] * workers, strategy=strategy)
        ray.get(self.pg.ready())
        device = "cuda" if use_gpu else "cpu"
        actor = ray.remote(cls)
        self.actors = [actor.options(num_cpus=cpus_per_worker, num_gpus=1 if use_gpu else 0,
                                     scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, i))
                       .remote(*args, device) for i in range(workers)]

    def _check_fits(self, bundle: dict, workers: int, key: str, reserve: dict[str, float]) -> None:
        """Free now: the group and the gang beside it, by the gang's totals rule (cluster.gang.shortfall;
        a placement may still wait on fragmentation)."""
        free = ray.available_resources()
        need = {k: v * workers for k, v in bundle.items()}
        short = {k: need[k] for k in shortfall(summed([need, reserve]), free) if k in need}
        if short:
            raise ValueError(f"{key}={workers}: the {self.role} workers need {short} beside the gang's "
                             f"{ {k: reserve[k] for k in short if k in reserve} }, but the cluster has "
                             f"{ {k: free.get(k, 0) for k in short} } free; lower the workers or their "
                             f"cpus_per_worker, or set {key}: 0 (colocated)")

    def map(self, method: str, calls: list[tuple]) -> list:
        """Call `method` once per argument tuple, spread round robin; the results in call order."""
        return ray.get([getattr(self.actors[i % len(self.actors)], method).remote(*args)
                        for i, args in enumerate(calls)])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.pg)


class RayRolloutGroup(ActorGroup):
    """N Rollout actors behind rl.roles.RolloutGroup's two calls."""

    role = "rollout"

    def __init__(self, model_cfg, stop_ids: list[int], pad_id: int, *, workers: int, use_gpu: bool = False,
                 cpus_per_worker: float = 1.0, strategy: str = "PACK", key: str = "rollout.workers",
                 reserve: dict[str, float] | None = None):
        super().__init__(Rollout, (model_cfg, stop_ids, pad_id), workers=workers, use_gpu=use_gpu,
                         cpus_per_worker=cpus_per_worker, strategy=strategy, key=key, reserve=reserve)
        self.pad_id = pad_id

    def sync(self, weights: dict) -> None:
        ref = ray.put(weights)
        ray.get([a.sync.remote(ref) for a in self.actors])

    def generate(self, prompts: list[list[int]], cfg, seed: int) -> Generation:
        calls = [(b, chunk, cfg, seed) for b, chunk in plan_rollout(prompts, cfg.batch_size)]
        return stack_generations(self.map("generate_batch", calls), self.pad_id)


class ReferenceWorker(Reference):
    """A Reference holding its own copy of the start model (what each actor of the group runs)."""

    def __init__(self, folder: str, temperature: float, micro_batch: int, mirrors: dict[str, str], device: str):
        storage.adopt(mirrors)
        storage.localize(folder)  # a node that does not share the run's folder fetches the model
        own = Reference.from_folder(folder, temperature=temperature, micro_batch=micro_batch, device=device)
        super().__init__(own.model, temperature, micro_batch)


class RayReferenceGroup(ActorGroup):
    """N reference actors behind rl.roles.ReferenceRole: a batch's micro-batches spread over them."""

    role = "reference"

    def __init__(self, folder: str | Path, *, temperature: float, micro_batch: int, workers: int,
                 use_gpu: bool = False, cpus_per_worker: float = 1.0, strategy: str = "PACK",
                 key: str = "roles.reference.workers", reserve: dict[str, float] | None = None):
        super().__init__(ReferenceWorker, (str(folder), temperature, micro_batch, storage.carried()), workers=workers,
                         use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, strategy=strategy, key=key,
                         reserve=reserve)
        self.micro_batch = micro_batch

    def logprobs(self, ids_BT: torch.Tensor, real_BT: torch.Tensor, action_BT: torch.Tensor) -> torch.Tensor:
        calls = [(ids_BT[s], real_BT[s], action_BT[s]) for s in micro_batches(ids_BT.shape[0], self.micro_batch)]
        return torch.cat(self.map("logprobs_chunk", calls))


class ScorerWorker:
    """A RewardScorer on its own copy of the reward model (what each actor of the group runs)."""

    def __init__(self, folder: str, mirrors: dict[str, str], device: str):
        storage.adopt(mirrors)
        storage.localize(folder)
        self.scorer = RewardScorer.from_folder(folder, device)

    def score_ids(self, seqs: list[list[int]]) -> list[float]:
        return self.scorer.score_ids(seqs)


class RayRewardModelGroup(ActorGroup):
    """N reward model actors behind the reward_model term's signature (samples -> one score each).

    The caller's process renders and batches the texts (rl.reward_model.RewardEncoder: the
    tokenizer only); the actors score the batches, as rl.rewards.RewardModelTerm does in process."""

    role = "reward model"

    def __init__(self, folder: str | Path, *, workers: int, batch_size: int = 16, use_gpu: bool = False,
                 cpus_per_worker: float = 1.0, strategy: str = "PACK", key: str = "roles.reward_model.workers",
                 reserve: dict[str, float] | None = None):
        self.folder, self.batch_size = str(folder), batch_size
        self.encoder = RewardEncoder.from_folder(folder)  # checks the folder before any actor starts
        super().__init__(ScorerWorker, (self.folder, storage.carried()), workers=workers, use_gpu=use_gpu,
                         cpus_per_worker=cpus_per_worker, strategy=strategy, key=key, reserve=reserve)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "encoder": None}  # the gang's workers rebuild it (a tokenizer)

    def __call__(self, samples, **_) -> list[float]:
        if self.encoder is None:  # in a gang worker, which localized its payload's folders
            self.encoder = RewardEncoder.from_folder(self.folder)
        return self.encoder.score([s.prompt for s in samples], [s.completion for s in samples],
                                  [s.system for s in samples], self.batch_size,
                                  lambda batches: self.map("score_ids", [(b,) for b in batches]))
