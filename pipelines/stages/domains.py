"""`domains`: tag every row with one of the 18 domains, a score and the runner-up.

Batch inference on Ray Data: each worker of an actor pool builds one
DomainTagger (data_engine/domains.py) and tags whole shards with it. The
teacher (a sentence-embedding model, also behind the cascade) asks each
worker for a GPU when the cluster has one; the student is numpy, so a GPU
would only cap its parallelism at the number of GPUs. Writes data/part-*.parquet with domain,
domain_score, domain_runner_up and domain_confident added; rejects nothing
unless ``reject_below_min_score`` is set. Metrics: the funnel and the domain
histogram.

    r1pipe run recipes/demo.yaml --stages domains
"""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from data_engine.domains import DomainTagger
from data_engine.schema import DOMAINS, ShardResult, reject_table
from pipelines.graph import Stage, StageContext, register
from pipelines.stages.common import (
    input_shards, map_shards, publish_shards, report_tables, shard_funnel,
)


class DomainStep:
    """A run_sharded step: one shard through DomainTagger; the model loads once per worker."""

    def __init__(self, cfg):
        self.tagger = DomainTagger(cfg)
        self.reject_unconfident = cfg.reject_below_min_score

    def __call__(self, table: pa.Table) -> ShardResult:
        tagged = self.tagger(table)
        keep = tagged.column("domain_confident") if self.reject_unconfident \
            else pa.array(np.ones(tagged.num_rows, bool))
        kept, dropped = tagged.filter(keep), tagged.filter(pc.invert(keep))
        counters = Counter(f"domain:{d}" for d in kept.column("domain").to_pylist())
        counters["reject:domains:below_min_score"] = dropped.num_rows
        return ShardResult(kept, _rejects(dropped, self.tagger.cfg.min_score), dict(counters))


def _rejects(rows: pa.Table, min_score: float) -> pa.Table:
    return reject_table([
        {"id": r["id"], "text": r["text"], "source": r.get("source"),
         "reason": "domains:below_min_score",
         "detail": json.dumps({"domain": r["domain"], "domain_score": round(r["domain_score"], 6),
                               "min_score": min_score})}
        for r in rows.select([c for c in ("id", "text", "source", "domain", "domain_score")
                              if c in rows.column_names]).to_pylist()])


def _gpus_per_worker(cfg) -> float:
    if cfg.method == "student" or cfg.device == "cpu":  # teacher and cascade embed on torch
        return 0
    return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0


def domain_histogram(stats: list[dict]) -> dict:
    counts = Counter()
    for s in stats:
        counts.update({k.split(":", 1)[1]: n for k, n in s["counters"].items()
                       if k.startswith("domain:")})
    total = sum(counts.values()) or 1
    rows = [[d, counts[d], round(counts[d] / total, 4)] for d in DOMAINS]
    return {"columns": ["domain", "rows", "share"], "rows": rows}


def run(ctx: StageContext) -> dict:
    cfg = ctx.section
    items = [{"index": i, "path": p} for i, p in enumerate(input_shards(ctx, "quality"))]
    gpus, workers = _gpus_per_worker(cfg), None
    if gpus:
        # One actor per GPU at most: a fixed-size pool larger than that never starts.
        workers = min(ctx.data_concurrency or 1 << 30, int(ray.cluster_resources()["GPU"]))
        ctx.log(f"tagging on {workers} GPU worker(s)")
    stats = map_shards(ctx, DomainStep, {"cfg": cfg}, items, ctx.work / "shards", num_gpus=gpus,
                       concurrency=workers)
    metrics = shard_funnel("domains", stats, ctx.work / "shards", cfg.max_reject_fraction)
    histogram = domain_histogram(stats)
    metrics["domains_present"] = sum(1 for r in histogram["rows"] if r[1])
    metrics["gpus_per_worker"] = gpus
    metrics["tables"] = {"domain histogram": histogram}
    report_tables(ctx, metrics["tables"], bars={"domain histogram": ("domain", "rows")})
    publish_shards(ctx.work / "shards", ctx.out)
    return metrics


register(Stage("domains", ("quality",), run))
