"""`sft`: supervised fine-tuning on the tasks stage's worked solutions, then held-out evaluation.

Inputs: `tasks` (train split to learn, eval split for the validation loss and the evaluation);
`pretrain` when the recipe has it, whose model/ is the starting point unless `sft.init_model`
names another model folder. Runs on a Ray Train gang of DeepSpeed workers, like pretrain.
Writes into the stage folder:
  model/                  model.safetensors + config.json + tokenizer files (LoRA merged in); r1pipe export reads it
  train_log.jsonl         one line of metrics per step (loss, LM and aux loss, LR, grad norm, tokens/s,
                          MFU, packing efficiency, validation loss per family)
  eval_completions.jsonl  the held-out tasks' completions and scores
  checkpoints/            elastic checkpoints, kept across crashes: a rerun resumes from the newest
Metrics: final losses, validation loss, tokens/s, MFU, examples (too long ones counted), where
it resumed from, and the held-out accuracy, format rate and length (eval/*).
"""
from __future__ import annotations

from pipelines.graph import TASKS_STAGE, Stage, StageContext, register
from pipelines.stages.train_common import (evaluate_stage, fresh_start_clears_checkpoints, split_files,
                                           start_model, train_on_gang)


def run(ctx: StageContext) -> dict:
    from training import sft as sft_lib
    from training.sft_data import build_sft_cache
    section = ctx.section
    fresh_start_clears_checkpoints(ctx)
    cfg = sft_lib.SftConfig.model_validate(section.model_dump(exclude={"gang", "eval", "init_model"}))
    paths = sft_lib.SftPaths(train_files=split_files(ctx, TASKS_STAGE, "train"),
                             val_files=split_files(ctx, TASKS_STAGE, "eval"),
                             init_model=start_model(ctx, "pretrain"), work=ctx.work / "examples",
                             checkpoints=ctx.root / "checkpoints", out=ctx.out)
    sft_lib.check_model(cfg, paths.init_model, key="sft.data.seq_len")  # before the gang starts
    # tokenize here, once, so the gang's workers find the cache instead of waiting on rank 0
    build_sft_cache(paths.train_files, paths.init_model, paths.work, seq_len=cfg.data.seq_len)
    summary = train_on_gang(ctx, sft_lib.worker, cfg, paths)
    ctx.log(f"{summary['steps']} steps on {summary['examples']} examples, val loss "
            f"{summary.get('val/loss', float('nan')):.4f}"
            + (f", resumed from step {summary['resumed_from_step']}" if summary["resumed_from_step"] else ""))
    return {**summary, **evaluate_stage(ctx, ctx.out / "model", section.eval)}


register(Stage("sft", (TASKS_STAGE,), run, optional=("pretrain",)))
