"""`difficulty`: KenLM perplexity per row, cut per domain into basic/advanced/expert.

  1. driver   the reference subset (data_engine/difficulty.py: by default each
              domain's top rows by domain_score) is streamed from the shards
              into KenLM's own estimator (lmplz, build_binary)
  2. workers  every row's perplexity (PerplexityScorer, one model per actor)
  3. driver   per-domain quantile cuts from the (domain, ppl) columns
  4. workers  each row's level from the cuts

Writes data/part-*.parquet with ppl and difficulty added, rejected/ (empty
unless max_ppl is set), and model/kenlm.binary + model/cuts.json, the artifacts
that grade new text the same way. Steps 1, 2 and 4 keep their finished work
across a crash. Metrics: the funnel, the cuts, a difficulty x domain table and
a perplexity histogram.

    scripts/build_kenlm.sh        # once: lmplz and build_binary into the venv
    r1pipe run recipes/demo.yaml --stages difficulty
"""
from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_engine.difficulty import (
    GLOBAL, PerplexityScorer, assign_difficulty, domain_score_thresholds, quantile_cuts,
    reference_mask, train_kenlm,
)
from data_engine.schema import DIFFICULTIES, DOMAINS, REJECT_SCHEMA, reject_table
from pipelines.graph import Stage, StageContext, register
from pipelines.stages.common import (
    input_shards, map_shards, publish_shards, report_tables, shard_funnel,
)
from pipelines.store import write_json_atomic


class ScoreStep:
    """A run_sharded step: adds ``ppl`` to one shard; rejects nothing."""

    def __init__(self, model: str):
        self.scorer = PerplexityScorer(model)

    def __call__(self, item: dict):
        return self.scorer(pq.read_table(item["path"])), REJECT_SCHEMA.empty_table(), {}


class GradeStep:
    """A run_sharded step: adds ``difficulty`` from the cuts; rows above max_ppl are rejected."""

    def __init__(self, cuts: dict, max_ppl: float | None):
        self.cuts = {d: tuple(c) for d, c in cuts.items()}
        self.max_ppl = max_ppl

    def __call__(self, item: dict):
        graded = assign_difficulty(pq.read_table(item["path"]), self.cuts)
        too_high = pc.greater(pc.fill_null(graded.column("ppl"), math.inf), self.max_ppl) \
            if self.max_ppl is not None else pa.array(np.zeros(graded.num_rows, bool))
        kept, dropped = graded.filter(pc.invert(too_high)), graded.filter(too_high)
        cells = zip(kept.column("domain").to_pylist(), kept.column("difficulty").to_pylist()) \
            if "domain" in kept.column_names else ((GLOBAL, lvl) for lvl in
                                                   kept.column("difficulty").to_pylist())
        counters = Counter(f"cell:{d}:{level}" for d, level in cells)
        counters["reject:difficulty:max_ppl"] = dropped.num_rows
        rejected = reject_table([{"id": r["id"], "text": r["text"], "source": r.get("source"),
                                  "reason": "difficulty:max_ppl",
                                  "detail": {"ppl": r["ppl"], "max_ppl": self.max_ppl}}
                                 for r in dropped.select(["id", "text", "source", "ppl"]).to_pylist()])
        return kept, rejected, dict(counters)


# --- 1. the KenLM model ---------------------------------------------------------------

def _columns(shards: list[str], columns: list[str]) -> pa.Table:
    tables = [pq.read_table(p, columns=columns) for p in shards]
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})


def _reference_texts(shards: list[str], cfg, thresholds) -> Iterator[str]:
    """Stream the reference rows shard by shard: the subset never sits in memory whole."""
    wanted = ["id", "text", "source", "domain", "domain_score"]
    for path in shards:
        table = pq.read_table(path, columns=[c for c in wanted if c in pq.read_schema(path).names])
        mask = reference_mask(table, cfg, thresholds)
        yield from table.column("text").filter(pa.array(mask)).to_pylist()


def _kenlm_model(ctx: StageContext, shards: list[str]) -> tuple[Path, dict]:
    folder, marker = ctx.work / "kenlm", ctx.work / "kenlm.json"
    if marker.exists():
        ctx.log("KenLM model cached from an earlier attempt")
        return folder / "model.binary", json.loads(marker.read_text())
    cfg = ctx.section
    thresholds = None
    if cfg.reference == "top_domain_score":
        thresholds = domain_score_thresholds(_columns(shards, ["domain", "domain_score"]), cfg)
    shutil.rmtree(folder, ignore_errors=True)
    model = train_kenlm(_reference_texts(shards, cfg, thresholds), folder, cfg)
    with open(folder / "reference.txt", "rb") as f:
        lines = sum(1 for _ in f)
    (folder / "reference.txt").unlink()  # normalised copies of corpus rows: not an artifact
    info = {"reference_rows": lines, "kenlm_order": cfg.order,
            "kenlm_bytes": model.stat().st_size}
    write_json_atomic(marker, info)
    ctx.log(f"KenLM order {cfg.order} trained on {lines} reference rows")
    return model, info


