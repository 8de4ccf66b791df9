"""`difficulty`: KenLM perplexity per row, cut per domain into basic/advanced/expert.

  1. driver   the reference subset (data_engine/difficulty.py: by default each
              domain's top rows by domain_score) and each row's fold (a hash of
              its id); per fold k, KenLM's own estimator (lmplz, build_binary)
              trains on the reference rows outside fold k, streamed from the shards
  2. workers  every row's perplexity from its fold's model (CrossFitScorer; each
              actor loads all fold models), so no row is scored by a model that saw it
  3. driver   per-domain quantile cuts from the (domain, ppl) columns
  4. workers  each row's level from the cuts

Writes data/part-*.parquet with ppl and difficulty added, rejected/ (empty
unless max_ppl is set), and model/kenlm-fold<k>.binary (one per fold) +
model/cuts.json, the artifacts that grade new text the same way
(CrossFitScorer over the fold models in fold order, then assign_difficulty).
Step 1 keeps each finished fold model across a crash, steps 2 and 4 their
finished shards. Metrics: the funnel, reference rows per fold, the cuts, a
difficulty x domain table and a perplexity histogram.

Fault points (R1PIPE_FAULT, for tests): difficulty:kenlm:<k> once fold k's
model is saved, difficulty:score:after_write:<n>, difficulty:grade:after_write:<n>.

    scripts/build_kenlm.sh        # once: lmplz and build_binary into the venv
    r1pipe run recipes/demo.yaml --stages difficulty
"""
from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cluster import storage
from cluster.sharded import maybe_fault, shard_name
from data_engine.difficulty import (
    GLOBAL, REFERENCE_COLUMNS, CrossFitScorer, assign_difficulty, check_folds, cuts_table, difficulty_by_domain,
    fold_training_texts, ppl_histogram, quantile_cuts, reference_per_fold, train_kenlm,
)
from data_engine.schema import REJECT_SCHEMA, ShardResult, reject_table
from pipelines.graph import Stage, StageContext, register
from pipelines.stages.common import (
    input_shards, map_shards, publish_shards, report_tables, shard_funnel,
)
from pipelines.store import write_json_atomic


class ScoreStep:
    """A run_sharded step: adds ``ppl`` to one shard, each row from its fold's model."""

    def __init__(self, models: list[str]):
        self.scorer = CrossFitScorer(models)

    def __call__(self, table: pa.Table) -> ShardResult:
        return ShardResult(self.scorer(table), REJECT_SCHEMA.empty_table(), {})


class GradeStep:
    """A run_sharded step: adds ``difficulty`` from the cuts; rows above max_ppl are rejected."""

    def __init__(self, cuts: dict, max_ppl: float | None):
        self.cuts = {d: tuple(c) for d, c in cuts.items()}
        self.max_ppl = max_ppl

    def __call__(self, scored: pa.Table) -> ShardResult:  # the input shard with ``ppl``
        graded = assign_difficulty(scored, self.cuts)
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
        return ShardResult(kept, rejected, dict(counters))


# --- 1. the KenLM models, one per fold ---------------------------------------------------

def _columns(shards: list[str], columns: list[str]) -> pa.Table:
    tables = [pq.read_table(p, columns=columns) for p in shards]
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})


def _present(path: str, wanted: list[str]) -> list[str]:
    names = pq.read_schema(path).names
    return [c for c in wanted if c in names]


def _reference(shards: list[str], cfg) -> tuple[dict | None, list[int]]:
    """reference_per_fold over the small columns of the whole corpus."""
    return reference_per_fold(_columns(shards, _present(shards[0], REFERENCE_COLUMNS) if shards else ["id"]), cfg)


def _training_texts(shards: list[str], cfg, fold: int, thresholds) -> Iterator[str]:
    """Stream fold ``fold``'s training rows shard by shard: the subset never sits in memory whole."""
    for path in shards:
        table = pq.read_table(path, columns=_present(path, ["text", *REFERENCE_COLUMNS]))
        yield from fold_training_texts(table, cfg, fold, thresholds)


def _fold_models(ctx: StageContext, shards: list[str], thresholds, per_fold: list[int]
                 ) -> tuple[list[Path], list[dict]]:
    """Model k in .work/kenlm/fold<k>/, complete once fold<k>.json exists: the marker
    is written after build_binary, so a restart reuses finished folds and retrains
    a fold that crashed half-way."""
    check_folds(per_fold, ctx.section)
    models, infos = [], []
    for fold in range(ctx.section.folds):
        folder, marker = ctx.work / "kenlm" / f"fold{fold}", ctx.work / "kenlm" / f"fold{fold}.json"
        if marker.exists():
            ctx.log(f"KenLM fold {fold}: model cached from an earlier attempt")
        else:
            info = _train_fold(ctx, shards, fold, thresholds, folder)
            storage.push(folder)  # object storage: the model goes up before the marker vouching for it
            write_json_atomic(marker, info)
            storage.push(marker)
            maybe_fault(f"{ctx.name}:kenlm:{fold}", ctx.fault)
        models.append(folder / "model.binary")
        infos.append(json.loads(marker.read_text()))
    return models, infos


