"""Pieces every data stage shares: the funnel metrics, the error budget, publishing."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq


def count_rows(folder: Path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in sorted(folder.glob("*.parquet")))


def funnel_metrics(rows_in: int, shard_dir: Path, reasons: Counter) -> dict:
    """Counts in / kept / rejected by reason, checked against the files on disk.

    ``rows_in`` comes from the shards' own counts as they read their input;
    kept and rejected are counted from the written files, so a lost row fails here.
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
    """Move finished data/ and rejected/ shard folders into the staging outputs."""
    for kind in ("data", "rejected"):
        src = shard_dir / kind
        if src.exists():
            os.replace(src, out / kind)
        else:
            (out / kind).mkdir(parents=True, exist_ok=True)
