"""Exact then MinHash-LSH near dedup of Parquet record shards, on Ray Data.

The batch functions live in data_engine/dedup.py; this module only decides
what runs where. N docs, B bands, E candidate pairs, C docs on a candidate pair:

  1. bucket pass  workers  per shard: signatures (to a file per shard in the
                           work folder), then per doc one exact row (band -1,
                           key = its normalised-text hash) and B band rows (ids
                           and 64-bit keys, no signatures) -> groupby(part) ->
                           per part: exact groups give exact removals; LSH
                           buckets, exact copies dropped, give the E candidate pairs
                  driver   streams them back; connected components over the
                           candidate edges assign each of the C docs a part
  2. cluster pass workers  per shard: the signature file, filtered to the C docs
                           -> groupby(part) -> per part: verify its candidate
                           pairs by estimated Jaccard, components of verified
                           edges, choose_survivors
                  driver   streams back the near removals
  3. write-out    workers  per shard: apply_removals (``DedupApplyStep`` under
                           cluster.data.run_sharded, so finished shards are kept)

The driver holds edges and removed ids, never signatures or an index of the
corpus. Only the C candidate docs' signatures go through a shuffle.

Why ``part`` and not groupby(["band", "key"]): Ray's map_groups calls the UDF
once per group and almost every LSH bucket is a singleton, so that would be
N*B Python calls. ``part`` is a hash of (band, key) mod P, so every bucket
still lies wholly in one group; bucket_edges splits a part into its buckets
with one vectorised sort. P grows with the corpus, bounding a group's memory.

Removals equal those of ``data_engine.dedup.dedup_table``: a near bucket
holds every copy of an exact group (equal text, equal signature), so dropping
the non-survivors there gives the buckets of the exact pass's survivors.

One machine:  find_removals(shards, DedupConfig(), work_dir)   (after ray.init())
A cluster:    the same, after ray.init(address=...); shards and work_dir on shared storage.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from cluster.data import shard_name, write_parquet_atomic
from data_engine.dedup import (
    KEEP_ORDER, REMOVED_SCHEMA, DedupConfig, apply_removals, attach_roots, band_rows,
    bucket_edges, choose_survivors, component_labels, connected_components, exact_keys,
    normalized_texts, signature_batch, verify_edges,
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
READ_ROWS = 4096                    # rows per signature batch inside a task
ROWS_PER_BUCKET_PART = 2_000_000    # ~100 MB of key rows per map_groups call
DOCS_PER_CLUSTER_PART = 50_000      # ~30 MB of signatures per map_groups call
_MIX = np.uint64(0x9E3779B97F4A7C15)


# --- pass 1: exact groups and LSH buckets ---------------------------------------

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


def _shards_of(items: pa.Table) -> Iterator[tuple[int, str]]:
    yield from zip(items.column("shard").to_pylist(), items.column("path").to_pylist())


def _records(shard: int, path: str) -> Iterator[tuple[pa.Table, pa.Array]]:
    """(id + text batch, its shard index per row) of one shard, READ_ROWS at a time."""
    for batch in pq.ParquetFile(path).iter_batches(READ_ROWS, columns=["id", "text"]):
        yield pa.Table.from_batches([batch]), pa.array([shard] * batch.num_rows, pa.int32())


def _concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    return pa.concat_tables(tables) if tables else schema.empty_table()


def sig_path(sig_dir: str | Path, shard: int) -> Path:
    return Path(sig_dir) / f"{shard_name(shard)}.parquet"


def _key_rows_task(items: pa.Table, cfg: dict, parts: int, sig_dir: str) -> pa.Table:
    """Key rows of whole shards; their signatures go to sig_dir for the cluster pass, so
    candidates are not hashed twice and signatures never travel through the shuffle.

    A shard whose signature file exists (written atomically by an earlier, killed attempt)
    reuses it: MinHash is most of this pass, the exact keys and bands are cheap to redo."""
    config, out = DedupConfig(**cfg), []
    for shard, path in _shards_of(items):
        done = sig_path(sig_dir, shard)
        cached = pq.read_table(done) if config.near and done.exists() else None
        sig_tables, offset = [], 0
        for batch, shard_col in _records(shard, path):
            normalized = normalized_texts(batch, config)  # once for the exact and near keys
            sigs = None
            if cached is not None:
                sigs = cached.slice(offset, batch.num_rows)
                offset += batch.num_rows
                if not sigs.column("id").equals(batch.column("id")):
                    cached, sigs = None, None  # not this shard's: compute and rewrite
            if config.near and sigs is None:
                sigs = signature_batch(batch, config, normalized)
            out.append(key_rows(batch, config, shard_col, parts, sigs, normalized))
            sig_tables.append(sigs)
        if config.near and cached is None:
            # Same content on a retry, and atomic: a rerun task rewrites it harmlessly.
            write_parquet_atomic(_concat(sig_tables, SIG_SCHEMA), done)
    return _concat(out, KEY_ROW_SCHEMA)


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


def _bucket_part_task(rows: pa.Table, cfg: dict) -> pa.Table:
    return bucket_part(rows, DedupConfig(**cfg))


# Task pools, not actor pools: an actor pool holds its CPUs until its operator
# ends, which on a small cluster starves the shuffle after it (Ray Data then
# hangs with "Cluster resources are not enough"). Large read-only inputs reach
# the tasks as an object ref, fetched once per worker process.
_BROADCAST: dict[str, object] = {}


def _fetch(ref_box: list, prepare: Callable[[object], object] = lambda v: v) -> object:
    """``prepare(ray.get(ref))``, computed once per worker process."""
    key = ref_box[0].hex()
    if key not in _BROADCAST:
        _BROADCAST.clear()  # one broadcast at a time: an earlier pass's is stale
        _BROADCAST[key] = prepare(ray.get(ref_box[0]))
    return _BROADCAST[key]


# --- pass 2: verify candidates, components, survivors ----------------------------

def member_sigs(sigs: pa.Table, shard: int, part_of: dict[str, int]) -> pa.Table:
    """MEMBER_SCHEMA rows: the signatures of a shard's docs that lie on a candidate edge."""
    parts = [part_of.get(i, -1) for i in sigs.column("id").to_pylist()]
    mask = pa.array([p >= 0 for p in parts])
    members = sigs.filter(mask)
    return members.append_column("part", pa.array([p for p in parts if p >= 0], pa.int32())) \
        .append_column("shard", pa.array(np.full(members.num_rows, shard, np.int32)))


