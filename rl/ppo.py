"""RL on verifiable tasks: PPO (GAE, a critic, KL) and GRPO and its variants, in the shared loop.

One iteration reads like the algorithm, one timed phase per line (RlJob.rollout_iteration):

    sync        rollout model <- the policy's weights
    generate    G completions per prompt, batched, KV cache (and DAPO's refill of tied groups)
    score       reward terms per completion, weighted (rl/rewards.py)
    logprobs    old log-probs and values of the policy, the reference's log-probs
    advantages  token rewards (KL penalty if in the reward) -> the estimator (rl/advantages.py)
    update      epochs x minibatches of optimizer steps: the shared loop's steps

A loop step (training/loop.py) is one optimizer update, so checkpoints, resume, non-finite
steps and metrics are the same as every stage's; checkpoints fall on iteration boundaries and
hold the policy, the critic, their optimizer state, the RNG states, the prompt sampler's
position, the novelty history and the plateau rule's state. Sampling seeds derive from
(seed, iteration, round, rank), so a resumed run replays the same completions.

    summary = rl(RlConfig(...), RlPaths(train_tasks=[...], init_model=Path("runs/r1/dpo/model"), ...), seed=0)

On a cluster it runs as a gang (cluster/train.py), every rank sampling its share of the prompts
(the groups of one prompt stay on one rank) with a rollout copy of the policy beside it.
Shape legend: B completions, T positions.
"""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from rl.advantages import estimate, informative_groups, token_rewards
from rl.config import PLACEMENT, RlConfig
from rl.eval import EvalTask, completion_text, load_tasks
from rl.losses import aggregate_parts, entropy_from_logits, kl_penalty, policy_loss, value_loss
from rl.rewards import RewardParams, Rewards, Sample
from rl.roles import (ActorCritic, Reference, ReferenceRole, Rollout, RolloutGroup, action_targets, mix_seed,
                      policy_state)
from rl.sampling import LearnabilitySampler, PromptSampler
from training.distributed import all_gather, all_sum, barrier, rank_world
from training.engine import Engine, FrozenModel, StepResult, ensure_process_group
from training.export import load_model_config, save_model
from training.generate import Generation
from training.hashing import sha256_file
from training.logprobs import token_logprobs
from training.loop import Hooks, paths_from_payload, train
from training.model import Transformer, flops_per_token
from training.pretrain import expert_metrics
from training.template import encode_prompt
from training.tokenizer import EOS, PAD, load_tokenizer, special_token_ids


@dataclass
class RlPaths:
    train_tasks: list[Path]     # the tasks stage's train split: the prompts
    init_model: Path            # the policy's start (and the reference, and a separate critic's trunk)
    work: Path
    checkpoints: Path
    out: Path                   # model/ goes here (rank 0)


class Phases:
    """Seconds per phase of one iteration: `with phases("generate"): ...`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass
class Group:
    """One prompt's G completions with their scores."""
    task: int                           # index of its task (the sampler's unit)
    prompt: list[int]
    completions: list[list[int]]
    samples: list[Sample]
    total: torch.Tensor                 # (G,)
    terms: dict[str, torch.Tensor]      # term -> (G,)