# --- 3. cuts and the report -------------------------------------------------------------

def _cuts(scored: list[str], cfg) -> tuple[dict, np.ndarray]:
    columns = ["ppl", "domain"] if cfg.per_domain else ["ppl"]
    table = _columns(scored, columns)
    cuts = quantile_cuts(table, cfg)
    return cuts, table.column("ppl").to_numpy(zero_copy_only=False)


def cuts_table(cuts: dict) -> dict:
    names = [f"{a}/{b}" for a, b in zip(DIFFICULTIES, DIFFICULTIES[1:])]
    rows = [[d] + [round(c, 3) for c in cuts[d]] for d in [GLOBAL] + [d for d in DOMAINS if d in cuts]]
    return {"columns": ["domain"] + [f"cut {n}" for n in names], "rows": rows}


def difficulty_by_domain(stats: list[dict]) -> dict:
    cells = Counter()
    for s in stats:
        for key, n in s["counters"].items():
            if key.startswith("cell:"):
                _, domain, level = key.split(":")
                cells[domain, level] += n
    domains = [d for d in DOMAINS if any(cells[d, lvl] for lvl in DIFFICULTIES)]
    domains += sorted({d for d, _ in cells} - set(DOMAINS))  # GLOBAL when untagged
    rows = [[d] + [cells[d, lvl] for lvl in DIFFICULTIES] + [sum(cells[d, lvl] for lvl in DIFFICULTIES)]
            for d in domains]
    rows.append(["total"] + [sum(r[i + 1] for r in rows) for i in range(len(DIFFICULTIES) + 1)])
    return {"columns": ["domain", *DIFFICULTIES, "total"], "rows": rows}


def ppl_histogram(ppl: np.ndarray, step: float = 0.25) -> dict:
    """Counts per bin of log10(perplexity); unscorable rows (inf) get their own bin."""
    finite = ppl[np.isfinite(ppl)]
    rows = []
    if len(finite):
        logs = np.log10(np.maximum(finite, 1.0))
        lo, hi = math.floor(logs.min() / step) * step, math.floor(logs.max() / step) * step + step
        edges = np.arange(lo, hi + step / 2, step)
        counts, _ = np.histogram(logs, bins=edges)
        rows = [[f"{a:.2f}-{b:.2f}", int(n)] for a, b, n in zip(edges, edges[1:], counts)]
    if len(finite) < len(ppl):
        rows.append(["inf", int(len(ppl) - len(finite))])
    return {"columns": ["log10 ppl", "rows"], "rows": rows}


def _publish_model(ctx: StageContext, model: Path, cuts: dict) -> None:
    out = ctx.out / "model"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(model, out / "kenlm.binary")
    write_json_atomic(out / "cuts.json", {d: list(c) for d, c in cuts.items()})


def run(ctx: StageContext) -> dict:
    cfg = ctx.section
    shards = input_shards(ctx, "domains")
    model, info = _kenlm_model(ctx, shards)
    items = [{"index": i, "path": p} for i, p in enumerate(shards)]
    map_shards(ctx, ScoreStep, {"model": str(model)}, items, ctx.work / "scored")
    scored = [str(ctx.work / "scored" / "data" / f"part-{i:05d}.parquet") for i in range(len(shards))]
    cuts, ppl = _cuts(scored, cfg)
    items = [{"index": i, "path": p} for i, p in enumerate(scored)]
    stats = map_shards(ctx, GradeStep, {"cuts": cuts, "max_ppl": cfg.max_ppl}, items,
                       ctx.work / "shards", actors=False)
    metrics = shard_funnel("difficulty", stats, ctx.work / "shards", cfg.max_reject_fraction)
    metrics.update(info)
    finite = ppl[np.isfinite(ppl)]
    metrics["ppl_median"] = round(float(np.median(finite)), 3) if len(finite) else None
    metrics["tables"] = {"difficulty x domain": difficulty_by_domain(stats),
                         "perplexity histogram": ppl_histogram(ppl),
                         "quantile cuts": cuts_table(cuts)}
    report_tables(ctx, metrics["tables"], bars={"perplexity histogram": ("log10 ppl", "rows")})
    _publish_model(ctx, model, cuts)
    publish_shards(ctx.work / "shards", ctx.out)
    return metrics


register(Stage("difficulty", ("domains",), run,
               summary="KenLM perplexity -> basic/advanced/expert per domain"))
