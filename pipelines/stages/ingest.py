"""`ingest`: raw JSONL / JSON / Parquet / HF datasets -> Parquet record shards.

Writes data/part-*.parquet (RECORD_SCHEMA) and rejected/part-*.parquet (with
reason, file and line). Metrics: rows in, kept, rejected by reason.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cluster import storage
from cluster.sharded import (duplicate_values, maybe_fault, run_sharded, shard_name,
                          write_parquet_atomic)
from data_engine.ingest import (UNREADABLE_REASONS, Chunk, FieldMap, InputSpec, RawRow, plan_chunks,
                                read_raw_rows, records_from_rows, resolve_files)
from data_engine.schema import IngestResult
from pipelines.graph import Stage, StageContext, register
from pipelines.stages.common import check_budget, funnel_metrics, link_or_copy, publish_shards
from pipelines.store import write_json_atomic


class IngestStep:
    """A run_sharded step: a chunk's raw rows (read_chunk_rows) -> records and rejections."""

    def __init__(self, fields: dict):
        self.fields = FieldMap.model_validate(fields)

    def __call__(self, chunk: Chunk, rows: list[RawRow]) -> IngestResult:
        return records_from_rows(chunk, rows, self.fields)


def read_chunk_rows(item: dict) -> tuple[Chunk, list[RawRow]]:
    """run_sharded's reader for ingest: the chunk a work item names, and its raw rows."""
    chunk = Chunk(**item["chunk"])
    storage.localize(chunk.file)  # the demo corpus lies in the run's mirror; the user's inputs do not
    return chunk, read_raw_rows(chunk)


def _input_files(ctx: StageContext) -> list[tuple[str, str, str | None]]:
    files = []
    for spec in ctx.section.inputs:
        if spec.demo is not None:
            from data_engine.generators.demo_corpus import build_demo_corpus
            demo_dir = ctx.work / "demo_corpus"
            if not (ctx.work / "demo_corpus.done").exists():
                build_demo_corpus(demo_dir, n_docs=spec.demo.n_docs, seed=spec.demo.seed)
                storage.push(demo_dir)  # object storage: for nodes that do not share the mirror, and a resume
                (ctx.work / "demo_corpus.done").write_text("ok")
                storage.push(ctx.work / "demo_corpus.done")
            spec = InputSpec(path=str(demo_dir))
        files += [(f, fmt, spec.source) for f, fmt in resolve_files(spec)]
    return files


def run(ctx: StageContext) -> dict:
    cfg = ctx.section
    files = _input_files(ctx)
    chunks = plan_chunks(files, cfg)
    items = [{"index": i, "chunk": c.to_dict()} for i, c in enumerate(chunks)]
    ctx.log(f"{len(items)} chunks from {len({c.file for c in chunks})} file(s)")
    stats, errors = run_sharded(IngestStep, {"fields": cfg.fields.model_dump()}, items,
                                ctx.work / "shards", concurrency=ctx.data_concurrency,
                                fault_prefix="ingest", fault=ctx.fault, read=read_chunk_rows,
                                actors=False)  # a FieldMap is cheap to build per chunk
    if errors:
        raise RuntimeError("ingest: unreadable chunk(s): " + "; ".join(
            f"{e['item']['chunk']['file']}: {e['error']}" for e in errors[:5]))
    _check_no_empty_files([f for f, _, _ in files], stats)
    unique = ctx.work / "unique"
    kept_lines = {s["index"]: s.get("lines") for s in stats}
    _reject_duplicate_ids(ctx.work / "shards", unique, chunks, kept_lines, ctx.fault)
    reasons, per_file, unreadable = Counter(), Counter(), {}
    for path in sorted((unique / "rejected").glob("part-*.parquet")):
        t = pq.read_table(path, columns=["reason", "file", "detail"])
        reasons.update(t.column("reason").to_pylist())
        per_file.update(t.column("file").to_pylist())
        bad = t.filter(pc.is_in(t.column("reason"), pa.array(UNREADABLE_REASONS)))
        for f, detail in zip(bad.column("file").to_pylist(), bad.column("detail").to_pylist()):
            unreadable.setdefault(f, json.loads(detail)["error"])
    # What the reader returned for each chunk, recorded in its marker as it read it.
    rows_in = sum(s["kept"] + s["rejected"] for s in stats)
    metrics = funnel_metrics(rows_in, unique, reasons)
    metrics.update(files=len({c.file for c in chunks}), chunks=len(chunks),
                   shards_reused=sum(s["reused"] for s in stats))  # read before a crash
    _check_unreadable(unreadable, metrics["files"], cfg.max_unreadable_file_fraction)
    check_budget("ingest", metrics, cfg.max_reject_fraction, per_file)
    publish_shards(unique, ctx.out)
    return metrics


