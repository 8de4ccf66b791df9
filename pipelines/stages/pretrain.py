"""`pretrain`: curriculum pretraining of the MoE model on a Ray Train gang of DeepSpeed workers.

Inputs: `tokenizer` (tokenizer.json) and `difficulty` (the curated Parquet with domain and
difficulty columns). Writes into the stage folder:
  model/             model.safetensors + config.json + the tokenizer files (r1pipe export reads it)
  train_log.jsonl    one line of metrics per step (loss, LR, tokens/s, MFU, phase, val losses)
  checkpoints/       elastic checkpoints, kept across crashes: a rerun resumes from the newest
Metrics: final losses, validation losses per domain and difficulty, tokens/s, MFU, and
where it resumed from.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipelines.graph import Stage, StageContext, register
from pipelines.stages.tokenizer import CORPUS_STAGE, corpus_files


class TrainLog:
    """Rank 0's metrics as they arrive: to W&B and to a log that survives a crashed run."""

    def __init__(self, path: Path, sink):
        self.path, self.sink = path, sink

    def add(self, metrics: dict) -> None:
        self.sink.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")

    def publish(self, out: Path) -> list[dict]:
        """The log without steps replayed after a restart (the latest record of a step wins)."""
        rows = [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []
        by_step = {r["step"]: r for r in rows}
        ordered = [by_step[s] for s in sorted(by_step)]
        (out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ordered))
        return ordered


def run(ctx: StageContext) -> dict:
    from cluster.train import run_pretrain
    from training.config import PretrainConfig
    from training.data import build_token_cache
    from training.pretrain import Paths
    section = ctx.section
    _fresh_start_clears_checkpoints(ctx)
    cfg = PretrainConfig.model_validate(section.model_dump(exclude={"gang"}))
    paths = Paths(data_files=corpus_files(ctx.inputs[CORPUS_STAGE]), tokenizer_dir=ctx.inputs["tokenizer"],
                  work=ctx.work / "tokens", checkpoints=ctx.root / "checkpoints", out=ctx.out)
    # tokenize here, once, so the gang's workers find the cache instead of waiting on rank 0
    build_token_cache(paths.data_files, paths.tokenizer_dir / "tokenizer.json", paths.work,
                      val_fraction=cfg.data.val_fraction, text_column=cfg.data.text_column)
    log = TrainLog(ctx.work / "train_log.jsonl", ctx.metrics)
    summary = run_pretrain(cfg, section.gang, paths, seed=ctx.config.seed, on_metrics=log.add, fault=ctx.fault)
    rows = log.publish(ctx.out)
    _log_tables(ctx, rows)
    ctx.log(f"{summary['steps']} steps, val loss {summary.get('val/loss', float('nan')):.4f}"
            + (f", resumed from step {summary['resumed_from_step']}" if summary["resumed_from_step"] else ""))
    return summary


def _fresh_start_clears_checkpoints(ctx: StageContext) -> None:
    """Resume only what a crashed run of this fingerprint left; a forced rerun of a done
    stage (the runner's `resumed` is false then) trains from step 0 again."""
    manifest = json.loads((ctx.root / "manifest.json").read_text())
    if not manifest.get("resumed"):
        shutil.rmtree(ctx.root / "checkpoints", ignore_errors=True)
        (ctx.work / "train_log.jsonl").unlink(missing_ok=True)


def _log_tables(ctx: StageContext, rows: list[dict]) -> None:
    """Validation loss over steps and the final expert loads, as W&B tables."""
    val = [[r["step"], r["val/loss"]] for r in rows if "val/loss" in r]
    if val:
        ctx.metrics.table("val_loss_by_step", ["step", "val_loss"], val)
    last = rows[-1] if rows else {}
    loads = [[k.split("/")[1], k.split("/")[2], v] for k, v in last.items()
             if k.startswith("experts/") and not k.endswith("imbalance")]
    if loads:
        ctx.metrics.table("expert_load", ["layer", "expert", "share"], loads)


register(Stage("pretrain", ("tokenizer", CORPUS_STAGE), run,
               summary="curriculum pretraining on a DeepSpeed gang (Ray Train)"))
