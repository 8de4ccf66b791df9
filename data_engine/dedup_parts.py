"""Dedup's per-part algorithms for a sharded corpus: pure Arrow, no I/O, no Ray.

cluster/dedup.py schedules them on Ray tasks (its docstring has the passes in full);
each function here maps tables to tables, so it is tested on tiny inputs. N docs,
B bands, P parts:

  bucket pass   key_rows (per shard: one exact row and B band rows per doc, each
                with ``part`` = a hash of (band, key) mod P) -> split_by_part ->
                bucket_part (exact groups -> exact removals; LSH buckets, exact
                copies dropped -> candidate pairs) -> split_pairs (driver)
  cluster pass  cluster_parts (driver: each candidate component to one part) ->
                member_sigs (per shard: the signatures of docs on an edge) -> exact_members
                (with exact Jaccard: their shingle sets instead, from their texts) ->
                split_by_part -> resolve_part (verify, components, survivors)

A part, not a (band, key) bucket, is the unit of a reduce task: almost every LSH bucket is a
singleton, and a task (or a Python call) per bucket would cost more than the bucket's work. Every bucket
lies wholly in one part, and one vectorised sort splits a part into its buckets.

Removals equal those of ``data_engine.dedup.dedup_table``: a near bucket holds
every copy of an exact group (equal text, equal signature), so dropping the
non-survivors there gives the buckets of the exact pass's survivors.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_engine.dedup import DedupConfig
from data_engine.dedup_minhash import (
    SHINGLES_TYPE, band_rows, bucket_edges, exact_keys, normalized_texts, signature_batch,
    verify_edges, with_shingles,
)
from data_engine.dedup_survivors import (
    KEEP_ORDER, REMOVED_SCHEMA, attach_roots, choose_survivors, component_labels,
    connected_components,
)

REMOVAL_SCHEMA = REMOVED_SCHEMA.append(pa.field("shard", pa.int32()))
# Bucket-pass output: exact=True rows say "b is an exact copy of a, b lives in
# shard"; exact=False rows are unverified candidate pairs a < b.
PAIR_SCHEMA = pa.schema([("a", pa.string()), ("b", pa.string()), ("shard", pa.int32()),
                         ("exact", pa.bool_())])
KEY_ROW_SCHEMA = pa.schema([("part", pa.int32()), ("band", pa.int32()), ("key", pa.int64()),
                            ("exact", pa.binary(16)), ("n_chars", pa.int64()),
                            ("id", pa.string()), ("shard", pa.int32())])
SIG_SCHEMA = pa.schema([("id", pa.string()), ("sig", pa.list_(pa.uint32())),
                        ("n_chars", pa.int64())])
MEMBER_SCHEMA = pa.schema([("id", pa.string()), ("sig", pa.list_(pa.uint32())),
                           ("n_chars", pa.int64()), ("part", pa.int32()), ("shard", pa.int32())])
# With exact Jaccard the shingle sets replace the signatures, which nothing after reads.
EXACT_MEMBER_SCHEMA = pa.schema([("id", pa.string()), ("n_chars", pa.int64()), ("part", pa.int32()),
                                 ("shard", pa.int32()), ("shingles", SHINGLES_TYPE)])
_MIX = np.uint64(0x9E3779B97F4A7C15)


def concat_or_empty(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    return pa.concat_tables(tables) if tables else schema.empty_table()


# --- bucket pass: exact groups and LSH buckets ----------------------------------------

def key_rows(batch: pa.Table, cfg: DedupConfig, shard: pa.Array, parts: int,
             sigs: pa.Table | None = None, normalized: list[str] | None = None) -> pa.Table:
    """KEY_ROW_SCHEMA rows of one batch of records: an exact row and B band rows per doc.
    ``sigs`` (signature_batch of the batch) and ``normalized`` are computed here when not given."""
    normalized = normalized if normalized is not None else normalized_texts(batch, cfg)
    keys = exact_keys(batch, cfg, normalized)
    exact = pa.array([bytes.fromhex(h) for h in keys.column("exact_hash").to_pylist()],
                     pa.binary(16))
    n_chars = keys.column("n_chars")
    out = []
    if cfg.exact:
        first8 = _exact_words(exact)[:, 0].view(np.int64)
        out.append(_key_table(np.full(len(first8), -1, np.int32), first8, exact, n_chars,
                              batch.column("id"), shard, parts))
    if cfg.near:
        bands = band_rows(sigs if sigs is not None else signature_batch(batch, cfg, normalized), cfg)
        pos = pc.index_in(bands.column("id"), value_set=batch.column("id"))
        out.append(_key_table(bands.column("band").to_numpy(), bands.column("key").to_numpy(),
                              exact.take(pos), pc.take(n_chars, pos), bands.column("id"),
                              shard.take(pos), parts))
    return pa.concat_tables(out) if out else KEY_ROW_SCHEMA.empty_table()


def _key_table(band, key, exact, n_chars, ids, shard, parts: int) -> pa.Table:
    mixed = key.astype(np.int64).view(np.uint64) ^ (band.astype(np.uint64) * _MIX)
    part = (mixed % np.uint64(parts)).astype(np.int32)
    return pa.table([pa.array(part), pa.array(band, pa.int32()), pa.array(key, pa.int64()),
                     exact, n_chars, ids, shard], schema=KEY_ROW_SCHEMA)


def drop_exact_copies(rows: pa.Table, cfg: DedupConfig) -> pa.Table:
    """Within each (band, key) bucket keep one doc per exact group: its survivor."""
    order = [("band", "ascending"), ("key", "ascending"), ("exact", "ascending")] \
        + KEEP_ORDER[cfg.keep] + [("id", "ascending")]
    rows = rows.sort_by(order)
    band, key = rows.column("band").to_numpy(), rows.column("key").to_numpy()
    exact = _exact_words(rows.column("exact"))
    if not len(band):
        return rows
    changed = (band[1:] != band[:-1]) | (key[1:] != key[:-1]) | (exact[1:] != exact[:-1]).any(axis=1)
    return rows.filter(pa.array(np.r_[True, changed]))


def _exact_words(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """fixed_size_binary(16) without nulls -> (N, 2) uint64, zero-copy, for vectorised compares."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(arr) == 0:
        return np.zeros((0, 2), np.uint64)
    data = np.frombuffer(arr.buffers()[1], np.uint8)[16 * arr.offset:16 * (arr.offset + len(arr))]
    return data.view(np.uint64).reshape(-1, 2)


