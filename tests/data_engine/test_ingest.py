"""Ingest readers without Ray: every format, field mapping, stable ids, chunking."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_engine.ingest import (Chunk, FieldMap, IngestConfig, InputSpec, plan_chunks, read_chunk,
                                resolve_files)
from data_engine.schema import content_id


def _read_all(spec: InputSpec, cfg: IngestConfig | None = None):
    cfg = cfg or IngestConfig(inputs=[spec])
    files = [(f, fmt, spec.source) for f, fmt in resolve_files(spec)]
    kept, rejected = [], []
    for chunk in plan_chunks(files, cfg):
        k, r = read_chunk(chunk, cfg.fields)
        kept += k.to_pylist()
        rejected += r.to_pylist()
    return kept, rejected


def test_parquet_with_field_mapping_and_row_chunks(tmp_path):
    table = pa.table({"doc_id": [f"d{i}" for i in range(7)], "body": [f"text {i}" for i in range(6)] + [None],
                      "origin": ["web"] * 7, "score": list(range(7))})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=3)
    spec = InputSpec(path=str(tmp_path / "a.parquet"))
    cfg = IngestConfig(inputs=[spec], fields=FieldMap(id="doc_id", text="body", source="origin"), chunk_rows=2)
    assert len(plan_chunks([(str(tmp_path / "a.parquet"), "parquet", None)], cfg)) == 4
    kept, rejected = _read_all(spec, cfg)
    assert [r["id"] for r in kept] == [f"d{i}" for i in range(6)]
    assert kept[0]["source"] == "web" and json.loads(kept[0]["meta"]) == {"score": 0}
    assert [(r["reason"], r["line"]) for r in rejected] == [("missing_text", 7)]


def test_json_array_and_ids_hashed_stably(tmp_path):
    rows = [{"text": "no id here"}, {"id": 7, "text": "int id"}, {"id": [1], "text": "list id"}, "bare string"]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    kept, rejected = _read_all(InputSpec(path=str(tmp_path / "a.json"), source="manual"))
    assert [r["id"] for r in kept] == [content_id("no id here", "manual"), "7"]
    assert {r["reason"] for r in rejected} == {"wrong_type", "not_a_record"}


def test_hf_save_to_disk_folder(tmp_path):
    import datasets
    ds = datasets.Dataset.from_dict({"id": ["a", "b", "c"], "text": ["alpha", "beta", ""]})
    ds.save_to_disk(str(tmp_path / "hf"))
    spec = InputSpec(path=str(tmp_path / "hf"))
    assert resolve_files(spec) == [(str(tmp_path / "hf"), "hf")]
    kept, rejected = _read_all(spec)
    assert [r["id"] for r in kept] == ["a", "b"]
    assert [r["reason"] for r in rejected] == ["empty_text"]


def test_glob_and_folder_skip_unrelated_files(tmp_path):
    for name in ("x.jsonl", "y.jsonl"):
        (tmp_path / name).write_text(json.dumps({"id": name, "text": "t"}) + "\n")
    (tmp_path / "README.md").write_text("not data")
    assert len(resolve_files(InputSpec(path=str(tmp_path / "*.jsonl")))) == 2
    assert len(resolve_files(InputSpec(path=str(tmp_path)))) == 2


def test_bad_paths_are_named(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        resolve_files(InputSpec(path=str(tmp_path / "missing.jsonl")))
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(ValueError, match="cannot tell the format"):
        resolve_files(InputSpec(path=str(tmp_path / "data.txt")))


def test_unreadable_files_and_chunks_become_rejections(tmp_path):
    """A file that cannot be opened, or a chunk that fails mid-read, is one rejected row naming
    the file and the error; rows read before a failure are kept; nothing raises."""
    cfg = IngestConfig(inputs=[InputSpec(path="x")], chunk_bytes=40)
    (tmp_path / "bad.parquet").write_text("not parquet")
    [chunk] = plan_chunks([(str(tmp_path / "bad.parquet"), "parquet", "web")], cfg)
    assert chunk.format == "unreadable" and "Parquet" in chunk.error
    kept, rejected = read_chunk(chunk, cfg.fields)
    [row] = rejected.to_pylist()
    assert kept.num_rows == 0 and (row["reason"], row["line"], row["source"]) == ("unreadable_file", 0, "web")
    assert row["file"].endswith("bad.parquet") and "Parquet" in json.loads(row["detail"])["error"]

    lines = [json.dumps({"id": f"r{i}", "text": f"row number {i}"}) for i in range(6)]
    (tmp_path / "gone.jsonl").write_text("\n".join(lines) + "\n")
    chunks = plan_chunks([(str(tmp_path / "gone.jsonl"), "jsonl", None)], cfg)
    assert len(chunks) > 2
    first_kept, _ = read_chunk(chunks[0], cfg.fields)
    (tmp_path / "gone.jsonl").unlink()  # storage lost the file between planning and reading
    kept, rejected = read_chunk(chunks[1], cfg.fields)
    [row] = rejected.to_pylist()
    assert first_kept.num_rows >= 1 and kept.num_rows == 0
    assert row["reason"] == "unreadable_chunk" and "FileNotFoundError" in json.loads(row["detail"])["error"]


def test_a_bug_in_row_conversion_crashes_instead_of_posing_as_bad_data(tmp_path, monkeypatch):
    """Only reading is guarded: a ValueError from converting a row is a bug and must surface."""
    from data_engine import ingest
    (tmp_path / "a.jsonl").write_text(json.dumps({"id": "r0", "text": "a row"}) + "\n")
    cfg = IngestConfig(inputs=[InputSpec(path="x")])
    [chunk] = plan_chunks([(str(tmp_path / "a.jsonl"), "jsonl", None)], cfg)

    def broken(*_args):
        raise ValueError("bug in _to_record")
    monkeypatch.setattr(ingest, "_to_record", broken)
    with pytest.raises(ValueError, match="bug in _to_record"):
        read_chunk(chunk, cfg.fields)


def test_a_lone_surrogate_is_a_rejected_row_not_a_crash(tmp_path):
    """'\\ud800' is valid JSON but not UTF-8: the row is rejected (not_utf8, its line), in the
    text, the id or the source, and the rejected row keeps the text with the surrogate escaped."""
    lines = ['{"id": "ok", "text": "fine row"}', '{"text": "bad \\ud800 row"}',
             '{"id": "i\\udc00", "text": "bad id"}', '{"id": "s", "text": "x", "source": "\\ud801"}']
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    cfg = IngestConfig(inputs=[InputSpec(path="x")])
    [chunk] = plan_chunks([(str(tmp_path / "a.jsonl"), "jsonl", None)], cfg)
    kept, rejected = read_chunk(chunk, cfg.fields)
    assert kept.column("id").to_pylist() == ["ok"]
    assert rejected.column("reason").to_pylist() == ["not_utf8"] * 3
    assert rejected.column("line").to_pylist() == [2, 3, 4]
    assert rejected.column("text")[0].as_py() == "bad \\ud800 row"
    assert rejected.column("id")[1].as_py() == "i\\udc00"


def test_jsonl_chunks_keep_line_numbers(tmp_path):
    lines = [json.dumps({"id": f"r{i}", "text": f"row {i}"}) for i in range(50)]
    lines[37] = "{broken"
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    chunks = plan_chunks([(str(tmp_path / "a.jsonl"), "jsonl", None)],
                         IngestConfig(inputs=[InputSpec(path="x")], chunk_bytes=200))
    assert len(chunks) > 3 and chunks[0].first_line == 1
    rejected = [r for c in chunks for r in read_chunk(c, FieldMap())[1].to_pylist()]
    kept = sum(read_chunk(c, FieldMap())[0].num_rows for c in chunks)
    assert kept == 49 and [(r["reason"], r["line"]) for r in rejected] == [("bad_json", 38)]
