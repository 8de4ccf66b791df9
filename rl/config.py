"""Typed config of the post-training side: evaluation, DPO, the reward model (and, as it lands, RL).

Plain pydantic, no torch at import, so loading a recipe stays cheap.

    cfg = EvalConfig(max_new_tokens=384, pass_at_k={"k": 8, "tasks": 64})
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, model_validator

from training.config import CurriculumConfig, EngineConfig, OptimizerConfig, Strict, TrainConfig


# rl/rewards.py's built-in terms; a custom term is 'package.module:function'
REWARD_TERMS = ("accuracy", "format", "conciseness", "safety", "novelty", "overlong", "reward_model")


class PassAtKConfig(Strict):
    """pass@k by temperature sampling on a subset of the held-out tasks (Chen et al.'s unbiased estimator)."""

    k: int = Field(8, ge=1, description="the k of pass@k")
    samples: int | None = Field(None, ge=1, description="completions per task (n >= k); None: k")
    tasks: int = Field(64, ge=0, description=(
        "how many held-out tasks get sampled (spread over families and difficulties); 0: off"))
    temperature: float = Field(0.8, gt=0, description="sampling temperature of the k completions")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling mass")

    @model_validator(mode="after")
    def _enough_samples(self) -> "PassAtKConfig":
        if self.samples is not None and self.samples < self.k:
            raise ValueError(f"pass_at_k.samples={self.samples} must be >= pass_at_k.k={self.k}")
        return self

    @property
    def n(self) -> int:
        return self.samples or self.k


class EvalConfig(Strict):
    """Held-out evaluation at the end of a training stage: greedy accuracy, format, length, pass@k."""

    enabled: bool = Field(True, description="needs a `tasks` stage in the recipe")
    max_tasks: int | None = Field(None, ge=1, description=(
        "at most this many eval tasks (spread over families and difficulties); None: all"))
    max_new_tokens: int = Field(384, ge=1, description="per completion (capped by the model's max_seq_len)")
    batch_size: int = Field(32, ge=1, description="prompts decoded together (KV cache, left padding)")
    workers: int | None = Field(None, ge=1, description=(
        "Ray tasks the prompts are spread over; None: one per CPU (GPU)"))
    use_gpu: bool = Field(False, description="one GPU per worker")
    pass_at_k: PassAtKConfig = PassAtKConfig()


# ----------------------------------------------------------------------------- DPO


class DpoLossConfig(Strict):
    """The preference loss (rl/losses.py) and its parameters."""

    name: Literal["sigmoid", "cdpo", "ipo", "simpo"] = Field("sigmoid", description=(
        "sigmoid = DPO; simpo needs no reference"))
    beta: float = Field(0.1, gt=0, description="strength of the KL-like pull toward the reference")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description=(
        "cdpo (and simpo): probability a label is wrong"))
    gamma: float = Field(0.5, ge=0, description="simpo: the target reward margin")
    rpo_alpha: float = Field(0.0, ge=0, description=(
        "+ rpo_alpha x the chosen responses' per-token NLL (Pang et al. 2024, iterative RPO; TRL's "
        "\"sft\" loss term, formerly rpo_alpha): keeps the chosen responses likely while the margin grows; "
        "0: off"))

    @model_validator(mode="after")
    def _cdpo_smooths(self) -> "DpoLossConfig":
        if self.name == "cdpo" and self.label_smoothing <= 0:
            raise ValueError("loss.label_smoothing must be > 0 for loss.name=cdpo")
        return self

    def params(self) -> dict:
        out = {"beta": self.beta}
        if self.name in ("cdpo", "sigmoid", "simpo"):
            out["label_smoothing"] = self.label_smoothing
        if self.name == "simpo":
            out["gamma"] = self.gamma
        return out


class PairDataConfig(Strict):
    """Pairs per batch: a pair is two sequences (prompt + chosen, prompt + rejected)."""

    seq_len: int = Field(512, ge=8, description=(
        "longest sequence; pairs with a longer one are left out (counted)"))
    micro_batch: int = Field(4, ge=1, description="pairs per worker per forward")
    global_batch: int = Field(16, ge=1, description="pairs per optimizer step, all workers together")
    val_max_pairs: int = Field(64, ge=0, description="held-out pairs (the pairs stage's eval split) for val/*")
    curriculum: CurriculumConfig = Field(CurriculumConfig(enabled=False), description=(
        "by task difficulty, as in SFT"))

    @model_validator(mode="after")
    def _batches(self) -> "PairDataConfig":
        if self.global_batch % self.micro_batch:
            raise ValueError(f"data.global_batch={self.global_batch} must be a multiple of "
                             f"data.micro_batch={self.micro_batch}")
        return self


