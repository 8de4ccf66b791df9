"""Dedup on Ray Data gives exactly the removals of the in-process dedup_table.

The pure per-part functions are checked without Ray; the passes run on a real
embedded Ray cluster over several Parquet shards.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.dedup import (
    DedupApplyStep, bucket_part, drop_exact_copies, find_removals, key_rows, write_removals,
)
from data_engine.dedup import DEDUP_REJECT_SCHEMA, DedupConfig, dedup_table
from data_engine.dedup_corpus import make_jaccard_corpus
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


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[pa.Table, list[str]]:
    table = _corpus()
    folder = tmp_path_factory.mktemp("shards")
    paths, step = [], -(-table.num_rows // 3)
    for i in range(3):
        path = folder / f"part-{i:05d}.parquet"
        pq.write_table(table.slice(i * step, step), path)
        paths.append(str(path))
    return table, paths


@pytest.fixture(scope="module")
def ray_session():
    from cluster.data import configure
    from cluster.session import RaySettings, connect
    connect(RaySettings(num_cpus=2))
    configure()


# --- the per-part functions, without Ray ---------------------------------------------

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


def test_apply_step_splits_a_shard_by_its_removals(tmp_path):
    table = _records({"x": "one two three four five six", "y": "one two three four five six"})
    pq.write_table(table, tmp_path / "part-00000.parquet")
    removals = pa.table({"id": ["y"], "reason": ["exact_duplicate"], "duplicate_of": ["x"],
                         "jaccard": [1.0], "shard": pa.array([0], pa.int32())})
    [path] = write_removals(removals, 1, tmp_path / "removals")
    kept, rejected, counters = DedupApplyStep()(
        {"path": str(tmp_path / "part-00000.parquet"), "removals": str(path)})
    assert kept.column("id").to_pylist() == ["x"] and kept.schema == RECORD_SCHEMA
    assert rejected.schema == DEDUP_REJECT_SCHEMA
    assert rejected.to_pylist()[0]["duplicate_of"] == "x"
    assert counters == {"reject:exact_duplicate": 1}


# --- the passes on Ray ---------------------------------------------------------------

@pytest.mark.parametrize("cfg", [DedupConfig(), DedupConfig(keep="longest", exact=False)],
                         ids=["default", "longest-near-only"])
def test_ray_removals_equal_dedup_table(ray_session, shards, cfg, tmp_path):
    table, paths = shards
    _, expected = dedup_table(table, cfg)
    removed, stats = find_removals(paths, cfg, tmp_path)
    assert _removed(removed) == _removed(expected)
    assert stats["candidate_pairs"] >= stats["near_removed"] > 0
    # Every removal names the shard that holds the row.
    where = {rid: i for i, p in enumerate(paths) for rid in pq.read_table(p)["id"].to_pylist()}
    assert all(where[r["id"]] == r["shard"] for r in removed.to_pylist())
    if cfg.exact:
        reasons = {r["id"]: r["reason"] for r in removed.to_pylist()}
        assert all(reasons[f"zcopy{i:02d}"] == "exact_duplicate" for i in range(12))


def test_a_killed_bucket_pass_reuses_the_signatures_it_wrote(ray_session, shards, tmp_path):
    """A shard's signature file is written atomically once its MinHashes are done; a rerun
    reuses it (the file is not rewritten), recomputes the shard that had none, and finds the
    same removals. A file that does not belong to its shard is recomputed, not trusted."""
    from cluster.dedup import sig_path
    _, paths = shards
    cfg = DedupConfig()
    first, stats = find_removals(paths, cfg, tmp_path)
    assert stats["signature_files_found"] == 0
    sig_dir = tmp_path / "signatures"
    sig_path(sig_dir, 2).unlink()  # killed before shard 2's signatures were written
    written = {i: sig_path(sig_dir, i).stat().st_mtime_ns for i in (0, 1)}
    again, stats = find_removals(paths, cfg, tmp_path)
    assert stats["signature_files_found"] == 2 and _removed(again) == _removed(first)
    assert {i: sig_path(sig_dir, i).stat().st_mtime_ns for i in (0, 1)} == written
    assert sig_path(sig_dir, 2).exists()
    pq.write_table(pq.read_table(sig_path(sig_dir, 0)), sig_path(sig_dir, 1))  # the wrong shard's
    again, _ = find_removals(paths, cfg, tmp_path)
    assert _removed(again) == _removed(first)
    assert pq.read_table(sig_path(sig_dir, 1))["id"].to_pylist() == pq.read_table(paths[1])["id"].to_pylist()


def test_duplicate_values_across_shards(ray_session, tmp_path):
    from cluster.data import duplicate_values
    paths = []
    for i, ids in enumerate([["a", "b", "c"], ["c", "d"], ["d", "d", "e"]]):
        paths.append(str(tmp_path / f"ids-{i}.parquet"))
        pq.write_table(pa.table({"id": ids}), paths[-1])
    assert duplicate_values(paths, "id") == {"c", "d"}
    assert duplicate_values(paths[:1], "id") == set() == duplicate_values([], "id")
