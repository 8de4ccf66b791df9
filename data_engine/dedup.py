"""Exact and MinHash-LSH near-duplicate removal, as batch functions: the config, the
in-process executor and apply_removals.

The batch functions map pyarrow Tables to pyarrow Tables and know nothing of where
they run, so an executor can compose them (``cfg`` is a ``DedupConfig``). They live
by concern: data_engine/dedup_minhash.py (normalising, shingling, signatures, LSH
bands, candidate and verified edges), data_engine/dedup_survivors.py (components
and the survivor of each group), and this module:

  in process  ``dedup_table`` (tests, small local runs): the exact pass, then the near
              pass on what it kept, each ending in apply_removals -> (kept, rejected)
      exact:  exact_keys -> choose_survivors(group_col="exact_hash", reason="exact_duplicate")
      near:   signature_batch -> band_rows -> bucket_edges -> with_shingles (exact Jaccard)
              -> verify_edges
              -> connected_components -> attach_roots -> choose_survivors
  sharded     data_engine/dedup_parts.py composes the same functions into per-part
              steps (both passes at once, a corpus split into shards and parts);
              cluster/dedup.py schedules those on Ray tasks; per shard apply_removals.

Band rows carry ids, not signatures: a signature is num_perm*4 bytes and a
doc has one row per band, so shuffling signatures with the bands would move
bands*num_perm*4 bytes per doc. Only candidate endpoints need signatures.
"""
from __future__ import annotations

import json
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from data_engine.dedup_minhash import (
    band_rows, bucket_edges, endpoints, exact_keys, optimal_bands, signature_batch, verify_edges,
    with_shingles,
)
from data_engine.dedup_survivors import attach_roots, choose_survivors, connected_components
from data_engine.schema import REJECT_SCHEMA, Strict

DEDUP_REJECT_SCHEMA = REJECT_SCHEMA.append(pa.field("duplicate_of", pa.string())).append(
    pa.field("jaccard", pa.float64()))


class DedupConfig(Strict):
    """Dedup settings. ``bands``/``rows`` are derived from ``threshold`` when not given."""
    num_perm: int = Field(128, ge=2, le=1024, description="MinHash permutations per signature")
    # Verified pairs need a Jaccard >= threshold. Estimated, at 0.7 and 128
    # permutations a pair at true J=0.8 passes with p~0.997 and one at J=0.5
    # with p~2e-6, which puts the targets (recall >= 0.95 at J >= 0.8,
    # < 2% of removals below J=0.5) well inside the margins.
    threshold: float = Field(0.7, gt=0.0, le=1.0, description=(
        "the Jaccard level: LSH is tuned to it, verification cuts at it"))
    bands: int | None = Field(None, ge=1, description="LSH bands; None: derived from threshold")
    rows: int | None = Field(None, ge=1, description="LSH rows per band; with bands, or neither")
    # (false-positive, false-negative) weights of the band/row optimisation.
    # With verify on, LSH false positives only cost a comparison, so the
    # default leans on recall; without it, they become false removals.
    lsh_weights: tuple[float, float] | None = Field(None, description=(
        "(false-positive, false-negative) weights; None: (0.1, 0.9) verified"))
    ngram: int = Field(5, ge=1, description="shingles are word n-grams of this length")
    seed: int = Field(1, description="MinHash permutation seed")
    keep: Literal["first_id", "longest", "shortest"] = Field("first_id", description=(
        "survivor of a cluster: the smallest id, or the longest/shortest text"))
    verify: bool = Field(True, description=(
        "candidates and removals need Jaccard >= threshold (to the survivor too)"))
    # Exact: the candidates' word n-gram sets are recomputed from their texts (only theirs) and
    # compared; the MinHash estimate from 128 permutations has a standard error of ~0.04 near
    # 0.7, so "estimated" removes pairs a little below the threshold and misses some above it.
    jaccard: Literal["exact", "estimated"] = Field("exact", description=(
        "how verification and the reported jaccard measure a pair: exact word n-gram "
        "Jaccard of the candidates, or the MinHash estimate"))
    # Buckets up to this size link all pairs; larger ones link a star to the
    # min id, which keeps edges linear in bucket size.
    all_pairs_max: int = Field(8, ge=2, description="bucket size up to which all pairs are linked")
    exact: bool = Field(True, description="the exact pass (hash of the normalised text)")
    near: bool = Field(True, description="the MinHash-LSH near-duplicate pass")
    lowercase: bool = Field(True, description="normalisation before hashing and shingling")
    strip_punctuation: bool = Field(True, description=(
        "punctuation becomes spaces; operators (+ - = ...) stay as tokens"))
    unicode_nfkc: bool = Field(True, description="NFKC-normalise before hashing and shingling")
    # Error budget of the dedup stage: more removed than this fraction of the
    # input fails it (a corpus that is mostly copies is usually a broken input).

    @model_validator(mode="after")
    def _resolve_bands(self):
        if (self.bands is None) != (self.rows is None):
            raise ValueError("dedup.bands and dedup.rows must be given together (or neither)")
        if self.bands is not None:
            if self.bands * self.rows > self.num_perm:
                raise ValueError(f"dedup.bands * dedup.rows = {self.bands * self.rows} "
                                 f"exceeds dedup.num_perm = {self.num_perm}")
            return self
        weights = self.lsh_weights or ((0.1, 0.9) if self.verify else (0.5, 0.5))
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"dedup.lsh_weights must be non-negative, got {weights}")
        self.bands, self.rows = optimal_bands(self.threshold, self.num_perm, *weights)
        return self


