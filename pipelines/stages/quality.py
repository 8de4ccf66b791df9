"""`quality`: Gopher/C4-style heuristics, a blocklist and PII, over the dedup shards.

Writes data/part-*.parquet (kept rows, PII redacted unless the config drops
them) and rejected/part-*.parquet (reason quality:<rule>, safety:blocklist
or pii:<kind>; detail holds the measured value and the threshold). Metrics:
the funnel, redactions by kind, and rejections by rule as a table.

    r1pipe run recipes/demo.yaml --stages quality
"""
from __future__ import annotations

from collections import Counter

import pyarrow as pa

from data_engine.quality import QualityConfig, quality_batch
from data_engine.schema import ShardResult
from pipelines.graph import Stage, StageContext, register
from pipelines.stages.common import (
    input_shards, library_config, map_shards, publish_shards, report_tables, shard_funnel,
)


class QualityStep:
    """A run_sharded step: one shard through quality_batch."""

    def __init__(self, cfg: dict):
        self.cfg = QualityConfig(**cfg)

    def __call__(self, table: pa.Table) -> ShardResult:
        return quality_batch(table, self.cfg)


def run(ctx: StageContext) -> dict:
    cfg = ctx.section
    items = [{"index": i, "path": p} for i, p in enumerate(input_shards(ctx, "dedup"))]
    stats = map_shards(ctx, QualityStep, {"cfg": library_config(cfg).model_dump()}, items, ctx.work / "shards",
                       actors=False)
    metrics = shard_funnel("quality", stats, ctx.work / "shards", cfg.max_reject_fraction)
    counters = sum((Counter(s["counters"]) for s in stats), Counter())
    metrics["redacted_rows"] = counters["redacted_rows"]
    metrics["redactions"] = {k.split(":", 1)[1]: n for k, n in sorted(counters.items())
                             if k.startswith("redact:")}
    rows = [[reason, n] for reason, n in sorted(metrics["rejected_by_reason"].items(),
                                                key=lambda kv: -kv[1])]
    metrics["tables"] = {"rejections by rule": {"columns": ["rule", "rows"], "rows": rows}}
    report_tables(ctx, metrics["tables"], bars={"rejections by rule": ("rule", "rows")})
    publish_shards(ctx.work / "shards", ctx.out)
    return metrics


register(Stage("quality", ("dedup",), run))
