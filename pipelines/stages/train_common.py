"""What every training stage's wiring shares: the training log, a fresh start, W&B tables, and
the held-out evaluation that ends each training stage."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from cluster import storage
from pipelines.graph import TASKS_STAGE, StageContext
from pipelines.progress import PROGRESS_FILE
from pipelines.store import write_json_atomic



class TrainLog:
    """Rank 0's metrics as they arrive: to W&B, to a log that survives a crashed run, and to the
    progress file that `r1pipe run` draws its progress line from (pipelines/progress.py)."""

    def __init__(self, path: Path, sink, total: int | None = None, counter: str = "step"):
        # counter: the metric that counts toward total (RL stages count iterations, not steps)
        self.path, self.sink, self.total, self.counter = path, sink, total, counter

    def add(self, metrics: dict) -> None:
        self.sink.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        storage.push(self.path)  # object storage: the log survives a killed driver too
        write_json_atomic(self.path.parent / PROGRESS_FILE, {
            "unit": f"{self.counter}s", "done": metrics.get(self.counter, metrics["step"]), "total": self.total,
            "loss": metrics.get("loss")})

    def publish(self, out: Path) -> list[dict]:
        """The log without steps replayed after a restart (the latest record of a step wins)."""
        rows = [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []
        by_step = {r["step"]: r for r in rows}
        ordered = [by_step[s] for s in sorted(by_step)]
        (out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ordered))
        return ordered


def start_model(ctx: StageContext, previous: str) -> Path:
    """The model folder a stage starts from: <stage>.init_model, else the previous training
    stage's model/."""
    if ctx.section.init_model is not None:
        return Path(ctx.section.init_model)
    if previous not in ctx.inputs:
        raise ValueError(f"{ctx.name}: set {ctx.name}.init_model to a model folder, or put `{previous}` "
                         f"before `{ctx.name}` in stages")
    return ctx.inputs[previous] / "model"


def split_files(ctx: StageContext, stage: str, split: str) -> list[Path]:
    """The Parquet files of an input stage's split (train/ or eval/), or an error naming the folder."""
    files = sorted((ctx.inputs[stage] / split).glob("*.parquet"))
    if not files:
        raise ValueError(f"{ctx.name}: the {stage} stage has no {split}/ Parquet files at {ctx.inputs[stage] / split}")
    return files


def train_on_gang(ctx: StageContext, worker, cfg, paths, extra: dict | None = None) -> dict:
    """Run a training worker function (training.sft.worker, rl.dpo.worker, ...) on the stage's
    gang with its config and paths (and extra payload: RL's rollout group); the metrics go to
    W&B and the training log as they come."""
    from cluster.train import run_gang
    payload = {"config": cfg.model_dump(mode="json"), "seed": ctx.config.seed,
               "paths": {k: [str(f) for f in v] if isinstance(v, list) else str(v) for k, v in vars(paths).items()},
               **(extra or {})}
    rl = hasattr(cfg, "iterations")
    log = TrainLog(ctx.work / "train_log.jsonl", ctx.sink, cfg.iterations if rl else cfg.steps,
                   counter="iteration" if rl else "step")
    summary = run_gang(worker, payload, ctx.section.gang, checkpoints=paths.checkpoints, work=paths.work,
                       on_metrics=log.add, fault=ctx.fault, name=ctx.name, key=f"{ctx.name}.gang", outputs=(ctx.out,))
    log_tables(ctx, log.publish(ctx.out))
    return summary


def fresh_start_clears_checkpoints(ctx: StageContext) -> None:
    """Resume only what a crashed run of this fingerprint left; a forced rerun of a done
    stage (the runner's `resumed` is false then) trains from step 0 again."""
    if not ctx.resumed:
        shutil.rmtree(ctx.root / "checkpoints", ignore_errors=True)
        storage.discard(ctx.root / "checkpoints")  # object storage: a later resume must not find them
        (ctx.work / "train_log.jsonl").unlink(missing_ok=True)


def log_tables(ctx: StageContext, rows: list[dict]) -> None:
    """Validation loss over steps and the final expert loads, as W&B tables."""
    val = [[r["step"], r["val/loss"]] for r in rows if "val/loss" in r]
    if val:
        ctx.sink.table("val_loss_by_step", ["step", "val_loss"], val)
    last = rows[-1] if rows else {}
    loads = [[k.split("/")[1], k.split("/")[2], v] for k, v in last.items()
             if k.startswith("experts/") and not k.endswith("imbalance")]
    if loads:
        ctx.sink.table("expert_load", ["layer", "expert", "share"], loads)


def evaluate_stage(ctx: StageContext, model_dir: Path, cfg) -> dict:
    """The held-out evaluation of a stage's final model (rl/eval.py on Ray): figures for the
    manifest and W&B, completions into eval_completions.jsonl. Nothing without a tasks stage."""
    if not cfg.enabled:
        return {}
    if TASKS_STAGE not in ctx.inputs:
        ctx.log("no held-out evaluation: the recipe has no `tasks` stage")
        return {}
    from cluster.eval import evaluate_on_ray
    from rl.eval import load_tasks
    split = ctx.inputs[TASKS_STAGE] / "eval"
    if not any(pq.ParquetFile(f).metadata.num_rows for f in split.glob("*.parquet")):
        ctx.log(f"no held-out evaluation: the tasks stage's eval split is empty ({split})")
        return {}
    tasks = load_tasks(split)
    write_json_atomic(ctx.work / PROGRESS_FILE, {"unit": "tasks", "phase": f"held-out evaluation, {len(tasks)} tasks"})
    figures, records = evaluate_on_ray(model_dir, tasks, cfg, seed=ctx.config.seed)
    with open(ctx.out / "eval_completions.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    table = figures["tables"]["eval by family and difficulty"]
    ctx.sink.table("eval_by_family", table["columns"], table["rows"])
    ctx.sink.log({k: v for k, v in figures.items() if k != "tables"})
    ctx.log(f"held-out accuracy {figures['eval/accuracy']:.3f}, format {figures['eval/format_rate']:.3f}, "
            f"mean length {figures['eval/mean_length']:.0f} tokens ({figures['eval/n']} tasks)")
    return figures


def pair_accuracy_table(ctx: StageContext, summary: dict, key: str) -> dict:
    """The held-out pair accuracy per kind of pair (summary's `<key>/<kind>`) as a stage table
    (r1pipe status prints it) and a W&B table; {} when there are none."""
    kinds = sorted((k[len(key) + 1:], v) for k, v in summary.items() if k.startswith(key + "/"))
    if not kinds:
        return {}
    rows = [[kind, round(v, 4)] for kind, v in kinds] + [["all", round(summary[key], 4)]]
    ctx.sink.table("held_out_pairs_by_kind", ["kind", "accuracy"], rows)
    return {"held-out pairs by kind": {"columns": ["kind", "accuracy"], "rows": rows}}
