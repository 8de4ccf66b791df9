"""RL's roles as Ray actor groups: the plain classes of rl/roles.py, wrapped at the edge.

    group = RayRolloutGroup(model_cfg, stop_ids, pad_id, workers=4, use_gpu=True)
    group.sync(weights)                          # one object-store copy, every actor loads it
    gen = group.generate(prompts, rollout_cfg, seed)   # batches spread round robin over the actors
    group.shutdown()

The actors sit in one placement group (PACK: together on one machine where they fit; SPREAD over
GPUs of a cluster). Batch b of a call samples with seed (seed, b) on whichever actor runs it, so a
group gives the completions an in-process ``Rollout`` gives (tested). The RL gang's workers share
one group: rank 0 syncs it, every rank samples its share of the prompts through it.
"""
from __future__ import annotations

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rl.roles import Rollout, plan_rollout, stack_generations
from training.generate import Generation


class RayRolloutGroup:
    """N Rollout actors behind rl.roles.RolloutGroup's two calls."""

    def __init__(self, model_cfg, stop_ids: list[int], pad_id: int, *, workers: int, use_gpu: bool = False,
                 cpus_per_worker: float = 1.0, strategy: str = "PACK", key: str = "rollout.workers",
                 reserve: dict[str, float] | None = None):
        """reserve: resources that must stay free beside the group (the gang that will use it)."""
        if workers < 1:
            raise ValueError(f"{key}={workers}: a rollout group needs at least one worker")
        bundle = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
        self._check_fits(bundle, workers, key, reserve or {})
        self.pg = placement_group([bundle] * workers, strategy=strategy)
        ray.get(self.pg.ready())
        actor = ray.remote(Rollout)
        self.actors = [actor.options(num_cpus=cpus_per_worker, num_gpus=1 if use_gpu else 0,
                                     scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, i))
                       .remote(model_cfg, stop_ids, pad_id, "cuda" if use_gpu else "cpu")
                       for i in range(workers)]
        self.pad_id = pad_id

    @staticmethod
    def _check_fits(bundle: dict, workers: int, key: str, reserve: dict[str, float]) -> None:
        """Totals only (a placement may still wait on fragmentation): enough for the group and the gang."""
        free = ray.available_resources()
        need = {k: v * workers for k, v in bundle.items()}
        short = {k: v for k, v in need.items() if free.get(k, 0) - reserve.get(k, 0) + 1e-9 < v}
        if short:
            raise ValueError(f"{key}={workers}: the rollout workers need {short} beside the gang's "
                             f"{ {k: reserve[k] for k in short if k in reserve} }, but the cluster has "
                             f"{ {k: free.get(k, 0) for k in short} } free; lower the workers or their "
                             "cpus_per_worker, or set rollout.workers: 0 (colocated)")

    def sync(self, weights: dict) -> None:
        ref = ray.put(weights)
        ray.get([a.sync.remote(ref) for a in self.actors])

    def generate(self, prompts: list[list[int]], cfg, seed: int) -> Generation:
        plan = plan_rollout(prompts, cfg.batch_size)
        futures = [self.actors[i % len(self.actors)].generate_batch.remote(b, chunk, cfg, seed)
                   for i, (b, chunk) in enumerate(plan)]
        return stack_generations(ray.get(futures), self.pad_id)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.pg)