def _part_lookup(part_of: pa.Table) -> dict[str, int]:
    return dict(zip(part_of.column("id").to_pylist(), part_of.column("part").to_pylist()))


def _member_sigs_task(items: pa.Table, part_of: list, sig_dir: str) -> pa.Table:
    # Table(id, part) travels as Arrow buffers; each worker builds its lookup once, not per shard.
    lookup = _fetch(part_of, _part_lookup)
    return _concat([member_sigs(pq.read_table(sig_path(sig_dir, shard)), shard, lookup)
                    for shard, _ in _shards_of(items)], MEMBER_SCHEMA)


def resolve_part(members: pa.Table, edges: pa.Table, cfg: DedupConfig) -> pa.Table:
    """REMOVAL_SCHEMA rows of one cluster part from its members' signatures and candidate edges."""
    verified = verify_edges(edges, members.select(["id", "sig"]), cfg)
    components = connected_components(verified)
    if not components:
        return REMOVAL_SCHEMA.empty_table()
    removed = choose_survivors(attach_roots(members, components), cfg)
    pos = pc.index_in(removed.column("id"), value_set=members.column("id"))
    return removed.append_column("shard", pc.take(members.column("shard"), pos))


def _slices_by_part(edges: pa.Table) -> dict[int, pa.Table]:
    """Edges (a, b, part) sorted by part -> {part: Table(a, b)}."""
    part = edges.column("part").to_numpy()
    bounds = np.flatnonzero(np.r_[True, part[1:] != part[:-1], True]) if len(part) else []
    pairs = edges.select(["a", "b"])
    return {int(part[lo]): pairs.slice(lo, hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:])}


def _resolve_part_task(members: pa.Table, cfg: dict, edges: list) -> pa.Table:
    slices = _fetch(edges, _slices_by_part)
    part_edges = slices.get(members.column("part")[0].as_py())
    if part_edges is None:
        return REMOVAL_SCHEMA.empty_table()
    return resolve_part(members.drop_columns(["part"]), part_edges, DedupConfig(**cfg))


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


# --- the driver -------------------------------------------------------------------

def _shard_items(shards: list[str]) -> "ray.data.Dataset":
    """One block per shard. Not read_parquet: its file listing alone took 6-9 s here,
    and a block per shard makes the parallelism plain."""
    return ray.data.from_items([{"shard": i, "path": p} for i, p in enumerate(shards)],
                               override_num_blocks=len(shards))


def _tasks(workers: int):
    return ray.data.TaskPoolStrategy(size=workers)


def _workers(concurrency: int | None) -> int:
    return concurrency or max(1, int(ray.available_resources().get("CPU", 1)))


def _collect(ds) -> pa.Table | None:
    tables = [t for t in ds.iter_batches(batch_format="pyarrow", batch_size=None) if t.num_rows]
    return pa.concat_tables(tables) if tables else None