def bucket_part(rows: pa.Table, cfg: DedupConfig) -> pa.Table:
    """PAIR_SCHEMA rows of one part: exact removals, then candidate pairs."""
    is_exact = pc.equal(rows.column("band"), -1)
    exact_rows, near_rows = rows.filter(is_exact), rows.filter(pc.invert(is_exact))
    out = []
    if exact_rows.num_rows:
        removed = choose_survivors(exact_rows, cfg, group_col="exact", reason="exact_duplicate")
        pos = pc.index_in(removed.column("id"), value_set=exact_rows.column("id"))
        out.append(pa.table([removed.column("duplicate_of"), removed.column("id"),
                             pc.take(exact_rows.column("shard"), pos),
                             pa.array([True] * removed.num_rows)], schema=PAIR_SCHEMA))
    if near_rows.num_rows:
        if cfg.exact:
            near_rows = drop_exact_copies(near_rows, cfg)
        edges = bucket_edges(near_rows, cfg)
        n = edges.num_rows
        out.append(pa.table([edges.column("a"), edges.column("b"), pa.nulls(n, pa.int32()),
                             pa.array([False] * n)], schema=PAIR_SCHEMA))
    return pa.concat_tables(out) if out else PAIR_SCHEMA.empty_table()


def split_pairs(pairs: pa.Table) -> tuple[pa.Table, pa.Table]:
    """bucket_part's rows of every part -> (REMOVAL_SCHEMA exact removals, unique candidate
    pairs Table(a, b))."""
    is_exact = pairs.column("exact")
    exact = pairs.filter(is_exact)
    candidates = pairs.filter(pc.invert(is_exact)).select(["a", "b"])
    # The same pair collides in several bands (in other parts): count it once.
    candidates = candidates.group_by(["a", "b"]).aggregate([])
    removed = pa.table([exact.column("b"), pa.array(["exact_duplicate"] * exact.num_rows),
                        exact.column("a"), pa.array(np.ones(exact.num_rows)),
                        exact.column("shard")], schema=REMOVAL_SCHEMA)
    return removed, candidates


