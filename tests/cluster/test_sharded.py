"""run_sharded's resume bookkeeping: which finished shards still count."""
import json

import pyarrow as pa

from cluster.sharded import _current_shards, shard_name, write_parquet_atomic


def _finish(out, item):
    name = shard_name(item["index"])
    for kind in ("data", "rejected"):
        write_parquet_atomic(pa.table({"id": [f"{kind}{item['index']}"]}), out / kind / f"{name}.parquet")
    (out / "done").mkdir(parents=True, exist_ok=True)
    (out / "done" / f"{name}.json").write_text(json.dumps(
        {"index": item["index"], "kept": 1, "rejected": 1, "counters": {}, "item": item}))


def test_a_marker_for_another_item_is_dropped_with_its_files(tmp_path):
    """Inputs changed between a crash and the resume: shard 1 now reads another range and
    shard 2 is no longer planned. Shard 0 is kept; 1 and 2 lose marker and files, and a file
    a crash left beyond the plan (5, no marker) goes too."""
    planned = [{"index": i, "chunk": {"file": "a.jsonl", "start": 10 * i, "stop": 10 * i + 10}}
               for i in range(3)]
    for item in planned:
        _finish(tmp_path, item)
    write_parquet_atomic(pa.table({"id": ["orphan"]}), tmp_path / "data" / f"{shard_name(5)}.parquet")
    now = [planned[0], {"index": 1, "chunk": {"file": "a.jsonl", "start": 10, "stop": 25}}]
    done = _current_shards(tmp_path, now)
    assert list(done) == [0]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [f"{shard_name(0)}.parquet"]
    assert sorted(p.name for p in (tmp_path / "rejected").iterdir()) == [f"{shard_name(0)}.parquet"]
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == [f"{shard_name(0)}.json"]
    assert _current_shards(tmp_path, now) == done  # nothing more to drop
