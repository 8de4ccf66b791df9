"""`prl_1`, `prl_2`, ...: progressive RL stages (PPO or GRPO on verifiable tasks), each ending with
the held-out evaluation.

The recipe's `prl` section holds the shared settings and a list of stages; listing `prl` in the
recipe's stages runs prl_1 .. prl_N, each a stage of the run store with its own fingerprint.
Inputs: `tasks` (the train split's prompts; the eval split only for the held-out evaluation);
prl_1 starts from `dpo`'s model (or `sft`'s, or prl.init_model), prl_k from prl_{k-1}'s; the
`reward_model` stage, when the recipe has it, serves the reward_model term. Runs on a Ray Train
gang of DeepSpeed workers, each sampling its share of the prompts (rl/ppo.py).
Writes into the stage folder:
  model/                  the policy: model.safetensors + config.json + tokenizer files
  train_log.jsonl         one line per update: policy loss, KL, entropy, clip fractions, value loss;
                          on each iteration's first update the rollout's reward terms, lengths,
                          ties, advantages, explained variance and time per phase
  eval_completions.jsonl  the held-out tasks' completions and scores
  checkpoints/            checkpoints at iteration boundaries
Metrics: the last rollout's reward terms and lengths, iterations (ended_on_plateau), and the
held-out task accuracy, format rate and length (eval/*).
"""
from __future__ import annotations

from pipelines.graph import TASKS_STAGE, Stage, StageContext, register
from pipelines.stages.train_common import (evaluate_stage, fresh_start_clears_checkpoints, split_files,
                                           start_model, train_on_gang)
from rl.config import MAX_PRL_STAGES


def run(ctx: StageContext) -> dict:
    from rl import ppo
    from rl.config import RlConfig
    k = int(ctx.name.split("_")[1])
    section = ctx.section
    fresh_start_clears_checkpoints(ctx)
    cfg = RlConfig.model_validate(section.model_dump(exclude={"gang", "eval", "init_model"}))
    if "reward_model" in cfg.rewards and cfg.reward_model is None and "reward_model" in ctx.inputs:
        cfg = cfg.model_copy(update={"reward_model": str(ctx.inputs["reward_model"] / "model")})
    previous = f"prl_{k - 1}" if k > 1 else ("dpo" if "dpo" in ctx.inputs else "sft")
    paths = ppo.RlPaths(train_tasks=split_files(ctx, TASKS_STAGE, "train"), init_model=start_model(ctx, previous),
                        work=ctx.work, checkpoints=ctx.root / "checkpoints", out=ctx.out)
    groups = role_groups(cfg, paths.init_model, section.gang)
    try:
        summary = train_on_gang(ctx, ppo.worker, cfg, paths, extra=groups or None)
    finally:
        for group in groups.values():
            group.shutdown()
    ctx.log(f"{cfg.algorithm} ({summary['estimator']}, critic {summary['critic']}): {summary['iterations']} "
            f"iterations, reward {summary.get('reward/mean', float('nan')):.3f}, accuracy "
            f"{summary.get('reward/accuracy/mean', float('nan')):.3f}, length "
            f"{summary.get('response_length/mean', float('nan')):.0f} tokens"
            + (", ended on a reward plateau" if summary["ended_on_plateau"] else "")
            + (f", resumed from update {summary['resumed_from_step']}" if summary["resumed_from_step"] else ""))
    return {**summary, **evaluate_stage(ctx, ctx.out / "model", section.eval)}


def role_groups(cfg, init_model, gang) -> dict:
    """The roles the recipe runs as Ray actor groups beside the gang (rollout.workers,
    roles.reference.workers, roles.reward_model.workers > 0), by the payload key rl.ppo.worker
    reads; each checked to leave room for the gang. Empty: every role runs in the gang's processes."""
    from cluster.roles import RayReferenceGroup, RayRewardModelGroup, RayRolloutGroup
    from training.export import load_model_config
    from training.tokenizer import EOS, PAD, load_tokenizer, special_token_ids
    place = {"strategy": gang.placement_strategy,
             "reserve": {k: v * gang.num_workers for k, v in gang.worker_resources().items()}}
    groups = {}
    try:
        if cfg.rollout.workers:
            ids = special_token_ids(load_tokenizer(init_model))
            groups["rollout_group"] = RayRolloutGroup(
                load_model_config(init_model), [ids[EOS], ids["</answer>"]], ids[PAD], workers=cfg.rollout.workers,
                use_gpu=cfg.rollout.use_gpu, cpus_per_worker=cfg.rollout.cpus_per_worker,
                key="prl.rollout.workers", **place)
        ref = cfg.roles.reference
        if ref.workers:
            groups["reference_group"] = RayReferenceGroup(
                init_model, temperature=cfg.rollout.temperature, micro_batch=cfg.micro_batch, workers=ref.workers,
                use_gpu=ref.use_gpu, cpus_per_worker=ref.cpus_per_worker, key="prl.roles.reference.workers", **place)
        rm = cfg.roles.reward_model
        if rm.workers:
            groups["reward_model_group"] = RayRewardModelGroup(
                cfg.reward_model, workers=rm.workers, use_gpu=rm.use_gpu, cpus_per_worker=rm.cpus_per_worker,
                key="prl.roles.reward_model.workers", **place)
    except BaseException:
        for group in groups.values():
            group.shutdown()
        raise
    return groups


for _k in range(1, MAX_PRL_STAGES + 1):
    register(Stage(f"prl_{_k}", (TASKS_STAGE,) + ((f"prl_{_k - 1}",) if _k > 1 else ()), run,
                   optional=(("dpo", "sft") if _k == 1 else ()) + ("reward_model",)))
