"""`pretrain`: curriculum pretraining of the MoE model on a Ray Train gang of DeepSpeed workers.

Inputs: `tokenizer` (tokenizer.json) and `difficulty` (the curated Parquet with domain and
difficulty columns); `tasks` when the recipe has it: pretraining then leaves out the documents
that contain a held-out prompt, and ends with the held-out evaluation. Writes into the stage folder:
  model/                  model.safetensors + config.json + the tokenizer files (r1pipe export reads it)
  train_log.jsonl         one line of metrics per step (loss, LR, tokens/s, MFU, phase, val losses)
  eval_completions.jsonl  the held-out tasks' completions and scores (with a tasks stage)
  checkpoints/            elastic checkpoints, kept across crashes: a rerun resumes from the newest
Metrics: final losses, validation losses per domain and difficulty, tokens/s, MFU, where it
resumed from, and the held-out accuracy, format rate and length (eval/*).
"""
from __future__ import annotations

from pipelines.graph import CORPUS_STAGE, TASKS_STAGE, Stage, StageContext, register
from pipelines.stages.tokenizer import corpus_files
from pipelines.stages.train_common import TrainLog, evaluate_stage, fresh_start_clears_checkpoints, log_tables


def run(ctx: StageContext) -> dict:
    from cluster.train import run_pretrain
    from training.config import PretrainConfig
    from training.pretrain_data import build_token_cache
    from training.pretrain import Paths
    import json
    section = ctx.section
    fresh_start_clears_checkpoints(ctx)
    cfg = PretrainConfig.model_validate(section.model_dump(exclude={"gang", "eval"}))
    excluded = ctx.inputs[TASKS_STAGE] / "corpus_excluded.json" if TASKS_STAGE in ctx.inputs else None
    paths = Paths(data_files=corpus_files(ctx.inputs[CORPUS_STAGE]), tokenizer_dir=ctx.inputs["tokenizer"],
                  work=ctx.work / "tokens", checkpoints=ctx.root / "checkpoints", out=ctx.out, exclude_ids=excluded)
    # tokenize here, once, so the gang's workers find the cache instead of waiting on rank 0
    build_token_cache(paths.data_files, paths.tokenizer_dir / "tokenizer.json", paths.work,
                      val_fraction=cfg.data.val_fraction, text_column=cfg.data.text_column,
                      exclude_ids=set(json.loads(excluded.read_text())) if excluded else None)
    log = TrainLog(ctx.work / "train_log.jsonl", ctx.sink, cfg.steps)
    summary = run_pretrain(cfg, section.gang, paths, seed=ctx.config.seed, on_metrics=log.add, fault=ctx.fault)
    rows = log.publish(ctx.out)
    log_tables(ctx, rows)
    ctx.log(f"{summary['steps']} steps, val loss {summary.get('val/loss', float('nan')):.4f}"
            + (f", resumed from step {summary['resumed_from_step']}" if summary["resumed_from_step"] else ""))
    return {**summary, **evaluate_stage(ctx, ctx.out / "model", section.eval)}


register(Stage("pretrain", ("tokenizer", CORPUS_STAGE), run, optional=(TASKS_STAGE,),
               views={TASKS_STAGE: "eval_digest"}))