class DpoConfig(TrainConfig):
    """One DPO run: the policy starts from a model folder; the reference is the same weights, frozen."""

    steps: int = Field(100, ge=1, description="optimizer steps")
    engine: EngineConfig = EngineConfig(optimizer=OptimizerConfig(lr=1e-5, warmup_steps=10))
    loss: DpoLossConfig = DpoLossConfig()
    data: PairDataConfig = PairDataConfig()
    reference: Literal["precomputed", "online"] = Field("precomputed", description=(
        "precomputed: the reference's log-probs of every pair once, before step 1, stored and reused on resume;"
        " online: a frozen copy (ZeRO-3 shards it) scores each batch. Both give the same losses."))


# ----------------------------------------------------------------------------- reward model


class RewardModelConfig(TrainConfig):
    """A reward model: the start model's trunk with a linear head that scores (prompt, response),
    trained with the Bradley-Terry loss on preference pairs."""

    steps: int = Field(100, ge=1, description="optimizer steps")
    engine: EngineConfig = EngineConfig(optimizer=OptimizerConfig(lr=1e-5, warmup_steps=10))
    data: PairDataConfig = PairDataConfig()
    center_coef: float = Field(0.0, ge=0, description=(
        "pulls the mean score toward 0 (TRL's center_rewards_coefficient): + coef x mean((s_c + s_r)^2), so a "
        "reward term for RL stays centred; 0: off"))


# ----------------------------------------------------------------------------- RL (one PRL stage)


class RoleGroupConfig(Strict):
    """Where a role runs: in the gang's own processes, or as a Ray actor group beside it."""

    workers: int = Field(0, ge=0, description=(
        "0: every gang worker holds its own copy (colocated); N: a Ray actor group of N workers the gang "
        "shares (cluster/roles.py), each with a whole copy of the model, on its own GPU with use_gpu"))
    use_gpu: bool = Field(False, description="one GPU per worker of the group")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker of the group")


class RolloutConfig(RoleGroupConfig):
    """Sampling: prompts per iteration, completions per prompt, decoding."""

    prompts: int = Field(8, ge=1, description=(
        "prompts per iteration, all workers together (a multiple of the workers)"))
    group_size: int = Field(4, ge=1, description="completions per prompt (GRPO's G)")
    max_new_tokens: int = Field(128, ge=1, description=(
        "per completion; a completion that hits it is 'truncated'"))
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    batch_size: int = Field(64, ge=1, description="completions decoded together (KV cache, left padding)")
    dynamic_sampling: bool = Field(False, description=(
        "DAPO's dynamic sampling: groups whose rewards all tie are dropped and more prompts are sampled, up to "
        "max_refill_rounds; still-short batches keep some tied groups (counted)"))
    max_refill_rounds: int = Field(2, ge=0, description=(
        "dynamic sampling: extra draws of rollout.prompts at most"))
    curriculum: Literal["uniform", "learnability"] = Field("uniform", description=(
        "which prompts: uniform (a shuffled pass over the train split); learnability (rl/sampling.py: "
        "family x difficulty cells drawn by p(1 - p) of their running sampled accuracy p, so half-solved "
        "cells, where a group's rewards differ, come most often)"))
    curriculum_floor: float = Field(0.02, gt=0, le=0.25, description=(
        "learnability: the least weight of a cell (one the policy never or always solves is still visited)"))
    workers: int = Field(0, ge=0, description=(
        "0: every gang worker samples with its own copy of the policy (colocated); N: a Ray actor group of N "
        "rollout workers (cluster/roles.py) that the gang shares, synced before each rollout"))


class AdvantageConfig(Strict):
    """How rewards become advantages (rl/advantages.py); gae needs a critic."""

    estimator: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"] | None = Field(None, description=(
        "None: the algorithm's (ppo: gae, grpo: grpo)"))
    gamma: float = Field(1.0, gt=0, le=1, description="discount per token (gae, reinforce_pp)")
    lam: float = Field(0.95, ge=0, le=1, description="GAE's lambda")
    whiten: bool = Field(True, description="gae: normalise advantages over the batch")