def _bucket_pass(shards, cfg, n_rows, workers, sig_dir) -> tuple[pa.Table, pa.Table]:
    rows_per_doc = int(cfg.exact) + (cfg.bands if cfg.near else 0)
    parts = max(workers, math.ceil(n_rows * rows_per_doc / ROWS_PER_BUCKET_PART))
    ds = _shard_items(shards).map_batches(
        _key_rows_task, fn_kwargs={"cfg": cfg.model_dump(), "parts": parts,
                                   "sig_dir": str(sig_dir)},
        batch_format="pyarrow", batch_size=None, compute=_tasks(workers))
    pairs = _collect(ds.groupby("part").map_groups(
        _bucket_part_task, fn_kwargs={"cfg": cfg.model_dump()}, batch_format="pyarrow",
        compute=_tasks(workers)))
    pairs = pairs if pairs is not None else PAIR_SCHEMA.empty_table()
    is_exact = pairs.column("exact")
    exact = pairs.filter(is_exact)
    candidates = pairs.filter(pc.invert(is_exact)).select(["a", "b"])
    # The same pair collides in several bands (in other parts): count it once.
    candidates = candidates.group_by(["a", "b"]).aggregate([])
    removed = pa.table([exact.column("b"), pa.array(["exact_duplicate"] * exact.num_rows),
                        exact.column("a"), pa.array(np.ones(exact.num_rows)),
                        exact.column("shard")], schema=REMOVAL_SCHEMA)
    return removed, candidates


def _cluster_pass(shards, cfg, candidates, workers, sig_dir) -> pa.Table:
    n_members = 2 * candidates.num_rows  # an upper bound is enough to size parts
    n_parts = max(workers, math.ceil(n_members / DOCS_PER_CLUSTER_PART))
    part_of, edges = cluster_parts(candidates, n_parts)
    ds = _shard_items(shards).map_batches(
        _member_sigs_task, fn_kwargs={"part_of": [ray.put(part_of)], "sig_dir": str(sig_dir)},
        batch_format="pyarrow", batch_size=None, compute=_tasks(workers))
    removed = _collect(ds.groupby("part").map_groups(
        _resolve_part_task, fn_kwargs={"cfg": cfg.model_dump(), "edges": [ray.put(edges)]},
        batch_format="pyarrow", compute=_tasks(workers)))
    return removed if removed is not None else REMOVAL_SCHEMA.empty_table()


def find_removals(shards: list[str], cfg: DedupConfig, work: Path, *,
                  concurrency: int | None = None,
                  log: Callable[[str], None] = lambda _: None) -> tuple[pa.Table, dict]:
    """REMOVAL_SCHEMA rows for every doc to remove, and counts/timings of the passes.

    ``shards`` are record Parquet files; a removal's ``shard`` is an index into it.
    ``work`` (shared storage on a cluster) holds the signatures between the passes.
    """
    sig_dir = Path(work) / "signatures"
    n_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in shards)
    stats = {"docs": n_rows, "candidate_pairs": 0}
    empty = REMOVAL_SCHEMA.empty_table()
    if n_rows < 2 or not (cfg.exact or cfg.near):
        return empty, stats
    workers = min(_workers(concurrency), len(shards))
    found = sum(sig_path(sig_dir, i).exists() for i in range(len(shards))) if cfg.near else 0
    started = time.time()
    exact, candidates = _bucket_pass(shards, cfg, n_rows, workers, sig_dir)
    stats.update(exact_removed=exact.num_rows, candidate_pairs=candidates.num_rows,
                 bucket_pass_s=round(time.time() - started, 2), signature_files_found=found)
    earlier = f" ({found} shards' signature files from an earlier attempt)" if found else ""
    log(f"bucket pass: {exact.num_rows} exact copies, {candidates.num_rows} candidate pairs "
        f"in {stats['bucket_pass_s']}s{earlier}")
    near = empty
    if candidates.num_rows:
        started = time.time()
        near = _cluster_pass(shards, cfg, candidates, workers, sig_dir)
        stats["cluster_pass_s"] = round(time.time() - started, 2)
        log(f"cluster pass: {near.num_rows} near duplicates in {stats['cluster_pass_s']}s")
    stats["near_removed"] = near.num_rows
    return pa.concat_tables([exact, near]), stats


# --- pass 3: per-shard write-out -----------------------------------------------------

def write_removals(removals: pa.Table, n_shards: int, folder: Path) -> list[Path]:
    """One Parquet file of removals per shard (empty ones too), so each write-out
    task reads only its own."""
    folder.mkdir(parents=True, exist_ok=True)
    ordered = removals.sort_by([("shard", "ascending"), ("id", "ascending")])
    shard = ordered.column("shard").to_numpy(zero_copy_only=False)
    bounds = np.searchsorted(shard, np.arange(n_shards + 1))
    paths = []
    for i in range(n_shards):
        path = folder / f"{shard_name(i)}.parquet"
        write_parquet_atomic(ordered.slice(bounds[i], bounds[i + 1] - bounds[i]), path)  # fsynced
        paths.append(path)
    return paths


class DedupApplyStep:
    """A run_sharded step: item {"index", "path", "removals"} -> (kept, rejected, counters)."""

    def __call__(self, item: dict):
        table = pq.read_table(item["path"])
        removed = pq.read_table(item["removals"]).select(REMOVED_SCHEMA.names)
        kept, rejected = apply_removals(table, removed)
        reasons = rejected.column("reason").to_pylist()
        return kept, rejected, {f"reject:{r}": reasons.count(r) for r in set(reasons)}
