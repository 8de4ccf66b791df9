"""`dedup`: exact then MinHash-LSH near-duplicate removal over the ingest shards.

Writes data/part-*.parquet (the surviving rows, unchanged) and
rejected/part-*.parquet (each removed row with reason exact_duplicate or
near_duplicate, duplicate_of and its Jaccard: exact, or the MinHash estimate with
dedup.jaccard=estimated). cluster/dedup.py
says what runs where; data_engine/dedup.py and dedup_parts.py hold the
algorithms. Resumable in two steps: the removals (the driver-side result of
both passes) are cached in the work folder, and the per-shard write-out
(DedupApplyStep) keeps finished shards.

    r1pipe run recipes/demo.yaml --stages dedup
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cluster import storage
from cluster.dedup import find_removals, write_removals
from cluster.sharded import shard_name
from data_engine.dedup import apply_removals
from data_engine.dedup_survivors import REMOVED_SCHEMA
from data_engine.schema import ShardResult
from pipelines.graph import Stage, StageContext, register
from pipelines.stages.common import (
    input_shards, library_config, map_shards, publish_shards, report_tables, shard_funnel,
)
from pipelines.store import write_json_atomic

_JACCARD_BINS = [0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0 + 1e-9]


class DedupApplyStep:
    """A run_sharded step: a shard and its removals (write_removals) -> ShardResult."""

    def __call__(self, table: pa.Table, removals: pa.Table) -> ShardResult:
        kept, rejected = apply_removals(table, removals.select(REMOVED_SCHEMA.names))
        reasons = rejected.column("reason").to_pylist()
        return ShardResult(kept, rejected, {f"reject:{r}": reasons.count(r) for r in set(reasons)})


def _removals(ctx: StageContext, shards: list[str]) -> tuple[dict, bool]:
    """Find and store the removals once; a resumed run reads the cached summary (True). On
    object storage they go up with the marker last, so a driver on another node finds them."""
    marker = ctx.work / "removals.json"
    if marker.exists():
        ctx.log("removals cached from an earlier attempt: skipping the bucket and cluster passes")
        return json.loads(marker.read_text()), True
    removals, stats = find_removals(shards, library_config(ctx.section), ctx.work,
                                    concurrency=ctx.data_concurrency, log=ctx.log)
    write_removals(removals, len(shards), ctx.work / "removals")
    near = removals.filter(pc.equal(removals.column("reason"), "near_duplicate"))
    stats["near_jaccard_hist"] = _histogram(near.column("jaccard").to_numpy())
    storage.push(ctx.work / "removals")
    write_json_atomic(marker, stats)
    storage.push(marker)
    shutil.rmtree(ctx.work / "signatures", ignore_errors=True)  # the removals supersede them
    return stats, False


def _histogram(values: np.ndarray) -> list[list]:
    counts, _ = np.histogram(values, bins=_JACCARD_BINS)
    labels = [f"{lo:.1f}-{min(hi, 1.0):.1f}" for lo, hi in zip(_JACCARD_BINS, _JACCARD_BINS[1:])]
    return [[label, int(n)] for label, n in zip(labels, counts)]


def run(ctx: StageContext) -> dict:
    shards = input_shards(ctx, "ingest")
    stats, cached = _removals(ctx, shards)
    items = [{"index": i, "path": path,
              "removals": str(ctx.work / "removals" / f"{shard_name(i)}.parquet")}
             for i, path in enumerate(shards)]
    shard_stats = map_shards(ctx, DedupApplyStep, {}, items, ctx.work / "shards", actors=False,
                             inputs=("path", "removals"))
    metrics = shard_funnel("dedup", shard_stats, ctx.work / "shards",
                           ctx.section.max_reject_fraction)
    metrics.update({k: v for k, v in stats.items() if k != "near_jaccard_hist"}, removals_reused=cached)
    metrics["tables"] = {"near duplicates by Jaccard": {
        "columns": ["jaccard", "removed"], "rows": stats["near_jaccard_hist"]}}
    report_tables(ctx, metrics["tables"], bars={
        "near duplicates by Jaccard": ("jaccard", "removed")})
    publish_shards(ctx.work / "shards", ctx.out)
    return metrics


register(Stage("dedup", ("ingest",), run))