class RlJob:
    """The shared loop's job for RL: each step is one update; an empty queue triggers a rollout."""

    summary_keys = ("reward/mean", "reward/accuracy/mean", "reward/format/mean", "policy_loss", "kl",
                    "entropy", "response_length/mean", "iteration")

    def __init__(self, cfg: RlConfig, tasks: list[EvalTask], prompts: list[list[int]], tok, model_cfg,
                 reference: ReferenceRole | None,
                 rewards: Rewards, seed: int, identity: dict, rollout_group: RolloutGroup | None = None):
        self.cfg, self.tasks, self.tok, self.model_cfg = cfg, tasks, tok, model_cfg
        self.reference, self.rewards, self.seed, self._identity = reference, rewards, seed, identity
        self.rank, self.world = rank_world()
        ids = special_token_ids(tok)
        self.pad_id, self.stop_ids = ids[PAD], [ids[EOS], ids["</answer>"]]
        self.prompts = prompts  # each task's rendered prompt, token ids
        self.sampler = (LearnabilitySampler([f"{t.family}/{t.difficulty}" for t in tasks], seed,
                                            floor=cfg.rollout.curriculum_floor)
                        if cfg.rollout.curriculum == "learnability" else PromptSampler(len(tasks), seed))
        self.iteration = 0
        self.plateau = {"best": None, "since": 0, "stop": False}
        self.queue: list[tuple[list[dict], int]] = []
        self.last_rollout: dict = {}
        self.flops_per_token = flops_per_token(model_cfg, model_cfg.max_seq_len)
        self.engine: Engine | None = None
        # a group every rank shares (Ray actors, cluster/roles.py), or a Rollout in this process
        self.rollout: RolloutGroup | None = rollout_group
        self.shared_rollout = rollout_group is not None
        self._check_split()

    def _check_split(self) -> None:
        c = self.cfg
        if c.rollout.prompts % self.world:
            raise ValueError(f"rollout.prompts={c.rollout.prompts} must be a multiple of the {self.world} workers "
                             "(each worker samples whole groups)")
        if c.minibatch % (c.micro_batch * self.world):
            raise ValueError(f"minibatch={c.minibatch} must be a multiple of micro_batch={c.micro_batch} x "
                             f"{self.world} workers")

    def bind(self, engine: Engine) -> None:
        self.engine = engine
        if not self.shared_rollout:
            self.rollout = Rollout(self.model_cfg, self.stop_ids, self.pad_id, engine.device)

    def identity(self) -> dict:
        return self._identity

    # ---- the loop's interface

    def next_step(self) -> tuple[list, dict]:
        info = self.rollout_iteration() if not self.queue else {}
        micro, tokens = self.queue.pop(0)
        return micro, {**info, "tokens": tokens, "iteration": self.iteration}

    def finished(self) -> bool:
        return not self.queue and self.plateau["stop"]

    def after_step(self, engine: Engine, result: StepResult) -> dict:
        if not result.skipped:
            engine.module.update_router_bias(dist.all_reduce if self.world > 1 else None)
        return expert_metrics(engine.module.policy)

    def evaluate(self, engine: Engine) -> dict:
        return {}  # the held-out task evaluation runs on the saved model at the end of the stage

    def state_dict(self) -> dict:
        if self.queue:
            raise RuntimeError("RL checkpoints fall on iteration boundaries; updates are still queued")
        return {"sampler": self.sampler.state_dict(), "iteration": self.iteration,
                "plateau": dict(self.plateau), "novelty": self.rewards.novelty.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.iteration = state["iteration"]
        self.plateau = dict(state["plateau"])
        self.rewards.novelty.load_state_dict(state["novelty"])

    def final_model(self, weights: dict[str, torch.Tensor]) -> Transformer:
        model = Transformer(self.model_cfg)
        model.load_state_dict(policy_state(weights))
        return model

    def save_final(self, model, folder: Path) -> Path:
        return save_model(model, folder)

    # ---- one iteration

    def rollout_iteration(self) -> dict:
        phases = Phases()
        self.iteration += 1
        with phases("sync"):
            self.sync_rollout()
        groups, stats = self.sample_groups(phases)
        with phases("logprobs"):
            batch = self.build_batch(groups)
            self.score_batch(batch)
        with phases("advantages"):
            self.advantages(batch)
            self.queue = self.plan_updates(batch)
        self.rewards.remember([c for part in all_gather([s.completion for g in groups for s in g.samples])
                               for c in part])
        if self.cfg.rollout.curriculum != "uniform":  # every rank's drawn groups, in rank order, so
            outcomes = [o for part in all_gather(      # each rank's sampler moves alike
                [(g.task, float(g.terms["accuracy"].mean())) for g in stats["all"]]) for o in part]
            self.sampler.observe([t for t, _ in outcomes], [a for _, a in outcomes])
        metrics = {**self.rollout_metrics(groups, batch, stats, phases), **self.sampler.metrics()}
        self._plateau(metrics["reward/mean"])
        self.last_rollout = metrics
        return metrics

    def sync_rollout(self) -> None:
        """The rollout's weights <- the policy's: a shared group once (rank 0), a local copy per rank."""
        if self.shared_rollout:
            weights = self.engine.full_state_dict()  # collective under ZeRO-3; rank 0 gets them
            if self.rank == 0:
                self.rollout.sync(policy_state(weights))
            barrier()
        else:
            self.rollout.sync(policy_state(self.engine.full_state_dict(everywhere=True)))

    def _seed(self, round_: int) -> int:
        return mix_seed(self.seed, self.iteration, round_, self.rank)

    def sample_round(self, round_: int) -> tuple[list[int], Generation]:
        """This rank's share of a fresh global draw of prompts (task indices), G completions each."""
        G = self.cfg.rollout.group_size
        drawn = self.sampler.take(self.cfg.rollout.prompts)
        per = len(drawn) // self.world
        mine = drawn[self.rank * per:(self.rank + 1) * per]
        gen = self.rollout.generate([self.prompts[i] for i in mine for _ in range(G)], self.cfg.rollout,
                                    self._seed(round_))
        return mine, gen

    def score_round(self, mine: list[int], gen: Generation) -> list[Group]:
        """The completions as text, scored by every reward term, grouped by prompt."""
        G = self.cfg.rollout.group_size
        samples, completions = [], []
        for row, (tokens, length) in enumerate(zip(gen.tokens, gen.lengths.tolist())):
            task = self.tasks[mine[row // G]]
            ids = tokens[:length].tolist()
            truncated = length == self.cfg.rollout.max_new_tokens and ids[-1] not in self.stop_ids
            completions.append(ids)
            samples.append(Sample(task.prompt, completion_text(self.tok, ids), task.answer, task.checker,
                                  group=row // G, n_tokens=length, truncated=truncated, system=task.system,
                                  family=task.family, difficulty=task.difficulty))
        scored = self.rewards.score(samples)
        return [Group(t, self.prompts[t], completions[j * G:(j + 1) * G], samples[j * G:(j + 1) * G],
                      scored.total_B[j * G:(j + 1) * G], {k: v[j * G:(j + 1) * G] for k, v in scored.terms.items()})
                for j, t in enumerate(mine)]

    def sample_groups(self, phases: Phases) -> tuple[list[Group], dict]:
        """This rank's groups for the iteration. With dynamic sampling, groups whose rewards all tie
        are set aside and more prompts drawn (every rank draws alike) until each rank has its quota
        of informative groups or the refill rounds run out; tied groups then fill the gap."""
        quota = self.cfg.rollout.prompts // self.world
        kept, tied, drawn, rounds = [], [], 0, 0
        while True:
            with phases("generate"):
                mine, gen = self.sample_round(rounds)
            with phases("score"):
                fresh = self.score_round(mine, gen)
            drawn += len(fresh)
            for g in fresh:
                informative = bool(informative_groups(g.total, len(g.total))[0])
                (kept if informative or not self.cfg.rollout.dynamic_sampling else tied).append(g)
            rounds += 1
            short = all_sum([float(max(0, quota - len(kept)))])[0]
            if not self.cfg.rollout.dynamic_sampling or short == 0 or rounds > self.cfg.rollout.max_refill_rounds:
                break
        groups = (kept + tied)[:quota]
        # the figures describe every drawn group (kept or not), so ties, rewards and lengths are the
        # policy's, not the filter's, and the plateau rule sees the real reward
        return groups, {"rounds": rounds, "groups_drawn": drawn, "all": kept + tied}

    def build_batch(self, groups: list[Group]) -> dict:
        """Right-padded prompt + completion rows; action_BT marks the positions whose next token
        is a completion token (where log-probs, values and rewards live)."""
        rows = [(g.prompt, c) for g in groups for c in g.completions]
        width = max(len(p) + len(c) for p, c in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        real = torch.zeros((len(rows), width), dtype=torch.bool)
        action = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (p, c) in enumerate(rows):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            real[i, :len(p) + len(c)] = True
            action[i, len(p) - 1:len(p) + len(c) - 1] = True
        total = torch.cat([g.total for g in groups])
        return {"ids": ids, "real": real, "action": action, "scores": total}

    @property
    def on_policy(self) -> bool:
        """One update per rollout, no critic, no KL in the reward: the old log-probs are the update's
        own (detached), so the extra forward is skipped, as TRL does with num_iterations=1."""
        c = self.cfg
        return c.updates_per_iteration == 1 and c.critic_kind == "none" and not (c.loss.kl_coef and c.loss.kl_in == "reward")

    @torch.no_grad()
    def score_batch(self, batch: dict) -> None:
        """Old log-probs and values (the policy before this iteration's updates) and the reference's."""
        module, dev = self.engine.module, self.engine.device
        old, values = [], []
        module.eval()
        for lo in range(0, batch["ids"].shape[0], self.cfg.micro_batch):
            ids, real, act = (batch[k][lo:lo + self.cfg.micro_batch] for k in ("ids", "real", "action"))
            if not self.on_policy:
                logits, v, _ = module(ids.to(dev), real.to(dev))
                old.append(token_logprobs(logits / self.cfg.rollout.temperature,
                                          action_targets(ids.to(dev), act.to(dev))).cpu())
                values.append(v.cpu() if v is not None else torch.zeros(ids.shape))
        module.train()
        zeros = torch.zeros(batch["ids"].shape)
        batch["old_logp"] = torch.cat(old) if old else zeros  # on-policy: the update's own, detached
        batch["old_values"] = (torch.cat(values) if values else zeros) * batch["action"]
        has_ref = self.reference is not None
        batch["ref_logp"] = (self.reference.logprobs(batch["ids"], batch["real"], batch["action"]) if has_ref
                             else batch["old_logp"].clone())
        batch["has_ref"] = torch.tensor(has_ref)

    def advantages(self, batch: dict) -> None:
        c = self.cfg
        kl = kl_penalty(batch["old_logp"], batch["ref_logp"], c.loss.kl_estimator) * batch["action"]
        if self.on_policy:  # no old log-probs: the first update's `kl` is the rollout's
            kl = torch.zeros_like(kl)
        batch["rollout_kl"] = kl
        rewards_BT = token_rewards(batch["scores"], batch["action"], kl if c.loss.kl_in == "reward" else None,
                                   c.loss.kl_coef)
        adv = estimate(c.estimator, token_rewards_BT=rewards_BT, mask_BT=batch["action"],
                       values_BT=batch["old_values"] if c.critic_kind != "none" else None,
                       group_size=c.rollout.group_size, gamma=c.advantage.gamma, lam=c.advantage.lam,
                       whiten=c.advantage.whiten, sum_over_ranks=all_sum)
        batch["adv"] = adv.advantages_BT
        batch["returns"] = adv.returns_BT if adv.returns_BT is not None else torch.zeros_like(adv.advantages_BT)

    def plan_updates(self, batch: dict) -> list[tuple[list[dict], int]]:
        """epochs x minibatches of updates, each a list of micro-batches; every micro-batch carries
        the scale that turns its sums into the minibatch's mean over all ranks."""
        c, n = self.cfg, batch["ids"].shape[0]
        per_rank = c.minibatch // self.world
        gas = c.minibatch // (c.micro_batch * self.world)
        plans = []
        for epoch in range(c.epochs):
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.iteration, epoch))
            order = torch.randperm(n, generator=g)
            plans += [order[lo:lo + per_rank] for lo in range(0, n, per_rank)]
        counts = all_sum([float(x) for rows in plans
                          for x in (batch["action"][rows].sum(), batch["real"][rows].sum())])
        updates = []
        for j, rows in enumerate(plans):
            actions, tokens = counts[2 * j], counts[2 * j + 1]
            micro = []
            for lo in range(0, per_rank, c.micro_batch):
                part = rows[lo:lo + c.micro_batch]
                width = int(batch["real"][part].sum(-1).max())
                mb = {k: batch[k][part][:, :width] for k in ("ids", "real", "action", "old_logp", "ref_logp",
                                                              "adv", "returns", "old_values")}
                mb["on_policy"] = torch.tensor(self.on_policy)
                mb["has_ref"] = batch["has_ref"]
                mb["token_scale"] = torch.tensor(gas * self.world / max(actions, 1.0))
                mb["seq_scale"] = torch.tensor(gas * self.world / c.minibatch)
                micro.append(mb)
            updates.append((micro, int(tokens)))
        return updates

    # ---- the loss of one micro-batch

    def loss_fn(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        c = self.cfg
        act = batch["action"]
        logits, values, aux = model(batch["ids"], batch["real"])
        logits = logits / c.rollout.temperature  # the distribution the completions were sampled from
        logp = token_logprobs(logits, action_targets(batch["ids"], act))
        old_logp = logp.detach() if bool(batch["on_policy"]) else batch["old_logp"]
        low, high = c.loss.clip_range()
        pl = policy_loss(c.loss.policy, logp, old_logp, batch["adv"], act, eps_low=low, eps_high=high,
                         dual_clip=c.loss.dual_clip)
        agg_scale = batch["token_scale"] if c.aggregation == "token-mean" else batch["seq_scale"]

        def agg(x_BT):
            num, _ = aggregate_parts(x_BT, act, c.aggregation, norm_length=c.rollout.max_new_tokens)
            return num * agg_scale

        def token_mean(x_BT):
            return (x_BT * act).sum() * batch["token_scale"]

        entropy_BT = entropy_from_logits(logits)
        kl_BT = kl_penalty(logp, batch["ref_logp"], c.loss.kl_estimator) * act * batch["has_ref"]
        loss = agg(pl.loss_BT) - c.entropy_coef * agg(entropy_BT)
        if c.loss.kl_coef and c.loss.kl_in == "loss":
            loss = loss + c.loss.kl_coef * agg(kl_BT)
        metrics = {"policy_loss": agg(pl.loss_BT).detach(), "entropy": token_mean(entropy_BT).detach(),
                   "kl": token_mean(kl_BT).detach(), "clip_frac/low": token_mean(pl.clipped_low_BT.float()),
                   "clip_frac/high": token_mean(pl.clipped_high_BT.float()),
                   "ratio/mean": token_mean(pl.ratio_BT)}
        if values is not None:
            vl = value_loss(values, batch["old_values"], batch["returns"], act, c.loss.value_clip)
            loss = loss + c.loss.vf_coef * agg(vl)
            metrics["value_loss"] = agg(vl).detach()
        return loss + aux, {**metrics, "aux_loss": aux}

    # ---- metrics and the plateau rule

    def rollout_metrics(self, groups: list[Group], batch: dict, stats: dict, phases: Phases) -> dict:
        """Every rank's completions together: reward terms, lengths and ties of every drawn group;
        KL and advantages of the trained batch; timing."""
        local = [[float(g.total[i]), *(float(g.terms[k][i]) for k in sorted(g.terms)), s.n_tokens, float(s.truncated)]
                 for g in stats["all"] for i, s in enumerate(g.samples)]
        rows = torch.tensor([r for part in all_gather(local) for r in part], dtype=torch.float64)
        names = sorted(groups[0].terms)
        G = self.cfg.rollout.group_size
        out = {"reward/mean": float(rows[:, 0].mean()), "reward/std": float(rows[:, 0].std(unbiased=False))}
        for j, name in enumerate(names):
            out[f"reward/{name}/mean"] = float(rows[:, 1 + j].mean())
            out[f"reward/{name}/std"] = float(rows[:, 1 + j].std(unbiased=False))
        lengths = rows[:, -2]
        out.update({"response_length/mean": float(lengths.mean()), "response_length/max": float(lengths.max()),
                    "response_length/truncated": float(rows[:, -1].mean()),
                    "zero_variance_groups": float((~informative_groups(rows[:, 0], G)).double().mean())})
        act = batch["action"]
        sums = all_sum([float((batch["rollout_kl"] * act).sum()), float(act.sum()), float((batch["adv"] * act).sum()),
                        float((batch["adv"] ** 2 * act).sum()), *self._explained_variance_parts(batch),
                        float(stats["groups_drawn"])])
        n = max(sums[1], 1.0)
        mean_adv = sums[2] / n
        if not self.on_policy:  # on-policy there are no old log-probs: the first update's `kl` is it
            out["rollout/kl"] = sums[0] / n
        out.update({"advantages/mean": mean_adv,
                    "advantages/std": max(sums[3] / n - mean_adv ** 2, 0.0) ** 0.5,
                    "dynamic_sampling/groups_drawn": sums[-1], "dynamic_sampling/rounds": stats["rounds"],
                    "dynamic_sampling/tied_groups_trained": self._tied_share(groups)})
        if self.cfg.critic_kind != "none":
            r_sum, r_sq, d_sum, d_sq = sums[4:8]
            var_r = r_sq / n - (r_sum / n) ** 2
            var_d = d_sq / n - (d_sum / n) ** 2
            out["explained_variance"] = 1.0 - var_d / var_r if var_r > 1e-12 else 0.0
        generated = all_sum([float(lengths.sum() / self.world)])[0]
        out.update({f"time/{k}": v for k, v in phases.seconds.items()})
        out["generated_tokens_per_s"] = generated / max(phases.seconds.get("generate", 0.0), 1e-9)
        return out

    def _tied_share(self, groups: list[Group]) -> float:
        """Share of the trained groups (all ranks) whose rewards tie: 0 unless dynamic sampling fell short."""
        tied = [float(not bool(informative_groups(g.total, len(g.total))[0])) for g in groups]
        total = all_sum([sum(tied), float(len(tied))])
        return total[0] / max(total[1], 1.0)

    def _explained_variance_parts(self, batch: dict) -> list[float]:
        act = batch["action"]
        r, d = batch["returns"] * act, (batch["returns"] - batch["old_values"]) * act
        return [float(r.sum()), float((r ** 2).sum()), float(d.sum()), float((d ** 2).sum())]

    def _plateau(self, reward: float) -> None:
        rule, p = self.cfg.switch, self.plateau
        if rule is None:
            return
        if p["best"] is None or reward > p["best"] + rule.min_delta:
            p["best"], p["since"] = reward, 0
        else:
            p["since"] += 1
        p["stop"] = self.iteration >= rule.min_iterations and p["since"] >= rule.patience


# ----------------------------------------------------------------------------- the stage's entry points


def load_prompts(files: list[Path], model_cfg, tok, max_new_tokens: int) -> tuple[list[EvalTask], list[list[int]], int]:
    """The train split's tasks whose prompt leaves room for max_new_tokens, their prompts' token
    ids (encoded once, here), and how many did not fit."""
    tasks = [t for f in sorted(files) for t in load_tasks(f)]
    encoded = [(t, encode_prompt(tok, t.prompt, t.system, [{"role": r, "content": c} for r, c in t.context]))
               for t in tasks]
    fits = [(t, ids) for t, ids in encoded if len(ids) + max_new_tokens <= model_cfg.max_seq_len]
    if not fits:
        raise ValueError(f"none of the {len(tasks)} prompts in {[str(f) for f in files]} leaves room for "
                         f"rollout.max_new_tokens={max_new_tokens} within max_seq_len={model_cfg.max_seq_len}")
    return [t for t, _ in fits], [ids for _, ids in fits], len(tasks) - len(fits)


def rl(cfg: RlConfig, paths: RlPaths, *, seed: int, hooks: Hooks | None = None,
       rollout_group: RolloutGroup | None = None, reference_group: ReferenceRole | None = None,
       reward_model_group=None) -> dict:
    """Run cfg.iterations of RL (resuming from the newest good checkpoint); rank 0's summary.
    The roles every rank may share (cluster/roles.py's Ray actor groups; None: in this process):
    rollout_group samples (else each rank has its own copy of the policy), reference_group gives
    the reference's log-probs (else the gang's FrozenModel), reward_model_group is the
    reward_model term (else each rank loads the reward model)."""
    ensure_process_group()
    model_cfg = load_model_config(paths.init_model)
    tok = load_tokenizer(paths.init_model)
    tasks, prompts, too_long = load_prompts(paths.train_tasks, model_cfg, tok, cfg.rollout.max_new_tokens)
    reference = None
    if cfg.loss.kl_coef > 0:
        reference = reference_group or Reference(
            FrozenModel.from_folder(paths.init_model, cfg.engine, micro_batch=cfg.micro_batch),
            temperature=cfg.rollout.temperature, micro_batch=cfg.micro_batch)
    rewards = Rewards(cfg.rewards, RewardParams(**cfg.reward_terms.model_dump(), reward_model=cfg.reward_model,
                                                max_new_tokens=cfg.rollout.max_new_tokens),
                      served={"reward_model": reward_model_group} if reward_model_group is not None else None)
    # where the roles run does not change a result (tested), so a resume may move them
    identity = {"config": hashlib.sha256(json.dumps(cfg.model_dump(mode="json", exclude=PLACEMENT),
                                                    sort_keys=True).encode()).hexdigest()[:16],
                "model": sha256_file(paths.init_model / "model.safetensors")[:16]}
    job = RlJob(cfg, tasks, prompts, tok, model_cfg, reference, rewards, seed, identity, rollout_group)
    loop = train(cfg.train_config(), job, checkpoints=paths.checkpoints, hooks=hooks,
                 make_model=lambda: ActorCritic.from_folder(paths.init_model, cfg.critic_kind),
                 micro_batch=cfg.micro_batch, global_batch=cfg.minibatch)
    loop.save_model(Path(paths.out) / "model", tok, model_max_length=model_cfg.max_seq_len)
    if job.rank != 0:
        return {}
    last = {k: v for k, v in job.last_rollout.items() if k.startswith(("reward/", "response_length/"))}
    return {**loop.summary(), **last, "iterations": job.iteration, "prompts": len(tasks), "prompts_too_long": too_long,
            "algorithm": cfg.algorithm, "estimator": cfg.estimator, "critic": cfg.critic_kind,
            "aggregation": cfg.aggregation, "entropy_coef": cfg.entropy_coef,
            "ended_on_plateau": bool(job.plateau["stop"]) and job.iteration < cfg.iterations}


def worker(payload: dict, hooks: Hooks) -> dict:
    """The gang's entry point (cluster/train.py): JSON payload in, rank 0's summary out."""
    paths = RlPaths(**paths_from_payload(payload["paths"]))
    return rl(RlConfig.model_validate(payload["config"]), paths, seed=payload["seed"], hooks=hooks,
              rollout_group=payload.get("rollout_group"), reference_group=payload.get("reference_group"),
              reward_model_group=payload.get("reward_model_group"))
