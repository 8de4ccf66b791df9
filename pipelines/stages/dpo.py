"""`dpo`: preference optimisation (DPO, cDPO, IPO, SimPO) against a frozen reference, then held-out evaluation.

Inputs: `pairs` (train split to learn, eval split for the held-out preference figures); `sft`
when the recipe has it, whose model/ is the policy's start and the reference unless
`dpo.init_model` names another model folder; `tasks` when the recipe has it, for the held-out
task evaluation. Runs on a Ray Train gang of DeepSpeed workers, like pretrain and sft.
Writes into the stage folder:
  model/                  model.safetensors + config.json + tokenizer files; r1pipe export reads it
  train_log.jsonl         one line of metrics per step (loss, rewards/chosen|rejected|margins|accuracies,
                          logps/chosen|rejected, grad norm, tokens/s, held-out val/* figures)
  eval_completions.jsonl  the held-out tasks' completions and scores
  checkpoints/            elastic checkpoints; the precomputed reference log-probs stay in .work/
Metrics: the final step's figures, held-out preference accuracy (overall and per kind of pair) and
margin (val/rewards/*, and a table by kind), pairs (too long ones counted), and the held-out task
accuracy, format rate and length (eval/*).
"""
from __future__ import annotations

from pipelines.graph import PAIRS_STAGE, TASKS_STAGE, Stage, StageContext, register
from pipelines.stages.train_common import (evaluate_stage, fresh_start_clears_checkpoints,
                                           pair_accuracy_table, split_files, start_model, train_on_gang)


def run(ctx: StageContext) -> dict:
    from rl import dpo as dpo_lib
    from rl.config import DpoConfig
    from training.sft import check_model
    section = ctx.section
    fresh_start_clears_checkpoints(ctx)
    cfg = DpoConfig.model_validate(section.model_dump(exclude={"gang", "eval", "init_model"}))
    paths = dpo_lib.DpoPaths(train_files=split_files(ctx, PAIRS_STAGE, "train"),
                             val_files=split_files(ctx, PAIRS_STAGE, "eval"),
                             init_model=start_model(ctx, "sft"), work=ctx.work / "reference",
                             checkpoints=ctx.root / "checkpoints", out=ctx.out)
    check_model(cfg, paths.init_model, key="dpo.data.seq_len")  # before the gang starts
    summary = train_on_gang(ctx, dpo_lib.worker, cfg, paths)
    ctx.log(f"{summary['steps']} steps on {summary['pairs']} pairs ({summary['loss_name']}), held-out preference "
            f"accuracy {summary.get('val/rewards/accuracies', float('nan')):.3f}"
            + (f", resumed from step {summary['resumed_from_step']}" if summary["resumed_from_step"] else ""))
    tables = pair_accuracy_table(ctx, summary, "val/rewards/accuracies")
    figures = evaluate_stage(ctx, ctx.out / "model", section.eval)
    return {**summary, **figures, "tables": {**tables, **figures.get("tables", {})}}


register(Stage("dpo", (PAIRS_STAGE,), run, optional=("sft", TASKS_STAGE)))