def _train_fold(ctx: StageContext, shards: list[str], fold: int, thresholds, folder: Path) -> dict:
    cfg = ctx.section
    shutil.rmtree(folder, ignore_errors=True)  # what a crashed attempt left of this fold
    model = train_kenlm(_training_texts(shards, cfg, fold, thresholds), folder, cfg)
    with open(folder / "reference.txt", "rb") as f:
        lines = sum(1 for _ in f)
    (folder / "reference.txt").unlink()  # normalised copies of corpus rows: not an artifact
    with open(model, "rb") as f:
        os.fsync(f.fileno())  # on disk before the fold's marker vouches for it
    ctx.log(f"KenLM fold {fold}: order {cfg.order} trained on {lines} reference rows of other folds")
    return {"train_rows": lines, "kenlm_bytes": model.stat().st_size}


# --- 3. cuts and the report -------------------------------------------------------------

def _cuts(scored: list[str], cfg) -> tuple[dict, np.ndarray]:
    columns = ["ppl", "domain"] if cfg.per_domain else ["ppl"]
    table = _columns(scored, columns)
    cuts = quantile_cuts(table, cfg)
    return cuts, table.column("ppl").to_numpy(zero_copy_only=False)


def _cells(stats: list[dict]) -> Counter:
    """Rows per (domain, level), from the grade step's ``cell:<domain>:<level>`` counters."""
    cells = Counter()
    for s in stats:
        for key, n in s["counters"].items():
            if key.startswith("cell:"):
                _, domain, level = key.split(":")
                cells[domain, level] += n
    return cells


def _publish_model(ctx: StageContext, models: list[Path], cuts: dict) -> None:
    out = ctx.out / "model"
    out.mkdir(parents=True, exist_ok=True)
    for fold, model in enumerate(models):
        shutil.copy2(model, out / f"kenlm-fold{fold}.binary")
    write_json_atomic(out / "cuts.json", {d: list(c) for d, c in cuts.items()})


def run(ctx: StageContext) -> dict:
    cfg = ctx.section
    shards = input_shards(ctx, "domains")
    thresholds, per_fold = _reference(shards, cfg)
    models, infos = _fold_models(ctx, shards, thresholds, per_fold)
    items = [{"index": i, "path": p} for i, p in enumerate(shards)]
    scoring = map_shards(ctx, ScoreStep, {"models": [str(m) for m in models]}, items,
                         ctx.work / "scored", fault_name=f"{ctx.name}:score")
    scored = [str(ctx.work / "scored" / "data" / f"{shard_name(i)}.parquet") for i in range(len(shards))]
    cuts, ppl = _cuts(scored, cfg)
    items = [{"index": i, "path": p, "scored": s} for i, (p, s) in enumerate(zip(shards, scored))]
    stats = map_shards(ctx, GradeStep, {"cuts": cuts, "max_ppl": cfg.max_ppl}, items,
                       ctx.work / "shards", actors=False, fault_name=f"{ctx.name}:grade",
                       inputs=("scored",))
    metrics = shard_funnel("difficulty", stats, ctx.work / "shards", cfg.max_reject_fraction)
    metrics.update(reference_rows=sum(per_fold), reference_rows_per_fold=per_fold,
                   kenlm_train_rows_per_fold=[i["train_rows"] for i in infos], kenlm_order=cfg.order,
                   kenlm_bytes=sum(i["kenlm_bytes"] for i in infos),
                   scored_shards_reused=sum(s["reused"] for s in scoring))
    finite = ppl[np.isfinite(ppl)]
    metrics["ppl_median"] = round(float(np.median(finite)), 3) if len(finite) else None
    metrics["tables"] = {"difficulty x domain": difficulty_by_domain(_cells(stats)),
                         "perplexity histogram": ppl_histogram(ppl),
                         "quantile cuts": cuts_table(cuts)}
    report_tables(ctx, metrics["tables"], bars={"perplexity histogram": ("log10 ppl", "rows")})
    _publish_model(ctx, models, cuts)
    publish_shards(ctx.work / "shards", ctx.out)
    return metrics


register(Stage("difficulty", ("domains",), run))
