"""Dedup's per-part functions, without Ray: composed in process over a few shards they
give exactly the removals of dedup_table (cluster/dedup.py runs the same on Ray tasks)."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from data_engine.dedup import DedupConfig, dedup_table
from data_engine.dedup_minhash import signature_batch
from data_engine.dedup_parts import (
    PAIR_SCHEMA, REMOVAL_SCHEMA, bucket_part, cluster_parts, concat_or_empty, drop_exact_copies,
    exact_members, key_rows, member_sigs, part_lookup, resolve_part, split_by_part, split_pairs,
)
from data_engine.generators.dedup_corpus import make_jaccard_corpus
from data_engine.schema import RECORD_SCHEMA


def _records(rows: dict[str, str]) -> pa.Table:
    return pa.table({"id": list(rows), "text": list(rows.values()), "source": ["t"] * len(rows),
                     "meta": ["{}"] * len(rows)}, schema=RECORD_SCHEMA)


def _removed(table: pa.Table) -> dict[str, tuple]:
    return {r["id"]: (r["reason"], r["duplicate_of"], round(r["jaccard"], 9))
            for r in table.to_pylist()}


def _corpus() -> pa.Table:
    """Controlled near-duplicate pairs, loners, and cosmetic copies under ids that sort last."""
    table, _ = make_jaccard_corpus(60, seed=3, n_singletons=30)
    copies = table.slice(0, 12)
    texts = [t.upper().replace(". ", ".\n") for t in copies.column("text").to_pylist()]
    copies = pa.table({"id": [f"zcopy{i:02d}" for i in range(12)], "text": texts,
                       "source": copies.column("source"), "meta": copies.column("meta")},
                      schema=RECORD_SCHEMA)
    return pa.concat_tables([table, copies])


def test_exact_copies_leave_the_near_buckets_before_pairing():
    cfg = DedupConfig(keep="longest")
    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    table = _records({"a": text, "b": text.upper() + "!!", "c": text + " lambda"})
    shard = pa.array([0, 0, 0], pa.int32())
    rows = key_rows(table, cfg, shard, parts=1)
    assert rows.num_rows == 3 * (1 + cfg.bands)
    near = drop_exact_copies(rows.filter(pa.compute.greater_equal(rows.column("band"), 0)), cfg)
    assert "a" not in set(near.column("id").to_pylist())  # b is longer: b survives the exact pass
    pairs = bucket_part(rows, cfg).to_pylist()
    assert {"a": "b", "b": "a", "shard": 0, "exact": True} in pairs
    assert all(p["a"] != "a" and p["b"] != "a" for p in pairs if not p["exact"])


def _by_part(rows: pa.Table) -> list[pa.Table]:
    parts = rows.column("part")
    return [rows.filter(pc.equal(parts, p)) for p in pc.unique(parts).to_pylist()]


def _removals_in_process(shards: list[pa.Table], cfg: DedupConfig, parts: int) -> pa.Table:
    """The bucket and cluster passes of cluster/dedup.py, with a loop for each shuffle."""
    shard_cols = [pa.array([i] * t.num_rows, pa.int32()) for i, t in enumerate(shards)]
    rows = pa.concat_tables([key_rows(t, cfg, s, parts) for t, s in zip(shards, shard_cols)])
    pairs = concat_or_empty([bucket_part(g, cfg) for g in _by_part(rows)], PAIR_SCHEMA)
    exact, candidates = split_pairs(pairs)
    if not candidates.num_rows:
        return exact
    part_of, edges = cluster_parts(candidates, parts)
    lookup, slices = part_lookup(part_of), split_by_part(edges, parts)
    members = pa.concat_tables([exact_members(member_sigs(signature_batch(t, cfg), i, lookup), t, cfg)
                                for i, t in enumerate(shards)])
    near = [resolve_part(g.drop_columns(["part"]),
                         slices[g.column("part")[0].as_py()].drop_columns(["part"]), cfg)
            for g in _by_part(members)]
    return pa.concat_tables([exact, concat_or_empty(near, REMOVAL_SCHEMA)])


@pytest.mark.parametrize("cfg", [DedupConfig(), DedupConfig(keep="longest", exact=False),
                                 DedupConfig(jaccard="estimated")],
                         ids=["default", "longest-near-only", "estimated"])
def test_parts_composed_in_process_equal_dedup_table(cfg):
    table = _corpus()
    assert table.schema == RECORD_SCHEMA
    shards = [table.slice(i * 40, 40) for i in range(-(-table.num_rows // 40))]
    _, expected = dedup_table(table, cfg)
    removed = _removals_in_process(shards, cfg, parts=3)
    assert _removed(removed) == _removed(expected) and removed.num_rows > 0
    where = {rid: i for i, s in enumerate(shards) for rid in s.column("id").to_pylist()}
    assert all(where[r["id"]] == r["shard"] for r in removed.to_pylist())