class RlLossConfig(Strict):
    """The update's loss: policy surrogate, KL to the reference, entropy bonus, value loss."""

    policy: Literal["ppo", "gspo"] = Field("ppo", description="ppo: token ratio; gspo: sequence ratio")
    eps_low: float | None = Field(None, gt=0, lt=1, description=(
        "clip 1 - eps_low; None: 0.2 (ppo), 3e-4 (gspo)"))
    eps_high: float | None = Field(None, gt=0, description=(
        "clip 1 + eps_high (DAPO's clip-higher: 0.28); None: eps_low's (gspo: 4e-4)"))
    dual_clip: float | None = Field(None, gt=1, description=(
        "cap -A x dual_clip on negative advantages; None: off"))
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] | None = Field(
        None, description=(
            "token-mean | seq-mean-token-mean | seq-mean-token-sum-norm; None: the algorithm's (ppo: "
            "token-mean; grpo: seq-mean-token-mean; dr_grpo: seq-mean-token-sum-norm)"))
    kl_coef: float = Field(0.0, ge=0, description="KL(policy || reference) weight; 0: no reference is loaded")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description=(
        "k3 in the loss (R1), k1 in the reward (PPO-RLHF)"))
    kl_in: Literal["loss", "reward"] = Field("loss", description=(
        "where the KL goes: a loss term, or a per-token reward penalty"))
    entropy_coef: float | None = Field(None, ge=0, description=(
        "+ coef x entropy bonus; None: 0.01 x the PRL stage number"))
    vf_coef: float = Field(0.5, ge=0, description="value loss weight (critic runs)")
    value_clip: float | None = Field(0.2, gt=0, description=(
        "PPO value clipping around the rollout's values; None: off"))

    def clip_range(self) -> tuple[float, float]:
        low = self.eps_low if self.eps_low is not None else (3e-4 if self.policy == "gspo" else 0.2)
        high = self.eps_high if self.eps_high is not None else (4e-4 if self.policy == "gspo" and self.eps_low is None else low)
        return low, high


class RewardTermsConfig(Strict):
    """Parameters of the reward terms (rl/rewards.py)."""

    length_budget: int = Field(128, ge=1, description="conciseness: 1 - length / budget, clipped to [-1, 1]")
    conciseness_gate: Literal["none", "correct"] = Field("none", description=(
        "conciseness: none (every completion); correct (a wrong answer keeps only the penalty past the budget, "
        "so shortening it earns nothing: Kimi k1.5's length reward)"))
    novelty_n: int = Field(3, ge=1, description="novelty: word n-gram order")
    novelty_history: int = Field(256, ge=0, description="novelty: completions of earlier iterations remembered")
    overlong_buffer: int = Field(32, ge=1, description=(
        "overlong: penalty ramps to -1 over the last this-many tokens"))


class PlateauConfig(Strict):
    """End a PRL stage early when its mean reward stops improving."""

    patience: int = Field(5, ge=1, description="iterations without a new best (by more than min_delta)")
    min_delta: float = Field(0.01, ge=0, description="the improvement that counts")
    min_iterations: int = Field(5, ge=1, description="never switch before this many iterations")


class RolesConfig(Strict):
    """The frozen roles' placement (the rollout's is rollout.workers): the reference policy (used when
    loss.kl_coef > 0) and the reward model (used when `reward_model` is a reward term)."""

    reference: RoleGroupConfig = RoleGroupConfig()
    reward_model: RoleGroupConfig = RoleGroupConfig()