def _check_no_empty_files(files: list[str], stats: list[dict]) -> None:
    """An input file that yields no row at all (empty, or blank lines only) is a mistake in the
    recipe's inputs, not a stage that is done with nothing: fail naming the file(s)."""
    rows = Counter({f: 0 for f in files})
    for s in stats:
        rows[s["item"]["chunk"]["file"]] += s["kept"] + s["rejected"]
    empty = [f for f, n in rows.items() if n == 0]
    if empty:
        raise ValueError(f"ingest: input file {empty[0]} holds no rows (empty file)"
                         + (f", and {len(empty) - 1} more: {empty[1:4]}" if len(empty) > 1 else "")
                         + "; remove it from ingest.inputs or fix it")


def _check_unreadable(unreadable: dict[str, str], n_files: int, max_fraction: float) -> None:
    """Unreadable files ({file: error}) are rejections; more than max_fraction of the files
    fails the stage."""
    if n_files and len(unreadable) / n_files > max_fraction:
        named = "; ".join(f"{f}: {e[:200]}" for f, e in list(unreadable.items())[:5])
        raise ValueError(f"ingest: {len(unreadable)} of {n_files} input file(s) unreadable, over "
                         f"max_unreadable_file_fraction={max_fraction}: {named}")


def _reject_duplicate_ids(shards: Path, out: Path, chunks: list[Chunk],
                          kept_lines: dict[int, list[int] | None], fault: str | None) -> int:
    """Rows whose id was seen before (shard order, then row order) move to rejected, naming
    the line of the first occurrence (``kept_lines``: each shard's kept rows' lines, from the step).

    The shards run_sharded wrote are never changed: ``out`` gets a rewritten data/rejected
    pair for each shard that holds a repeat and a link to the others, then a marker. A crash
    before the marker rebuilds ``out`` from the untouched shards, so no row moves twice.
    Fault point (tests): ``ingest:duplicate_ids:<index>``, after a rewritten shard."""
    marker = out / "moved.json"
    plan = hashlib.sha256(json.dumps([c.to_dict() for c in chunks], sort_keys=True).encode()).hexdigest()
    done = json.loads(marker.read_text()) if marker.exists() else {}
    if done.get("plan") == plan:
        return done["moved"]  # else: none yet, or built from another plan's shards
    shutil.rmtree(out, ignore_errors=True)
    dups = duplicate_values([str(shards / "data" / f"{shard_name(i)}.parquet")
                             for i in range(len(chunks))], "id")
    first: dict[str, dict] = {}  # id -> where it first occurs
    moved = 0
    for i, chunk in enumerate(chunks):
        name = f"{shard_name(i)}.parquet"
        data, rejected = shards / "data" / name, shards / "rejected" / name
        ids = pq.read_table(data, columns=["id"]).column("id").to_pylist()
        repeats = [k for k, rid in enumerate(ids) if rid in dups]
        lines = kept_lines.get(i) or []
        lines = lines if len(lines) == len(ids) else []  # unknown: the rejection names the id
        drop = {}  # row -> the first occurrence it repeats
        for k in repeats:
            if ids[k] in first:
                drop[k] = first[ids[k]]
            else:
                first[ids[k]] = {"file": chunk.file, "line": lines[k] if lines else None}
        if not drop:
            for src in (data, rejected):
                link_or_copy(src, _mkdir(out / src.parent.name) / name)
            continue
        _move_rows(data, rejected, out, drop, chunk.file, lines)
        moved += len(drop)
        maybe_fault(f"ingest:duplicate_ids:{i}", fault)
    write_json_atomic(marker, {"moved": moved, "plan": plan})
    return moved


def _move_rows(data: Path, rejected: Path, out: Path, drop: dict[int, dict], file: str,
               lines: list[int]) -> None:
    """Write ``data`` without the rows in ``drop`` and ``rejected`` with them, into ``out``."""
    table, old = pq.read_table(data), pq.read_table(rejected)
    rows = table.take(sorted(drop)).select(["id", "text", "source"]).to_pylist()
    moved = []
    for k, row in zip(sorted(drop), rows):
        line, where = (lines[k] if lines else None), drop[k]
        named = f"{where['file']}:{where['line']}" if where["line"] else \
            f"{where['file']}, id {row['id']!r}"
        moved.append(dict(row, reason="duplicate_id", file=file, line=line, detail=json.dumps(
            {"file": file, "line": line, "error": f"id first seen at {named}", "first": where})))
    keep = pa.array([k not in drop for k in range(table.num_rows)])
    write_parquet_atomic(table.filter(keep), out / "data" / data.name)
    write_parquet_atomic(pa.concat_tables([old, pa.Table.from_pylist(moved, schema=old.schema)]),
                         out / "rejected" / rejected.name)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


register(Stage("ingest", (), run))
