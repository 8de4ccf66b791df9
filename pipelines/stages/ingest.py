"""`ingest`: raw JSONL / JSON / Parquet / HF datasets -> Parquet record shards.

Writes data/part-*.parquet (RECORD_SCHEMA) and rejected/part-*.parquet (with
reason, file and line). Metrics: rows in, kept, rejected by reason.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cluster.data import run_sharded, duplicate_values, write_parquet_atomic
from data_engine.ingest import (UNREADABLE_REASONS, Chunk, InputSpec, plan_chunks, read_chunk,
                                resolve_files)
from pipelines.graph import Stage, StageContext, register
from pipelines.stages.common import check_budget, funnel_metrics, publish_shards


class IngestStep:
    def __init__(self, fields: dict):
        from data_engine.ingest import FieldMap
        self.fields = FieldMap.model_validate(fields)

    def __call__(self, item: dict):
        kept, rejected = read_chunk(Chunk(**item["chunk"]), self.fields)
        return kept, rejected, {}


def _input_files(ctx: StageContext) -> list[tuple[str, str, str | None]]:
    files = []
    for spec in ctx.section.inputs:
        if spec.demo is not None:
            from data_engine.demo_corpus import build_demo_corpus
            demo_dir = ctx.work / "demo_corpus"
            if not (ctx.work / "demo_corpus.done").exists():
                build_demo_corpus(demo_dir, n_docs=spec.demo.n_docs, seed=spec.demo.seed)
                (ctx.work / "demo_corpus.done").write_text("ok")
            spec = InputSpec(path=str(demo_dir))
        files += [(f, fmt, spec.source) for f, fmt in resolve_files(spec)]
    return files


def run(ctx: StageContext) -> dict:
    cfg = ctx.section
    chunks = plan_chunks(_input_files(ctx), cfg)
    items = [{"index": i, "chunk": c.to_dict()} for i, c in enumerate(chunks)]
    ctx.log(f"{len(items)} chunks from {len({c.file for c in chunks})} file(s)")
    stats, errors = run_sharded(IngestStep, {"fields": cfg.fields.model_dump()}, items,
                                ctx.work / "shards", concurrency=ctx.data_concurrency,
                                fault_prefix="ingest", fault=ctx.fault)
    if errors:
        raise RuntimeError("ingest: unreadable chunk(s): " + "; ".join(
            f"{e['item']['chunk']['file']}: {e['error']}" for e in errors[:5]))
    _reject_duplicate_ids(ctx.work / "shards")
    reasons, per_file, unreadable = Counter(), Counter(), {}
    for path in sorted((ctx.work / "shards" / "rejected").glob("part-*.parquet")):
        t = pq.read_table(path, columns=["reason", "file", "detail"])
        reasons.update(t.column("reason").to_pylist())
        per_file.update(t.column("file").to_pylist())
        bad = t.filter(pc.is_in(t.column("reason"), pa.array(UNREADABLE_REASONS)))
        for f, detail in zip(bad.column("file").to_pylist(), bad.column("detail").to_pylist()):
            unreadable.setdefault(f, json.loads(detail)["error"])
    rows_in = sum(s["kept"] + s["rejected"] for s in stats)
    metrics = funnel_metrics(rows_in, ctx.work / "shards", reasons)
    metrics.update(files=len({c.file for c in chunks}), chunks=len(chunks))
    _check_unreadable(unreadable, metrics["files"], cfg.max_unreadable_file_fraction)
    check_budget("ingest", metrics, cfg.max_reject_fraction, per_file)
    publish_shards(ctx.work / "shards", ctx.out)
    return metrics


def _check_unreadable(unreadable: dict[str, str], n_files: int, max_fraction: float) -> None:
    """Unreadable files ({file: error}) are rejections; more than max_fraction of the files
    fails the stage."""
    if n_files and len(unreadable) / n_files > max_fraction:
        named = "; ".join(f"{f}: {e[:200]}" for f, e in list(unreadable.items())[:5])
        raise ValueError(f"ingest: {len(unreadable)} of {n_files} input file(s) unreadable, over "
                         f"max_unreadable_file_fraction={max_fraction}: {named}")


def _reject_duplicate_ids(shard_dir: Path) -> int:
    """Rows whose id was seen before (shard order, then row order) move to rejected."""
    data = sorted(str(p) for p in (shard_dir / "data").glob("part-*.parquet"))
    dups = duplicate_values(data, "id")
    if not dups:
        return 0
    seen, moved = set(), 0
    for path in data:
        table = pq.read_table(path)
        ids = table.column("id").to_pylist()
        drop = [i for i, rid in enumerate(ids) if rid in dups and (rid in seen or seen.add(rid))]
        if not drop:
            continue
        dropped = set(drop)
        mask = pa.array([i not in dropped for i in range(len(ids))])
        rej_path = Path(path.replace("/data/", "/rejected/"))
        moved_rows = table.take(drop)
        rej = pa.table({
            "id": moved_rows.column("id"), "text": moved_rows.column("text"),
            "source": moved_rows.column("source"),
            "reason": pa.array(["duplicate_id"] * len(drop)),
            "detail": pa.array([json.dumps({"error": "id seen in an earlier row"})] * len(drop)),
            "file": pa.array([None] * len(drop), pa.string()),
            "line": pa.array([None] * len(drop), pa.int64())})
        old = pq.read_table(rej_path)
        write_parquet_atomic(pa.concat_tables([old, rej.cast(old.schema)]), rej_path)
        write_parquet_atomic(table.filter(mask), Path(path))
        moved += len(drop)
    return moved


register(Stage("ingest", (), run, summary="read raw files into Parquet record shards"))
