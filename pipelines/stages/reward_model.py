"""`reward_model`: a Bradley-Terry reward model on the preference pairs (RL's optional learned reward).

Inputs: `pairs` (train split to learn, eval split for the held-out figures); `sft` when the
recipe has it, whose model/ gives the trunk unless `reward_model.init_model` names another model
folder. Runs on a Ray Train gang of DeepSpeed workers, like every training stage.
Writes into the stage folder:
  model/            model.safetensors (trunk + head), reward_model.json, tokenizer files;
                    rl.reward_model.RewardScorer.from_folder(...) scores (prompt, response) texts
  train_log.jsonl   one line of metrics per step (rm_loss, accuracy, margin, scores/chosen|rejected,
                    grad norm, tokens/s, held-out val/loss|accuracy|margin)
  checkpoints/      elastic checkpoints
Metrics: the final step's figures, the held-out pair accuracy (overall and per kind of pair, and a
table by kind) and score margin (val/*), pairs (too long ones counted). Its held-out evaluation is the pair accuracy: it is not a policy, so it has no
task accuracy.
"""
from __future__ import annotations

from pipelines.graph import PAIRS_STAGE, Stage, StageContext, register
from pipelines.stages.train_common import (fresh_start_clears_checkpoints, pair_accuracy_table, split_files,
                                           start_model, train_on_gang)


def run(ctx: StageContext) -> dict:
    from rl import reward_model as rm
    from rl.config import RewardModelConfig
    from training.sft import check_model
    fresh_start_clears_checkpoints(ctx)
    cfg = RewardModelConfig.model_validate(ctx.section.model_dump(exclude={"gang", "init_model"}))
    paths = rm.RewardModelPaths(train_files=split_files(ctx, PAIRS_STAGE, "train"),
                                val_files=split_files(ctx, PAIRS_STAGE, "eval"),
                                init_model=start_model(ctx, "sft"), work=ctx.work,
                                checkpoints=ctx.root / "checkpoints", out=ctx.out)
    check_model(cfg, paths.init_model, key="reward_model.data.seq_len")  # before the gang starts
    summary = train_on_gang(ctx, rm.worker, cfg, paths)
    ctx.log(f"{summary['steps']} steps on {summary['pairs']} pairs, held-out pair accuracy "
            f"{summary.get('val/accuracy', float('nan')):.3f}, margin {summary.get('val/margin', float('nan')):.2f}"
            + (f", resumed from step {summary['resumed_from_step']}" if summary["resumed_from_step"] else ""))
    return {**summary, "tables": pair_accuracy_table(ctx, summary, "val/accuracy")}


register(Stage("reward_model", (PAIRS_STAGE,), run, optional=("sft",)))