class RlConfig(Strict):
    """One RL stage: algorithm, rollout, rewards, loss and the engine; PRL stages are these."""

    _validate_alone: ClassVar[bool] = True

    algorithm: Literal["ppo", "grpo"] = Field("grpo", description=(
        "presets of estimator, critic and aggregation"))
    iterations: int = Field(10, ge=1, description="generate -> score -> update rounds")
    epochs: int = Field(1, ge=1, description="passes over each rollout batch")
    minibatch: int = Field(16, ge=1, description="completions per optimizer step, all workers together")
    micro_batch: int = Field(4, ge=1, description="completions per worker per forward")
    critic: Literal["none", "shared", "separate"] | None = Field(None, description=(
        "the value model: none; shared (a value head on the policy trunk); separate (a copy of the start model "
        "with a value head); None: the algorithm's (ppo: separate, grpo: none)"))
    rewards: dict[str, float] = Field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1}, description=(
        "term -> weight"))
    reward_terms: RewardTermsConfig = RewardTermsConfig()
    rollout: RolloutConfig = RolloutConfig()
    advantage: AdvantageConfig = AdvantageConfig()
    loss: RlLossConfig = RlLossConfig()
    engine: EngineConfig = EngineConfig(optimizer=OptimizerConfig(lr=1e-5, warmup_steps=0, weight_decay=0.0))
    checkpoint_every: int = Field(5, ge=1, description="iterations between checkpoints; one more at the end")
    checkpoint_keep: int = Field(2, ge=1, description="newest checkpoints kept")
    max_nonfinite: int = Field(5, ge=1, description="abort after this many non-finite updates in a row")
    peak_flops: float | None = Field(None, gt=0, description="per device, for MFU; None on CPU = measured")
    switch: PlateauConfig | None = Field(None, description=(
        "end early on a reward plateau; None: run every iteration"))
    reward_model: str | None = Field(None, description=(
        "a reward model folder for the reward_model term; the pipeline sets its stage's"))
    roles: RolesConfig = Field(RolesConfig(), description=(
        "reference and reward model: colocated with the gang (workers 0) or Ray actor groups"))
    stage: int = Field(1, ge=1, description="the PRL stage number (the entropy default scales with it)")

    @model_validator(mode="after")
    def _consistent(self) -> "RlConfig":
        if not self._validate_alone:
            return self  # PRL's shared settings: only each stage's merged settings must hold together
        completions = self.rollout.prompts * self.rollout.group_size
        if completions % self.minibatch:
            raise ValueError(f"rollout.prompts x rollout.group_size = {completions} must be a multiple of "
                             f"minibatch={self.minibatch}")
        if self.minibatch % self.micro_batch:
            raise ValueError(f"minibatch={self.minibatch} must be a multiple of micro_batch={self.micro_batch}")
        if self.estimator == "gae" and self.critic_kind == "none":
            raise ValueError("advantage.estimator=gae needs a critic: set critic to shared or separate")
        if self.estimator != "gae" and self.critic_kind != "none":
            raise ValueError(f"critic={self.critic_kind} needs advantage.estimator=gae (the critic learns GAE's "
                             f"returns; {self.estimator} has none): set critic to none or the estimator to gae")
        if "overlong" in self.rewards and self.reward_terms.overlong_buffer > self.rollout.max_new_tokens:
            raise ValueError(f"reward_terms.overlong_buffer={self.reward_terms.overlong_buffer} must be <= "
                             f"rollout.max_new_tokens={self.rollout.max_new_tokens}")
        if self.estimator in ("grpo", "dr_grpo", "rloo") and self.rollout.group_size < 2:
            raise ValueError(f"advantage.estimator={self.estimator} needs rollout.group_size >= 2")
        if self.roles.reference.workers and not self.loss.kl_coef:
            raise ValueError(f"roles.reference.workers={self.roles.reference.workers}: no reference is used "
                             "without a KL term; set loss.kl_coef > 0 or roles.reference.workers: 0")
        if self.roles.reward_model.workers and "reward_model" not in self.rewards:
            raise ValueError(f"roles.reward_model.workers={self.roles.reward_model.workers}: the rewards have no "
                             "reward_model term; add one or set roles.reward_model.workers: 0")
        unknown = [n for n in self.rewards if n not in REWARD_TERMS and ":" not in n]
        if unknown:
            raise ValueError(f"rewards: unknown term(s) {unknown}; known: {', '.join(REWARD_TERMS)}, "
                             "or a custom 'package.module:function'")
        return self

    def placement_groups(self) -> list[RoleGroupConfig]:
        """Where the roles that may run as Ray actor groups beside the gang run: rollout, reference,
        reward model."""
        return [self.rollout, self.roles.reference, self.roles.reward_model]

    @property
    def estimator(self) -> str:
        return self.advantage.estimator or ("gae" if self.algorithm == "ppo" else "grpo")

    @property
    def critic_kind(self) -> str:
        return self.critic or ("separate" if self.algorithm == "ppo" else "none")

    @property
    def aggregation(self) -> str:
        if self.loss.aggregation:
            return self.loss.aggregation
        if self.estimator == "dr_grpo":
            return "seq-mean-token-sum-norm"
        return "token-mean" if self.algorithm == "ppo" else "seq-mean-token-mean"

    @property
    def entropy_coef(self) -> float:
        return self.loss.entropy_coef if self.loss.entropy_coef is not None else 0.01 * self.stage

    @property
    def updates_per_iteration(self) -> int:
        return self.epochs * self.rollout.prompts * self.rollout.group_size // self.minibatch

    def train_config(self) -> TrainConfig:
        """The shared loop's view: one loop step is one optimizer update."""
        u = self.updates_per_iteration
        return TrainConfig(steps=self.iterations * u, engine=self.engine, eval_every=self.iterations * u,
                           checkpoint={"every": self.checkpoint_every * u, "keep": self.checkpoint_keep},
                           max_nonfinite=self.max_nonfinite, peak_flops=self.peak_flops)


