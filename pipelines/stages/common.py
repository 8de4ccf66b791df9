"""Pieces every data stage shares: the funnel metrics, the error budget, publishing."""
from __future__ import annotations

import errno
import os
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
from pydantic import BaseModel


def library_config(section: BaseModel) -> BaseModel:
    """A data stage's section as its library's config (the class it extends), without the
    pipeline's own keys such as the error budget."""
    base = type(section).__mro__[1]
    return base.model_validate(section.model_dump(include=set(base.model_fields)))


def count_rows(folder: Path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in sorted(folder.glob("*.parquet")))


def funnel_metrics(rows_in: int, shard_dir: Path, reasons: Counter) -> dict:
    """Counts in / kept / rejected by reason, checked against the files on disk.

    ``rows_in`` is what the stage read, never what it wrote: the row counts of its input
    files (shard stages), or the rows ingest's reader returned. Kept and rejected are counted
    from the written files, so a row a step dropped, or a write lost, fails here.
    """
    kept = count_rows(shard_dir / "data")
    rejected = count_rows(shard_dir / "rejected")
    if rows_in != kept + rejected or rejected != sum(reasons.values()):
        raise RuntimeError(f"row accounting broken in {shard_dir}: in={rows_in} kept={kept} "
                           f"rejected={rejected} reasons={sum(reasons.values())}")
    return {"rows_in": rows_in, "kept": kept, "rejected": rejected,
            "rejected_by_reason": dict(sorted(reasons.items()))}


def check_budget(stage: str, metrics: dict, max_fraction: float, per_file: Counter) -> None:
    """Fail the stage when too many rows were rejected, naming the worst files."""
    if metrics["rows_in"] and metrics["rejected"] / metrics["rows_in"] > max_fraction:
        worst = ", ".join(f"{f} ({n} rows)" for f, n in per_file.most_common(5))
        raise ValueError(f"{stage}: {metrics['rejected']} of {metrics['rows_in']} rows rejected, "
                         f"over the error budget max_reject_fraction={max_fraction}; worst: {worst}")


def publish_shards(shard_dir: Path, out: Path) -> None:
    """Link the finished data/ and rejected/ shards into the staging outputs.

    The shards and their done markers stay in the work folder, which the runner drops only
    after the done manifest: a failure after this point (a W&B error, a kill) resumes from
    them instead of from markers whose files were moved into a staging folder it discards."""
    for kind in ("data", "rejected"):
        (out / kind).mkdir(parents=True, exist_ok=True)
        for src in sorted((shard_dir / kind).glob("*.parquet")):
            link_or_copy(src, out / kind / src.name)


_NO_HARD_LINKS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (no bytes copied; shards are never rewritten in place), or a copy on a
    filesystem without hard links."""
    try:
        os.link(src, dst)
    except OSError as err:
        if err.errno not in _NO_HARD_LINKS:
            raise  # a real I/O error, or dst already there: not a reason to copy
        shutil.copy2(src, dst)


# --- stages that map record shards one to one (dedup write-out, quality, domains, difficulty) ---

def input_shards(ctx, stage: str) -> list[str]:
    """The kept-row shards an upstream data stage published."""
    folder = ctx.inputs[stage] / "data"
    shards = sorted(str(p) for p in folder.glob("*.parquet"))
    if not shards and not folder.is_dir():
        raise ValueError(f"{ctx.name}: input stage {stage!r} has no data/ folder at {folder}")
    return shards


def shard_label(path: str) -> str:
    """<stage>/data/part-NNNNN.parquet: how error messages and budgets name a shard."""
    p = Path(path)
    return f"{p.parent.parent.name}/{p.parent.name}/{p.name}"


def map_shards(ctx, step_cls, step_kwargs: dict, items: list[dict], out_dir: Path,
               num_gpus: float = 0, concurrency: int | None = None,
               actors: bool = True, fault_name: str | None = None,
               inputs: tuple[str, ...] = ("path",)) -> list[dict]:
    """run_sharded over items that each carry their input ``path``; a failed shard fails the
    stage naming its file (the shards are our own upstream outputs: a failure is a bug or
    broken storage, not bad input). The step gets the Parquet files under the item's
    ``inputs`` keys, as tables. ``actors=False`` for steps cheap to build. Fault points
    are ``<fault_name>:after_write:<index>``; fault_name defaults to the stage's name."""
    from cluster.sharded import run_sharded, shard_reader
    stats, errors = run_sharded(step_cls, step_kwargs, items, out_dir,
                                concurrency=concurrency or ctx.data_concurrency,
                                num_gpus=num_gpus, fault_prefix=fault_name or ctx.name, fault=ctx.fault,
                                actors=actors, read=shard_reader(*inputs))
    if errors:
        raise RuntimeError(f"{ctx.name}: {len(errors)} shard(s) failed: " + "; ".join(
            f"{shard_label(e['item']['path'])}: {e['error']}" for e in errors[:5]))
    reused = sum(s["reused"] for s in stats)
    if reused:
        ctx.log(f"resumed: {reused} of {len(items)} shard(s) were done before")
    return stats


def shard_funnel(stage: str, stats: list[dict], shard_dir: Path, max_fraction: float) -> dict:
    """Funnel metrics from per-shard stats whose counters hold ``reject:<reason>`` counts;
    fails the stage when the error budget is exceeded, naming the worst input shards."""
    reasons, per_file = Counter(), Counter()
    for s in stats:
        for key, n in s["counters"].items():
            if key.startswith("reject:") and n:
                reasons[key[len("reject:"):]] += n
        if s["rejected"]:
            per_file[shard_label(s["item"]["path"])] += s["rejected"]
    rows_in = sum(pq.ParquetFile(s["item"]["path"]).metadata.num_rows for s in stats)
    metrics = funnel_metrics(rows_in, shard_dir, reasons)
    metrics["shards"] = len(stats)
    metrics["shards_reused"] = sum(s["reused"] for s in stats)  # done before a crash
    check_budget(stage, metrics, max_fraction, per_file)
    return metrics


def report_tables(ctx, tables: dict[str, dict], bars: dict[str, tuple[str, str]] | None = None
                  ) -> None:
    """Log ``metrics["tables"]``-style tables to W&B; ``bars`` maps a table name to its
    (label column, value column) for a bar chart too."""
    for name, t in tables.items():
        key = name.replace(" ", "_")
        ctx.sink.table(key, t["columns"], t["rows"])
        if name in (bars or {}):
            label, value = bars[name]
            i, j = t["columns"].index(label), t["columns"].index(value)
            ctx.sink.bar(f"{key}_chart", label, value, [[r[i], r[j]] for r in t["rows"]], name)
