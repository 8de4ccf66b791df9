"""`pairs`: preference pairs (prompt, chosen, rejected) for DPO and the reward model.

Inputs: `tasks` (its train split gives the training pairs, its eval split the held-out ones).
Offline pairs set each generated task's worked solution against a plausible wrong response
(data_engine.generators.tasks.make_preference_pair); user files add pairs of their own. Writes into the
stage folder:
  train/part-00000.parquet      pairs DPO and the reward model train on (PAIR_SCHEMA)
  eval/part-00000.parquet       held-out pairs: from the eval split's tasks, never trained on
  rejected/part-00000.parquet   user rows that cannot be used (reason, file, line), duplicate ids,
                                and training pairs whose prompt poses a held-out problem (overlaps_eval)
Metrics: the funnel over pairs (in = kept + rejected: every pair made or read), pairs per split,
kind and family.
"""
from __future__ import annotations

from collections import Counter

import pyarrow.parquet as pq

from pipelines.graph import PAIRS_STAGE, TASKS_STAGE, Stage, StageContext, register
from pipelines.stages.tasks import EVAL, TRAIN, check_budget, drop_user_overlaps, unique_ids, write_splits
from pipelines.stages.train_common import split_files


def run(ctx: StageContext) -> dict:
    from data_engine.pair_data import PAIR_REJECT_SCHEMA, PAIR_SCHEMA, offline_pairs, read_pair_files
    from data_engine.task_data import Overlaps, TasksConfig
    cfg = ctx.section
    tasks = {split: _read(ctx, split) for split in (TRAIN, EVAL)}
    user, rejected = read_pair_files(cfg.files)
    n_user = len(user) + len(rejected)
    made = {split: offline_pairs(tasks[split], cfg.offline, split, ctx.config.seed) if cfg.offline.enabled else []
            for split in (TRAIN, EVAL)}  # offline pairs, then the on-policy ones
    on_policy, ties = _on_policy(ctx, tasks[TRAIN]) if cfg.on_policy.enabled else ([], 0)
    made[TRAIN] += on_policy
    eval_rows, dup = unique_ids(made[EVAL] + [r for r in user if r["split"] == EVAL])
    rejected += dup
    train_rows, dup = unique_ids(made[TRAIN] + [r for r in user if r["split"] == TRAIN], taken=eval_rows)
    rejected += dup
    # held-out problems: the tasks stage's eval split and the held-out pairs' prompts
    overlaps = Overlaps(tasks[EVAL] + [dict(r, answer=None) for r in eval_rows if r["source"] != "offline"],
                        (ctx.config.tasks or TasksConfig()).decontamination)
    user_train, more = drop_user_overlaps([r for r in train_rows if "file" in r], overlaps)
    train_rows = [r for r in train_rows if "file" not in r] + user_train
    rejected += more
    write_splits(ctx, {TRAIN: train_rows, EVAL: eval_rows}, rejected, PAIR_SCHEMA, PAIR_REJECT_SCHEMA)
    metrics = _funnel(len(made[TRAIN]) + len(made[EVAL]) + n_user, train_rows, eval_rows, rejected)
    if cfg.on_policy.enabled:
        metrics.update(on_policy_pairs=len(on_policy), on_policy_ties=ties, on_policy_prompts=len(on_policy) + ties)
    check_budget("pairs", cfg.max_reject_fraction, rejected, n_user)
    ctx.log(f"{len(train_rows)} train and {len(eval_rows)} held-out pairs; {len(rejected)} rejected "
            f"({dict(Counter(r['reason'] for r in rejected))})")
    return metrics


def _on_policy(ctx: StageContext, train_rows: list[dict]) -> tuple[list[dict], int]:
    """k samples per train prompt from the SFT model on Ray; the best against the worst of each."""
    from cluster.eval import sample_on_ray
    from rl.config import EvalConfig
    from rl.dpo import on_policy_pairs
    from rl.eval import spread, task_from_row
    op = ctx.section.on_policy
    if op.model is None and "sft" not in ctx.inputs:
        raise ValueError("pairs.on_policy: set pairs.on_policy.model to a model folder, or put `sft` before `pairs`")
    model = op.model if op.model is not None else ctx.inputs["sft"] / "model"
    rows = [r for r in train_rows if r["answer"] is not None]
    tasks = spread([task_from_row(r, f"tasks train row {r['id']}") for r in rows], op.max_prompts)
    cfg = EvalConfig(max_new_tokens=op.max_new_tokens, batch_size=op.batch_size, use_gpu=op.use_gpu,
                     pass_at_k={"k": op.k, "temperature": op.temperature, "top_p": op.top_p})
    records = sample_on_ray(model, tasks, cfg, k=op.k, seed=ctx.config.seed)
    pairs, ties = on_policy_pairs({r["id"]: r for r in rows}, records)
    ctx.log(f"on-policy: {len(pairs)} pairs from {len(tasks)} prompts x {op.k} samples; {ties} prompts all tied")
    return pairs, ties


def _read(ctx: StageContext, split: str) -> list[dict]:
    return [r for f in split_files(ctx, TASKS_STAGE, split) for r in pq.read_table(f).to_pylist()]


def _funnel(rows_in: int, train_rows: list[dict], eval_rows: list[dict], rejected: list[dict]) -> dict:
    kept = len(train_rows) + len(eval_rows)
    if rows_in != kept + len(rejected):
        raise RuntimeError(f"pairs: row accounting broken: in={rows_in} kept={kept} rejected={len(rejected)}")
    return {"rows_in": rows_in, "kept": kept, "rejected": len(rejected),
            "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejected).items())),
            "train": len(train_rows), "eval": len(eval_rows),
            "train_by_kind": dict(sorted(Counter(r["kind"] for r in train_rows).items())),
            "eval_by_kind": dict(sorted(Counter(r["kind"] for r in eval_rows).items())),
            "train_by_family": dict(sorted(Counter(r["family"] for r in train_rows).items()))}


register(Stage(PAIRS_STAGE, (TASKS_STAGE,), run, reads_input_rows=False, optional=("sft",)))
