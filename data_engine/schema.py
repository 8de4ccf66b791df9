"""The record schema shared by every data stage, the shared vocabulary, and the base of
every data config (``Strict``: an unknown key is an error naming it).

A data stage reads Parquet shards of records and writes two kinds of shards:
  data/*.parquet      kept rows: RECORD_SCHEMA plus the columns the stage adds
  rejected/*.parquet  removed rows: id, text, source, reason, detail (+ extras)

A data *step* is a plain function or small class over one ``pyarrow.Table``
batch that returns a ``ShardResult``. It reads and writes no files and never imports
Ray; ``cluster/`` reads its input, chooses how to run it and writes what it returns.
"""
from __future__ import annotations

import hashlib
import json
from typing import NamedTuple

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

DOMAINS: tuple[str, ...] = (
    "math", "code", "physics", "chemistry", "biology", "medicine", "law",
    "finance", "business", "history", "philosophy", "literature", "arts",
    "education", "politics", "geography", "engineering", "lifestyle",
)
DIFFICULTIES: tuple[str, ...] = ("basic", "advanced", "expert")

# Reasoning format of SFT/DPO/RL samples.
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

RECORD_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("text", pa.string()),
    ("source", pa.string()),
    ("meta", pa.string()),  # JSON object as text: inputs are heterogeneous
])

REJECT_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("text", pa.string()),
    ("source", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),  # JSON object as text, e.g. {"file": ..., "line": ...}
])


class ShardResult(NamedTuple):
    """What a data step returns for one shard."""
    kept: pa.Table  # the rows that go on (RECORD_SCHEMA plus the step's columns)
    rejected: pa.Table  # the rows it removed, REJECT_SCHEMA (+ extras)
    counters: dict[str, int]  # e.g. ``reject:<reason>`` counts, summed over shards by the stage


class IngestResult(NamedTuple):
    """What ingest's step returns for one chunk: a ShardResult's fields, and the input line (or
    row number) of each kept row, which run_sharded keeps in the shard's marker."""
    kept: pa.Table
    rejected: pa.Table
    counters: dict[str, int]
    lines: list[int]


def content_id(text: str, source: str = "") -> str:
    """Stable id for a row that has none: a hash of its source and text."""
    digest = hashlib.sha256(f"{source}\x00{text}".encode("utf-8")).hexdigest()
    return f"h{digest[:24]}"


def reject_table(rows: list[dict]) -> pa.Table:
    """Build a REJECT_SCHEMA table from dicts; ``detail`` may be a dict."""
    def norm(row: dict) -> dict:
        detail = row.get("detail", {})
        return {
            "id": row.get("id"), "text": row.get("text"), "source": row.get("source"),
            "reason": row["reason"],
            "detail": detail if isinstance(detail, str) else json.dumps(detail, sort_keys=True),
        }
    return pa.Table.from_pylist([norm(r) for r in rows], schema=REJECT_SCHEMA)


class Strict(BaseModel):
    # data_engine/ is a leaf, so its configs cannot share training.config.Strict
    model_config = ConfigDict(extra="forbid")
