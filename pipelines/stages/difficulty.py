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

from cluster.data import maybe_fault, shard_name
from data_engine.difficulty import (
    GLOBAL, CrossFitScorer, assign_difficulty, domain_score_thresholds, fold_training_mask,
    quantile_cuts, reference_mask, row_folds, train_kenlm,
)
from data_engine.schema import DIFFICULTIES, DOMAINS, REJECT_SCHEMA, ShardResult, reject_table
from pipelines.graph import Stage, StageContext, register
from pipelines.stages.common import (
    input_shards, map_shards, publish_shards, report_tables, shard_funnel,
)
from pipelines.store import write_json_atomic

REFERENCE_COLUMNS = ["id", "source", "domain", "domain_score"]  # what picks the reference


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
    """The top_domain_score thresholds (None for the other references) and the
    number of reference rows in each fold, from the small columns of the whole corpus."""
    table = _columns(shards, _present(shards[0], REFERENCE_COLUMNS) if shards else ["id"])
    thresholds = domain_score_thresholds(table, cfg) if cfg.reference == "top_domain_score" else None
    in_reference = reference_mask(table, cfg, thresholds)
    folds = row_folds(table.column("id").to_pylist(), cfg.folds)
    return thresholds, np.bincount(folds[in_reference], minlength=cfg.folds).tolist()


def _training_texts(shards: list[str], cfg, fold: int, thresholds) -> Iterator[str]:
    """Stream fold ``fold``'s training rows shard by shard: the subset never sits in memory whole."""
    for path in shards:
        table = pq.read_table(path, columns=_present(path, ["text", *REFERENCE_COLUMNS]))
        mask = fold_training_mask(table, cfg, fold, thresholds)
        yield from table.column("text").filter(pa.array(mask)).to_pylist()


def _fold_models(ctx: StageContext, shards: list[str], thresholds, per_fold: list[int]
                 ) -> tuple[list[Path], list[dict]]:
    """Model k in .work/kenlm/fold<k>/, complete once fold<k>.json exists: the marker
    is written after build_binary, so a restart reuses finished folds and retrains
    a fold that crashed half-way."""
    if not sum(per_fold):
        raise ValueError(
            f"difficulty: the reference is empty (difficulty.reference={ctx.section.reference!r}); "
            f"check difficulty.reference_sources against the rows' `source` values, or "
            f"difficulty.reference_fraction")
    for fold, n in enumerate(per_fold):
        if n == sum(per_fold):
            raise ValueError(f"difficulty: all {n} reference rows fall in fold {fold}, so its model "
                             f"has nothing to train on; lower difficulty.folds or raise "
                             f"difficulty.reference_fraction")
    models, infos = [], []
    for fold in range(ctx.section.folds):
        folder, marker = ctx.work / "kenlm" / f"fold{fold}", ctx.work / "kenlm" / f"fold{fold}.json"
        if marker.exists():
            ctx.log(f"KenLM fold {fold}: model cached from an earlier attempt")
        else:
            write_json_atomic(marker, _train_fold(ctx, shards, fold, thresholds, folder))
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
    metrics["tables"] = {"difficulty x domain": difficulty_by_domain(stats),
                         "perplexity histogram": ppl_histogram(ppl),
                         "quantile cuts": cuts_table(cuts)}
    report_tables(ctx, metrics["tables"], bars={"perplexity histogram": ("log10 ppl", "rows")})
    _publish_model(ctx, models, cuts)
    publish_shards(ctx.work / "shards", ctx.out)
    return metrics


register(Stage("difficulty", ("domains",), run))
