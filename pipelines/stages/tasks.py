"""`tasks`: verifiable reasoning tasks as a train split and a held-out eval split.

Inputs: none required; the curated corpus (`difficulty`) when the recipe has it, to find the
pretraining documents that contain a held-out prompt. Writes into the stage folder:
  train/part-00000.parquet      SFT / DPO / RL rows (TASK_SCHEMA: prompt, response, answer, checker, ...)
  eval/part-00000.parquet       held-out rows every training stage is evaluated on
  rejected/part-00000.parquet   user rows that cannot be used (reason, file, line), duplicate ids,
                                and training rows that pose an eval problem (overlaps_eval)
  corpus_excluded.json          ids of corpus documents pretraining leaves out (they hold an eval prompt)
  contamination.parquet         which document holds which eval prompt, and how much of it
Metrics: the funnel (in = kept + rejected), rows per split, family and difficulty, overlaps by
kind, cells the generator could not fill, corpus documents excluded.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from functools import partial

import pyarrow as pa

from pipelines.graph import CORPUS_STAGE, Stage, StageContext, register
from pipelines.stages.tokenizer import corpus_files

TRAIN, EVAL = "train", "eval"


def run(ctx: StageContext) -> dict:
    from data_engine.task_data import (ContaminationIndex, Overlaps, generated_split, generated_train,
                                       read_task_files)
    cfg, gen = ctx.section, ctx.section.generator
    seed = gen.seed if gen.seed is not None else ctx.config.seed
    user, rejected = read_task_files(cfg.files)
    n_user = len(user) + len(rejected)
    gen_eval = generated_split(gen, EVAL, seed) if gen.enabled else []
    eval_rows, dup = unique_ids(gen_eval + [r for r in user if r["split"] == EVAL])
    rejected += dup
    overlaps = Overlaps(eval_rows, cfg.decontamination)
    gen_train, overlap_rejects, short = generated_train(gen, seed, overlaps) if gen.enabled else ([], [], {})
    train_rows, dup = unique_ids(gen_train + [r for r in user if r["split"] == TRAIN], taken=eval_rows)
    user_train, more_rejects = drop_user_overlaps([r for r in train_rows if "file" in r], overlaps)
    train_rows = [r for r in train_rows if "file" not in r] + user_train
    rejected += overlap_rejects + more_rejects + dup
    _write(ctx, train_rows, eval_rows, rejected)
    n_generated = len(gen_eval) + len(gen_train) + len(overlap_rejects)
    metrics = _funnel(n_generated + n_user, train_rows, eval_rows, rejected)
    check_budget("tasks", cfg.max_reject_fraction, rejected, n_user)
    metrics.update(_decontaminate_corpus(ctx, eval_rows, ContaminationIndex))
    metrics["eval_digest"] = _eval_digest(ctx, eval_rows)
    metrics["train_shortfall"] = short
    metrics["tables"] = {"tasks by family and difficulty": _cell_table(train_rows, eval_rows)}
    ctx.sink.table("tasks_by_cell", *_table_args(metrics["tables"]["tasks by family and difficulty"]))
    ctx.log(f"{len(train_rows)} train and {len(eval_rows)} eval tasks; {len(rejected)} rejected "
            f"({dict(Counter(r['reason'] for r in rejected))})")
    return metrics


def unique_ids(rows: list[dict], taken: list[dict] = ()) -> tuple[list[dict], list[dict]]:
    """Rows with a new id, and rejections of the repeats naming the first holder of the id
    (rows in `taken`, the eval split, hold their ids first)."""
    from data_engine.task_data import row_reject
    first = {r["id"]: r for r in taken}
    kept, dropped = [], []
    for r in rows:
        if r["id"] in first:
            dropped.append(row_reject(r, "duplicate_id", {"id": r["id"], "first": _where(first[r["id"]])}))
        else:
            first[r["id"]] = r
            kept.append(r)
    return kept, dropped


def _where(row: dict) -> str:
    return f"{row['file']}:{row['line']}" if row.get("file") else f"{row['source']} ({row['split']} split)"


def drop_user_overlaps(rows: list[dict], overlaps) -> tuple[list[dict], list[dict]]:
    from data_engine.task_data import row_reject
    found = overlaps.find(rows) if rows else {}
    kept = [r for r in rows if r["id"] not in found]
    dropped = [row_reject(r, "overlaps_eval", {"kind": found[r["id"]][0], "eval_id": found[r["id"]][1],
                                                "score": round(found[r["id"]][2], 4)})
               for r in rows if r["id"] in found]
    return kept, dropped


def _write(ctx: StageContext, train_rows: list[dict], eval_rows: list[dict], rejected: list[dict]) -> None:
    from data_engine.task_data import TASK_REJECT_SCHEMA, TASK_SCHEMA
    write_splits(ctx, {TRAIN: train_rows, EVAL: eval_rows}, rejected, TASK_SCHEMA, TASK_REJECT_SCHEMA)


def write_splits(ctx: StageContext, splits: dict[str, list[dict]], rejected: list[dict], schema: pa.Schema,
                 reject_schema: pa.Schema) -> None:
    """<split>/part-00000.parquet per split and rejected/part-00000.parquet, each published atomically."""
    from cluster.sharded import shard_name, write_parquet_atomic
    name = f"{shard_name(0)}.parquet"
    for folder, rows in splits.items():
        write_parquet_atomic(pa.Table.from_pylist(rows, schema=schema), ctx.out / folder / name)
    write_parquet_atomic(pa.Table.from_pylist(rejected, schema=reject_schema), ctx.out / "rejected" / name)


def _funnel(rows_in: int, train_rows: list[dict], eval_rows: list[dict], rejected: list[dict]) -> dict:
    kept = len(train_rows) + len(eval_rows)
    if rows_in != kept + len(rejected):
        raise RuntimeError(f"tasks: row accounting broken: in={rows_in} kept={kept} rejected={len(rejected)}")
    by_kind = Counter(json.loads(r["detail"])["kind"] for r in rejected if r["reason"] == "overlaps_eval")
    return {"rows_in": rows_in, "kept": kept, "rejected": len(rejected),
            "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejected).items())),
            "train": len(train_rows), "eval": len(eval_rows), "overlaps_by_kind": dict(sorted(by_kind.items())),
            "train_with_response": sum(r["response"] is not None for r in train_rows),
            "train_with_answer": sum(r["answer"] is not None for r in train_rows)}


def check_budget(stage: str, max_fraction: float, rejected: list[dict], n_user: int) -> None:
    """The error budget covers user-file rows only: overlaps with the eval split are by design."""
    bad = [r for r in rejected if r["reason"] != "overlaps_eval" and r["file"] is not None]
    if n_user and len(bad) / n_user > max_fraction:
        worst = Counter(r["file"] for r in bad).most_common(5)
        raise ValueError(f"{stage}: {len(bad)} of {n_user} rows of the user files rejected, over the error budget "
                         f"{stage}.max_reject_fraction={max_fraction}; worst: "
                         + ", ".join(f"{f} ({n} rows)" for f, n in worst))


def _decontaminate_corpus(ctx: StageContext, eval_rows: list[dict], index_cls) -> dict:
    """Corpus documents that contain a held-out prompt: listed for pretraining to leave out."""
    if CORPUS_STAGE not in ctx.inputs or not eval_rows:
        (ctx.out / "corpus_excluded.json").write_text("[]\n")
        return {"corpus_docs_excluded": 0, "eval_tasks_in_corpus": 0}
    from cluster.sharded import map_files, write_parquet_atomic
    index = index_cls(eval_rows, ctx.section.decontamination)
    files = [str(p) for p in corpus_files(ctx.inputs[CORPUS_STAGE])]
    column = ctx.section.decontamination.corpus_text_column
    scan = partial(index.contaminated, text_column=column)
    hits = map_files(scan, files, ["id", column])
    if hits.num_rows == 0:
        hits = scan(pa.table({"id": pa.array([], pa.string()), column: pa.array([], pa.string())}))
    write_parquet_atomic(hits, ctx.out / "contamination.parquet")
    docs = sorted(set(hits.column("doc_id").to_pylist()))
    (ctx.out / "corpus_excluded.json").write_text(json.dumps(docs) + "\n")
    return {"corpus_docs_excluded": len(docs), "eval_tasks_in_corpus": len(set(hits.column("task_id").to_pylist()))}


def _eval_digest(ctx: StageContext, eval_rows: list[dict]) -> str:
    """What pretraining reads of this stage (the eval split and the excluded documents): its
    fingerprint input, so new SFT data does not rerun pretraining."""
    h = hashlib.sha256()
    for r in eval_rows:
        h.update(json.dumps([r["id"], r["prompt"], r["system"], r["context"], r["answer"], r["checker"]]).encode())
    h.update((ctx.out / "corpus_excluded.json").read_bytes())
    return h.hexdigest()


def _cell_table(train_rows: list[dict], eval_rows: list[dict]) -> dict:
    counts = {split: Counter((r["family"], r["difficulty"] or "-") for r in rows)
              for split, rows in ((TRAIN, train_rows), (EVAL, eval_rows))}
    cells = sorted(set(counts[TRAIN]) | set(counts[EVAL]))
    return {"columns": ["family", "difficulty", "train", "eval"],
            "rows": [[f, d, counts[TRAIN][(f, d)], counts[EVAL][(f, d)]] for f, d in cells]}


def _table_args(table: dict) -> tuple[list, list]:
    return table["columns"], table["rows"]


register(Stage("tasks", (), run, optional=(CORPUS_STAGE,)))
