"""Dedup on Ray tasks gives exactly the removals of the in-process dedup_table.

The passes run on a real embedded Ray cluster over several Parquet shards; the
pure per-part functions are checked without Ray in tests/data_engine/test_dedup_parts.py.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.dedup import find_removals, write_removals
from data_engine.dedup import DedupConfig, dedup_table
from tests.data_engine.test_dedup_parts import _corpus, _removed


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
    from cluster.sharded import configure
    from cluster.session import RaySettings, connect
    connect(RaySettings(num_cpus=2))
    configure()


def test_removals_are_written_one_file_per_shard(tmp_path):
    removals = pa.table({"id": ["y", "z"], "reason": ["exact_duplicate"] * 2,
                         "duplicate_of": ["x", "x"], "jaccard": [1.0, 1.0],
                         "shard": pa.array([2, 0], pa.int32())})
    paths = write_removals(removals, 3, tmp_path / "removals")
    assert [p.name for p in paths] == [f"part-{i:05d}.parquet" for i in range(3)]
    assert [pq.read_table(p).column("id").to_pylist() for p in paths] == [["z"], [], ["y"]]


# --- the passes on Ray ---------------------------------------------------------------

@pytest.mark.parametrize("cfg, concurrency", [
    (DedupConfig(), None), (DedupConfig(keep="longest", exact=False), None),
    (DedupConfig(jaccard="estimated"), 1)], ids=["default", "longest-near-only", "estimated-1-part"])
def test_ray_removals_equal_dedup_table(ray_session, shards, cfg, concurrency, tmp_path):
    table, paths = shards
    _, expected = dedup_table(table, cfg)
    removed, stats = find_removals(paths, cfg, tmp_path, concurrency=concurrency)
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
    from cluster.sharded import duplicate_values
    paths = []
    for i, ids in enumerate([["a", "b", "c"], ["c", "d"], ["d", "d", "e"]]):
        paths.append(str(tmp_path / f"ids-{i}.parquet"))
        pq.write_table(pa.table({"id": ids}), paths[-1])
    assert duplicate_values(paths, "id") == {"c", "d"}
    assert duplicate_values(paths, "id", parts=3) == {"c", "d"}  # split by a hash, then counted
    assert duplicate_values(paths[:1], "id") == set() == duplicate_values([], "id")


def test_gather_fails_at_the_first_error_and_cancels_the_tasks_still_running(ray_session):
    """run_sharded's tasks: a crashed shard fails the stage at once, and a shard still running
    (here one that would take a minute) is cancelled, not left holding its CPU."""
    import time

    import ray

    from cluster.sharded import gather

    @ray.remote(max_retries=0)
    def slow() -> None:
        time.sleep(60)

    @ray.remote(max_retries=0)
    def broken() -> None:
        raise ValueError("shard 3 is broken")

    started = time.time()
    refs = [slow.remote(), broken.remote()]
    with pytest.raises(ray.exceptions.RayTaskError, match="shard 3 is broken"):
        gather(refs)
    with pytest.raises((ray.exceptions.TaskCancelledError, ray.exceptions.WorkerCrashedError)):
        ray.get(refs[0], timeout=30)
    assert time.time() - started < 30