# --- cluster pass: verify candidates, components, survivors ---------------------------

def cluster_parts(candidates: pa.Table, n_parts: int) -> tuple[pa.Table, pa.Table]:
    """Candidate components -> (Table(id, part) of every doc on an edge, edges with their
    part, sorted by part). A component lies in one part; which one only spreads the load."""
    labels = component_labels(candidates)  # the roots are found per part, on the workers
    part = pa.array(labels.column("label").to_numpy() % n_parts, pa.int32())
    part_of = pa.table({"id": labels.column("id"), "part": part})
    edge_part = pc.take(part, pc.index_in(candidates.column("a").cast(pa.large_string()),
                                          value_set=part_of.column("id")))
    edges = candidates.select(["a", "b"]).append_column("part", edge_part)
    return part_of, edges.sort_by([("part", "ascending")])


def member_sigs(sigs: pa.Table, shard: int, part_of: dict[str, int]) -> pa.Table:
    """MEMBER_SCHEMA rows: the signatures of a shard's docs that lie on a candidate edge."""
    parts = [part_of.get(i, -1) for i in sigs.column("id").to_pylist()]
    mask = pa.array([p >= 0 for p in parts], pa.bool_())
    members = sigs.filter(mask)
    return members.append_column("part", pa.array([p for p in parts if p >= 0], pa.int32())) \
        .append_column("shard", pa.array(np.full(members.num_rows, shard, np.int32)))


def exact_members(members: pa.Table, texts: pa.Table, cfg: DedupConfig) -> pa.Table:
    """member_sigs' rows as resolve_part needs them: unchanged for estimated Jaccard; for exact
    (cfg.jaccard), EXACT_MEMBER_SCHEMA rows, their shingle sets (from ``texts``, a Table(id, text)
    holding at least those docs) instead of the signatures, which nothing after reads."""
    if cfg.jaccard != "exact":
        return members
    return with_shingles(members.drop_columns(["sig"]), texts, cfg)


def member_schema(cfg: DedupConfig) -> pa.Schema:
    return EXACT_MEMBER_SCHEMA if cfg.jaccard == "exact" else MEMBER_SCHEMA


def part_lookup(part_of: pa.Table) -> dict[str, int]:
    return dict(zip(part_of.column("id").to_pylist(), part_of.column("part").to_pylist()))


def resolve_part(members: pa.Table, edges: pa.Table, cfg: DedupConfig) -> pa.Table:
    """REMOVAL_SCHEMA rows of one cluster part from its members' signatures and candidate edges."""
    verified = verify_edges(edges, members, cfg)
    components = connected_components(verified)
    if not components:
        return REMOVAL_SCHEMA.empty_table()
    removed = choose_survivors(attach_roots(members, components), cfg)
    pos = pc.index_in(removed.column("id"), value_set=members.column("id"))
    return removed.append_column("shard", pc.take(members.column("shard"), pos))


def split_by_part(table: pa.Table, parts: int) -> list[pa.Table]:
    """A table with a ``part`` column (0..parts-1) -> its rows of each part, in part order
    (empty tables for parts it has no rows of)."""
    ordered = table.sort_by([("part", "ascending")]) if table.num_rows else table
    bounds = np.searchsorted(ordered.column("part").to_numpy(), np.arange(parts + 1))
    return [ordered.slice(lo, hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:])]