# --- survivors' removals -> kept and rejected rows ------------------------------------

def apply_removals(batch: pa.Table, removed: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Split records into (kept, rejected); rejected follows DEDUP_REJECT_SCHEMA."""
    pos = pc.index_in(batch.column("id"), value_set=removed.column("id"))
    hit = pc.is_valid(pos)
    kept = batch.filter(pc.invert(hit))
    rows = batch.filter(hit)
    info = removed.take(pc.filter(pos, hit))
    dups, jacs = info.column("duplicate_of").to_pylist(), info.column("jaccard").to_pylist()
    detail = [json.dumps({"duplicate_of": d, "jaccard": round(j, 6)}, sort_keys=True)
              for d, j in zip(dups, jacs)]
    source = rows.column("source") if "source" in rows.column_names \
        else pa.nulls(rows.num_rows, pa.string())
    rejected = pa.table({
        "id": rows.column("id"), "text": rows.column("text"), "source": source,
        "reason": info.column("reason"), "detail": pa.array(detail, pa.string()),
        "duplicate_of": info.column("duplicate_of"), "jaccard": info.column("jaccard"),
    }, schema=DEDUP_REJECT_SCHEMA)
    return kept, rejected


# --- the in-process executor ------------------------------------------------------

def exact_removals(table: pa.Table, cfg: DedupConfig) -> pa.Table:
    return choose_survivors(exact_keys(table, cfg), cfg, group_col="exact_hash",
                            reason="exact_duplicate")


def near_removals(table: pa.Table, cfg: DedupConfig) -> pa.Table:
    sigs = signature_batch(table, cfg)
    candidates = bucket_edges(band_rows(sigs, cfg), cfg)
    on_edge = sigs.filter(pc.is_in(sigs.column("id"), value_set=endpoints(candidates)))
    members = with_shingles(on_edge, table, cfg)  # the candidates' shingles, for exact Jaccard
    components = connected_components(verify_edges(candidates, members, cfg))
    return choose_survivors(attach_roots(members, components), cfg)


def dedup_table(table: pa.Table, cfg: DedupConfig | None = None) -> tuple[pa.Table, pa.Table]:
    """Exact then near dedup of one in-memory table: (kept, rejected).

    The reference executor for tests and small local runs. A row removed as an
    exact duplicate names the exact pass's survivor in duplicate_of, even if
    that survivor is removed by the near pass afterwards.
    """
    cfg = cfg or DedupConfig()
    ids = table.column("id")
    if ids.null_count:
        row = pc.index(pc.is_null(ids), True).as_py()
        raise ValueError(f"dedup needs a unique, non-null `id` column: row {row} has none")
    if pc.count_distinct(ids).as_py() != table.num_rows:
        counts = pc.value_counts(ids)
        repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
        raise ValueError("dedup needs a unique, non-null `id` column: repeated "
                         f"{repeated.slice(0, 5).to_pylist()} ({len(repeated)} ids in all)")
    kept, rejected = table, DEDUP_REJECT_SCHEMA.empty_table()
    if cfg.exact:
        kept, rej = apply_removals(kept, exact_removals(kept, cfg))
        rejected = pa.concat_tables([rejected, rej])
    if cfg.near and kept.num_rows > 1:
        kept, rej = apply_removals(kept, near_removals(kept, cfg))
        rejected = pa.concat_tables([rejected, rej])
    return kept, rejected
