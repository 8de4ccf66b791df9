"""The stages' shard steps take tables (or ingest's raw rows) and return a ShardResult:
no files. run_sharded reads their inputs and writes what they return."""
from __future__ import annotations

import json

import pyarrow as pa

from data_engine.dedup import DEDUP_REJECT_SCHEMA
from data_engine.difficulty import GLOBAL
from data_engine.ingest import Chunk, FieldMap
from data_engine.quality import QualityConfig
from data_engine.schema import RECORD_SCHEMA, IngestResult
from pipelines.stages.dedup import DedupApplyStep
from pipelines.stages.difficulty import GradeStep
from pipelines.stages.ingest import IngestStep
from pipelines.stages.quality import QualityStep
from tests.data_engine.test_quality import PARAGRAPH


def test_ingest_step_maps_raw_rows_to_records_and_rejections():
    chunk = Chunk(file="in.jsonl", format="jsonl", source=None, start=0, stop=100)
    rows = [(1, {"id": "a", "text": "hello", "source": "s"}, None),
            (2, None, ("bad_json", "Expecting value")),
            (3, {"id": "c"}, None)]
    result = IngestStep(FieldMap().model_dump())(chunk, rows)
    assert isinstance(result, IngestResult) and result.counters == {}
    assert result.kept.schema == RECORD_SCHEMA and result.kept.column("id").to_pylist() == ["a"]
    assert result.lines == [1]  # each kept row's line: duplicate-id rejections name it
    rejected = result.rejected.to_pylist()
    assert [(r["line"], r["reason"]) for r in rejected] == [(2, "bad_json"), (3, "missing_text")]
    assert json.loads(rejected[0]["detail"]) == {"file": "in.jsonl", "line": 2,
                                                 "error": "Expecting value"}


def test_quality_step_takes_a_table():
    table = pa.table({"id": ["k", "s"], "text": [PARAGRAPH, "Too short."], "source": ["t", "t"],
                      "meta": ["{}", "{}"]}, schema=RECORD_SCHEMA)
    kept, rejected, counters = QualityStep(QualityConfig().model_dump())(table)
    assert kept.column("id").to_pylist() == ["k"] and rejected.column("id").to_pylist() == ["s"]
    assert counters["rows_in"] == 2 and counters["rows_kept"] == 1


def test_grade_step_grades_a_scored_table_and_rejects_above_max_ppl():
    scored = pa.table({"id": ["a", "b", "c"], "text": ["x", "y", "z"], "source": ["t"] * 3,
                       "ppl": [10.0, 50.0, 900.0]})
    kept, rejected, counters = GradeStep({GLOBAL: [20.0, 100.0]}, max_ppl=500.0)(scored)
    assert kept.column("difficulty").to_pylist() == ["basic", "advanced"]
    assert rejected.column("id").to_pylist() == ["c"]
    assert counters == {f"cell:{GLOBAL}:basic": 1, f"cell:{GLOBAL}:advanced": 1,
                        "reject:difficulty:max_ppl": 1}


def test_apply_step_splits_a_shard_by_its_removals():
    text = "one two three four five six"
    table = pa.table({"id": ["x", "y"], "text": [text, text], "source": ["t", "t"],
                      "meta": ["{}", "{}"]}, schema=RECORD_SCHEMA)
    removals = pa.table({"id": ["y"], "reason": ["exact_duplicate"], "duplicate_of": ["x"],
                         "jaccard": [1.0], "shard": pa.array([0], pa.int32())})
    kept, rejected, counters = DedupApplyStep()(table, removals)
    assert kept.column("id").to_pylist() == ["x"] and kept.schema == RECORD_SCHEMA
    assert rejected.schema == DEDUP_REJECT_SCHEMA
    assert rejected.to_pylist()[0]["duplicate_of"] == "x"
    assert counters == {"reject:exact_duplicate": 1}