# where an RL stage's roles run, not what they compute (tested to give equal results): left out of
# a checkpoint's identity (rl/ppo.py) and a stage's fingerprint (pipelines/runner.py)
PLACEMENT: dict[str, bool | set[str]] = {"roles": True, "rollout": set(RoleGroupConfig.model_fields)}


# ----------------------------------------------------------------------------- PRL: progressive stages


MAX_PRL_STAGES = 16


def deep_merge(base: dict, override: dict, whole: tuple[str, ...] = ()) -> dict:
    """base with override's keys replacing it, nested mappings merged key by key (except the
    top-level keys in whole, which are replaced as a whole)."""
    out = dict(base)
    for key, value in override.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict) and key not in whole
        out[key] = deep_merge(out[key], value) if nested else value
    return out


class PrlConfig(RlConfig):
    """Progressive RL: the shared settings (every RlConfig key) and the list of stages, each a
    mapping of the keys it changes (algorithm, rewards, loss.entropy_coef, loss.kl_coef,
    iterations, switch, ...); nested keys merge, a stage's `rewards` replace the shared ones. Stage k is the run store's stage prl_k; it starts from prl_{k-1}'s
    model (prl_1 from dpo's, or sft's), so editing stage 2 reruns prl_2 onwards only."""

    stages: list[dict[str, Any]] = Field(
        default_factory=lambda: [{}], min_length=1, max_length=MAX_PRL_STAGES, description=(
            "the PRL stages in order, each a mapping of the keys above that it changes, e.g. "
            "[{rewards: {accuracy: 1.0}}, {rewards: {accuracy: 1.0, conciseness: 0.3}, iterations: 20}]"))
    _validate_alone: ClassVar[bool] = False

    @model_validator(mode="after")
    def _stages_valid(self) -> "PrlConfig":
        for k in range(1, len(self.stages) + 1):
            self.stage_config(k)
        return self

    def stage_config(self, k: int) -> RlConfig:
        """Stage k's settings (1-based): the shared ones with the stage's changes; errors name the stage."""
        if not 1 <= k <= len(self.stages):
            raise ValueError(f"prl has {len(self.stages)} stage(s); there is no stage {k}")
        override = self.stages[k - 1]
        if not isinstance(override, dict):
            raise ValueError(f"stages.{k - 1}: expected a mapping of keys to change, got {override!r}")
        if "stage" in override:
            raise ValueError(f"stages.{k - 1}.stage: set by the stage's position in the list")
        shared = self.model_dump(exclude=set(self._own_fields()))
        try:
            # a stage's reward weights are its own: the shared mapping is replaced, not merged into
            return RlConfig.model_validate(deep_merge(shared, {**override, "stage": k}, whole=("rewards",)))
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join([f'stages.{k - 1}', *(str(p) for p in e['loc'])])}: "
                                 f"{'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}"
                                 for e in err.errors())
            raise ValueError(problems) from None

    def _own_fields(self) -> tuple[str, ...]:
        """Fields of this section that are not RlConfig's (a pipeline section adds gang, eval, ...)."""
        return tuple(name for name in type(self).model_fields if name not in RlConfig.model_fields)
