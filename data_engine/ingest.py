"""Ingest: read JSONL / JSON / Parquet / HF `save_to_disk` folders into records.

The work is split into *chunks* (a byte range of a JSONL file, a row-group
range of a Parquet file, an index range of an HF dataset, a whole JSON file).
``plan_chunks`` makes the list on the driver; ``read_raw_rows`` (the reader,
the only code here that opens input files) gives a chunk's raw rows, and
``records_from_rows`` (the step) turns them into kept and rejected tables, with
the line of each kept row;
``read_chunk`` does both in process. Which executor runs the chunks is chosen
elsewhere (``cluster/``), so this module knows nothing of Ray.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from data_engine.schema import RECORD_SCHEMA, REJECT_SCHEMA, IngestResult, Strict, content_id

INGEST_REJECT_SCHEMA = REJECT_SCHEMA.append(pa.field("file", pa.string())).append(
    pa.field("line", pa.int64()))
FORMATS = ("jsonl", "json", "parquet", "hf")
_SUFFIX_FORMAT = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}


class DemoSource(Strict):
    """Generate the bundled demo corpus (see data_engine/generators/demo_corpus.py) and read it."""
    n_docs: int = Field(3000, ge=100, description="fewer leaves some domain or noise kind empty")
    seed: int = Field(0, description="seed of the generated corpus")


class InputSpec(Strict):
    path: str | None = Field(None, description="a file, a folder, or a glob")
    format: Literal["auto", "jsonl", "json", "parquet", "hf"] = Field("auto", description=(
        "auto: by extension; hf: a saved datasets folder"))
    source: str | None = Field(None, description="default: the source field, else the file's stem")
    demo: DemoSource | None = Field(None, description=(
        "generate the bundled demo corpus instead of reading `path`"))

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.path is None) == (self.demo is None):
            raise ValueError("give exactly one of `path` or `demo`")
        return self


class FieldMap(Strict):
    """Which input fields hold the id, text and source."""

    id: str | None = Field("id", description="the id field; None or missing: a hash of text and source")
    text: str = Field("text", description="the text field (required in every row)")
    source: str | None = Field("source", description="the source field, unless the input sets `source`")
    meta: list[str] | Literal["rest", "none"] = Field("rest", description="which fields go into `meta`")


class IngestConfig(Strict):
    """Read the inputs into validated Parquet shards; bad rows go to rejected/."""

    inputs: list[InputSpec] = Field(default_factory=list, min_length=1, description="files or the demo")
    fields: FieldMap = FieldMap()
    chunk_bytes: int = Field(8 << 20, gt=0, description="JSONL chunk size")
    chunk_rows: int = Field(20_000, gt=0, description="Parquet / HF chunk size")
    max_unreadable_file_fraction: float = Field(0.1, ge=0.0, le=1.0, description=(
        "error budget for files that cannot be read at all (each counts as one rejected row)"))


@dataclass(frozen=True)
class Chunk:
    file: str
    format: str
    source: str | None
    start: int          # byte offset (jsonl) or row offset (parquet, hf)
    stop: int
    first_line: int = 1  # 1-based line number of the first line (jsonl)
    error: str | None = None  # format "unreadable": why the file could not be opened

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- planning
def resolve_files(spec: InputSpec) -> list[tuple[str, str]]:
    """Expand one input spec into (file, format) pairs; errors name the path."""
    path = spec.path
    if any(ch in path for ch in "*?["):
        matches = sorted(glob.glob(path, recursive=True))
    elif os.path.isdir(path) and _is_hf_folder(path):
        return [(path, "hf")]
    elif os.path.isdir(path):
        matches = sorted(str(p) for p in Path(path).rglob("*") if p.is_file())
    elif os.path.exists(path):
        matches = [path]
    else:
        raise ValueError(f"ingest input {path!r}: no such file or folder")
    out = []
    for m in matches:
        if os.path.isdir(m) and _is_hf_folder(m):
            out.append((m, "hf"))
        elif os.path.isfile(m):
            fmt = spec.format if spec.format != "auto" else _SUFFIX_FORMAT.get(Path(m).suffix.lower())
            if fmt is None:
                if spec.format == "auto" and not any(ch in path for ch in "*?[") and m == path:
                    raise ValueError(f"ingest input {m!r}: cannot tell the format; set `format`")
                continue  # a folder or glob may hold unrelated files (README, .lock)
            out.append((m, fmt))
    if not out:
        raise ValueError(f"ingest input {path!r}: matched no readable file")
    return out


def _is_hf_folder(path: str) -> bool:
    return os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(
        os.path.join(path, "state.json"))


def plan_chunks(files: list[tuple[str, str, str | None]], cfg: IngestConfig) -> list[Chunk]:
    """Split files into chunks; files are (path, format, source override)."""
    chunks: list[Chunk] = []
    for path, fmt, source in files:
        if fmt == "jsonl":
            chunks += _jsonl_chunks(path, source, cfg.chunk_bytes)
        elif fmt == "json":
            chunks.append(Chunk(path, fmt, source, 0, 1))
        elif fmt in ("parquet", "hf"):
            try:
                n = _parquet_rows(path) if fmt == "parquet" else _hf_rows(path)
            except UNREADABLE as err:  # recorded as a rejection, not a crash: see read_raw_rows
                chunks.append(Chunk(path, "unreadable", source, 0, 0, error=f"{type(err).__name__}: {err}"))
                continue
            chunks += [Chunk(path, fmt, source, s, min(s + cfg.chunk_rows, n))
                       for s in range(0, max(n, 1), cfg.chunk_rows)]
        else:
            raise ValueError(f"ingest input {path!r}: unknown format {fmt!r}")
    return chunks


def _jsonl_chunks(path: str, source: str | None, chunk_bytes: int) -> list[Chunk]:
    """Byte ranges that start at line boundaries, with the line number of each start."""
    size = os.path.getsize(path)
    chunks, start, line = [], 0, 1
    with open(path, "rb") as f:
        while start < size:
            f.seek(min(start + chunk_bytes, size))
            f.readline()  # move to the next line boundary
            stop = min(f.tell(), size)
            f.seek(start)
            n_lines = f.read(stop - start).count(b"\n")
            chunks.append(Chunk(path, "jsonl", source, start, stop, line))
            start, line = stop, line + n_lines
    return chunks or [Chunk(path, "jsonl", source, 0, 0, 1)]


def _parquet_rows(path: str) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def _hf_rows(path: str) -> int:
    import datasets
    return len(datasets.load_from_disk(path))


# ---------------------------------------------------------------- reading
# What a damaged or vanished file raises: pyarrow's errors are OSError / ValueError subclasses,
# datasets raises FileNotFoundError, and a truncated JSON file a JSON or Unicode error.
UNREADABLE = (OSError, ValueError, pa.ArrowException, EOFError)
UNREADABLE_REASONS = ["unreadable_file", "unreadable_chunk"]


RawRow = tuple[int, object, "tuple[str, str] | None"]  # (line or row number, record, error)


def read_raw_rows(chunk: Chunk) -> list[RawRow]:
    """Ingest's reader, the one place it opens its input files: every row of a chunk as
    (line or row number, raw record, error), where error is (reason, message) for a row that
    could not be decoded. A file or chunk that cannot be read ends the list with one error
    row at line 0 (``unreadable_file`` / ``unreadable_chunk``) naming the range and the
    error, after the rows read before the failure."""
    return list(_guarded_rows(chunk, name_range=True))


def records_from_rows(chunk: Chunk, rows: Iterable[RawRow], fields: FieldMap) -> IngestResult:
    """The ingest step: a chunk's raw rows -> kept (RECORD_SCHEMA) and rejected
    (INGEST_REJECT_SCHEMA) rows, with the line (or row number) of each kept row. Never raises on
    a bad row: it is rejected with its reason."""
    kept, rejected, lines = [], [], []
    for line, raw, error in rows:
        row, reason = (None, error) if error else _to_record(raw, fields, chunk)
        if reason:
            rejected.append(_rejected_row(chunk, fields, line, reason, raw))
        else:
            kept.append(row)
            lines.append(line)
    return IngestResult(pa.Table.from_pylist(kept, schema=RECORD_SCHEMA),
                        pa.Table.from_pylist(rejected, schema=INGEST_REJECT_SCHEMA), {}, lines)


def read_chunk(chunk: Chunk, fields: FieldMap) -> tuple[pa.Table, pa.Table]:
    """One chunk into (kept, rejected) tables, in process: read_raw_rows, then
    records_from_rows."""
    result = records_from_rows(chunk, read_raw_rows(chunk), fields)
    return result.kept, result.rejected


def _rejected_row(chunk: Chunk, fields: FieldMap, line: int, reason: tuple[str, str],
                  raw: object) -> dict:
    text = raw.get(fields.text) if isinstance(raw, dict) else None
    rid = _maybe_str(raw.get(fields.id)) if isinstance(raw, dict) and fields.id else None
    return {
        "id": _storable(rid),
        "text": _storable(text) if isinstance(text, str) else None,
        "source": chunk.source, "reason": reason[0],
        "detail": json.dumps({"file": chunk.file, "line": line, "error": reason[1]}),
        "file": chunk.file, "line": line,
    }


def file_rows(path: str, fmt: str, source: str | None = None) -> Iterator[RawRow]:
    """Every row of one file, in process: (line or row number, raw record, error), where error is
    (reason, message) for a row, chunk or file that could not be read (line 0 for the latter two).
    For readers of small side inputs (the tasks stage's user files); corpora go through chunks."""
    for chunk in plan_chunks([(path, fmt, source)], IngestConfig(inputs=[InputSpec(path=path)])):
        yield from _guarded_rows(chunk, name_range=False)


def _guarded_rows(chunk: Chunk, name_range: bool) -> Iterator[RawRow]:
    """_raw_rows, with a file or chunk that cannot be read turned into a last error row."""
    if chunk.format == "unreadable":
        yield 0, None, ("unreadable_file", chunk.error or "unreadable")
        return
    rows = _raw_rows(chunk)
    while True:
        try:  # only reading is guarded: a bug in _to_record must crash, not pose as bad data
            item = next(rows, None)
        except UNREADABLE as err:
            where = f" (chunk {chunk.start}..{chunk.stop} of a {chunk.format} file)" if name_range else ""
            yield 0, None, ("unreadable_chunk", f"{type(err).__name__}: {err}{where}")
            return
        if item is None:
            return
        yield item


def _raw_rows(chunk: Chunk) -> Iterator[tuple[int, object, tuple[str, str] | None]]:
    """Yield (line or row number, raw record, error) for every row of a chunk."""
    if chunk.format == "jsonl":
        yield from _jsonl_rows(chunk)
    elif chunk.format == "json":
        yield from _json_rows(chunk.file)
    elif chunk.format == "parquet":
        table = _parquet_slice(chunk)
        for i, row in enumerate(table.to_pylist()):
            yield chunk.start + i + 1, row, None
    else:
        import datasets
        ds = datasets.load_from_disk(chunk.file)
        for i in range(chunk.start, chunk.stop):
            yield i + 1, ds[i], None


def _jsonl_rows(chunk: Chunk):
    with open(chunk.file, "rb") as f:
        f.seek(chunk.start)
        data = f.read(chunk.stop - chunk.start)
    for offset, raw_line in enumerate(data.split(b"\n")):
        if not raw_line.strip():
            continue  # blank lines are not rows
        line = chunk.first_line + offset
        try:
            text = raw_line.decode("utf-8")
        except UnicodeDecodeError as err:
            yield line, None, ("not_utf8", str(err))
            continue
        try:
            yield line, json.loads(text), None
        except json.JSONDecodeError as err:
            yield line, None, ("bad_json", str(err))


def _json_rows(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as err:
        yield 1, None, ("not_utf8", str(err))
        return
    except json.JSONDecodeError as err:
        yield err.lineno, None, ("bad_json", str(err))
        return
    if isinstance(data, dict):  # {"data": [...]} or {"rows": [...]} or one record
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    if not isinstance(data, list):
        yield 1, None, ("not_a_record", f"top-level JSON is {type(data).__name__}")
        return
    for i, row in enumerate(data):
        yield i + 1, row, None


def _parquet_slice(chunk: Chunk) -> pa.Table:
    pf = pq.ParquetFile(chunk.file)
    tables, seen = [], 0
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        lo, hi = max(chunk.start, seen), min(chunk.stop, seen + n)
        if lo < hi:
            tables.append(pf.read_row_group(rg).slice(lo - seen, hi - lo))
        seen += n
    return pa.concat_tables(tables) if tables else pf.schema_arrow.empty_table()


def _to_record(raw, fields: FieldMap, chunk: Chunk):
    """Map one raw row to the record schema, or return (None, (reason, message))."""
    if not isinstance(raw, dict):
        return None, ("not_a_record", f"row is {type(raw).__name__}, not an object")
    if fields.text not in raw or raw[fields.text] is None:
        return None, ("missing_text", f"no field {fields.text!r}")
    text = raw[fields.text]
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            return None, ("not_utf8", str(err))
    if not isinstance(text, str):
        return None, ("wrong_type", f"field {fields.text!r} is {type(text).__name__}, not string")
    if not text.strip():
        return None, ("empty_text", f"field {fields.text!r} is empty")
    source = chunk.source or _field(raw, fields.source) or Path(chunk.file).stem
    if not isinstance(source, str):
        return None, ("wrong_type", f"field {fields.source!r} is {type(source).__name__}, not string")
    rid = _field(raw, fields.id)
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        return None, ("wrong_type", f"field {fields.id!r} is {type(rid).__name__}, not string")
    for name, value in ((fields.text, text), (fields.source, source), (fields.id, rid)):
        if isinstance(value, str) and not _encodable(value):
            # Valid JSON ("\ud800") but not UTF-8: Arrow could not store it.
            return None, ("not_utf8", f"field {name!r} holds a lone surrogate")
    rid = str(rid) if rid not in (None, "") else content_id(text, source)
    return {"id": rid, "text": text, "source": source, "meta": _meta(raw, fields)}, None


def _storable(value: str | None) -> str | None:
    """A rejected row's string as Arrow can store it: lone surrogates backslash-escaped."""
    if value is None or _encodable(value):
        return value
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _field(raw: dict, name: str | None):
    return raw.get(name) if name else None


def _maybe_str(value) -> str | None:
    return None if value is None else str(value)


def _meta(raw: dict, fields: FieldMap) -> str:
    if fields.meta == "none":
        return "{}"
    mapped = {fields.id, fields.text, fields.source}
    keys = [k for k in raw if k not in mapped] if fields.meta == "rest" else fields.meta
    meta = {}
    for k in keys:
        v = raw.get(k)
        if k == "meta" and isinstance(v, dict):
            meta.update(v)  # an existing meta object is flattened in, not nested
        elif v is not None:
            meta[k] = v
    return json.dumps(meta, sort_keys=True, default=str)
