"""How data stages hand rows on: publishing, resuming after a late failure, row accounting.

The runs folder lies under a folder named ``data`` on purpose: paths are built from their
parts, never by replacing ``/data/`` in a string.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_engine.schema import ShardResult
from pipelines.config import load_config
from pipelines.graph import StageContext
from pipelines.runner import StageFailed, check_rows_in, run_pipeline
from pipelines.stages.quality import QualityStep
from pipelines.store import RunStore, write_json_atomic
from tests.conftest import write_recipe

N_LINES = 60
BLANK, BAD_JSON = 20, 10
DUPLICATES = {30: 3, 55: 3, 46: 45}  # line -> the line whose id it repeats


def _corpus(path: Path) -> None:
    """JSONL with a blank line, a malformed row and ids repeated within and across chunks."""
    lines = []
    for line in range(1, N_LINES + 1):
        rid = f"r{DUPLICATES.get(line, line):02d}"
        if line == BLANK:
            lines.append("")
        elif line == BAD_JSON:
            lines.append('{"id": "broken", "text": ')
        else:
            lines.append(json.dumps({"id": rid, "text": f"document {line}: some words here"}))
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(autouse=True)
def _fixed_code_version(monkeypatch):
    """Fingerprints hash the git commit: one made in this checkout mid-test must not turn a
    resume into a fresh run."""
    monkeypatch.setattr("pipelines.runner.code_version", lambda: "test")


@pytest.fixture()
def recipe(tmp_path):
    _corpus(tmp_path / "in.jsonl")
    return write_recipe(tmp_path / "r.yaml", f"""
name: t
runs_dir: {tmp_path / 'data' / 'runs'}
stages: [ingest]
ray: {{num_cpus: 2}}
wandb: {{mode: disabled}}
ingest:
  inputs: [{{path: {tmp_path / 'in.jsonl'}}}]
  chunk_bytes: 400
""")


def _rows(folder: Path) -> list[dict]:
    return [r for p in sorted(folder.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def test_failure_after_publish_resumes_from_the_finished_shards(recipe):
    cfg = load_config(recipe)
    [clean] = run_pipeline(cfg, "clean")
    with pytest.raises(StageFailed):  # killed after the stage staged its outputs
        run_pipeline(cfg, "late", fault="ingest:after_run")
    stage = RunStore(cfg.runs_dir, "late").stage("ingest")
    assert stage.manifest()["status"] == "failed" and not (stage.root / "data").exists()
    markers = sorted((stage.work / "shards" / "done").glob("*.json"))
    assert len(markers) == clean.metrics["chunks"] > 2
    written = max(p.stat().st_mtime_ns for p in (stage.work / "unique" / "data").glob("*.parquet"))

    [res] = run_pipeline(cfg, "late")
    assert res.action == "ran" and stage.manifest()["resumed"] is True
    assert res.metrics == dict(clean.metrics, shards_reused=len(markers)) and clean.metrics["shards_reused"] == 0
    assert stage.manifest()["status"] == "done" and not stage.work.exists()
    # every published shard is one written before the kill: none was redone
    assert max(p.stat().st_mtime_ns for p in (stage.root / "data").glob("*.parquet")) <= written
    assert sorted(r["id"] for r in _rows(stage.root / "data")) == \
        sorted(r["id"] for r in _rows(RunStore(cfg.runs_dir, "clean").stage("ingest").root / "data"))

    [forced] = run_pipeline(cfg, "late", force=True)  # --force redoes the work from scratch
    assert forced.action == "ran" and forced.metrics == clean.metrics
    assert stage.manifest()["resumed"] is False


def test_duplicate_ids_across_shards_are_rejected_naming_the_first(recipe, tmp_path):
    cfg = load_config(recipe)
    [res] = run_pipeline(cfg, "dups")
    rows = N_LINES - 1  # the blank line is no row
    assert res.metrics["chunks"] > 5  # lines 3, 30 and 55 lie in different shards
    assert (res.metrics["rows_in"], res.metrics["kept"], res.metrics["rejected"]) == (rows, rows - 4, 4)
    assert res.metrics["rejected_by_reason"] == {"bad_json": 1, "duplicate_id": 3}
    stage = RunStore(cfg.runs_dir, "dups").stage("ingest")
    kept = {r["id"]: r["text"] for r in _rows(stage.root / "data")}
    assert len(kept) == rows - 4 and kept["r03"].startswith("document 3:")  # the first one stays
    corpus = str(tmp_path / "in.jsonl")
    moved = {r["line"]: r for r in _rows(stage.root / "rejected") if r["reason"] == "duplicate_id"}
    assert set(moved) == set(DUPLICATES)
    for line, first in DUPLICATES.items():
        r = moved[line]
        assert (r["file"], r["text"]) == (corpus, f"document {line}: some words here")
        detail = json.loads(r["detail"])
        assert detail["first"] == {"file": corpus, "line": first}
        assert detail["error"] == f"id first seen at {corpus}:{first}"


def test_killed_while_moving_duplicates_resumes_without_moving_a_row_twice(recipe, tmp_path):
    from data_engine.ingest import plan_chunks
    cfg = load_config(recipe)
    chunks = plan_chunks([(str(tmp_path / "in.jsonl"), "jsonl", None)], cfg.section("ingest"))
    holding_30 = max(i for i, c in enumerate(chunks) if c.first_line <= 30)
    with pytest.raises(StageFailed):  # killed after the first shard with a repeat is rewritten
        run_pipeline(cfg, "dupkill", fault=f"ingest:duplicate_ids:{holding_30}")
    stage = RunStore(cfg.runs_dir, "dupkill").stage("ingest")
    assert (stage.work / "unique" / "rejected" / f"part-{holding_30:05d}.parquet").exists()
    [res] = run_pipeline(cfg, "dupkill")
    rows = N_LINES - 1
    assert (res.metrics["rows_in"], res.metrics["kept"], res.metrics["rejected"]) == (rows, rows - 4, 4)
    assert res.metrics["rejected_by_reason"] == {"bad_json": 1, "duplicate_id": 3}


class DroppingQualityStep(QualityStep):
    """QualityStep with a bug: it silently loses one row of every shard."""

    def __call__(self, table: pa.Table) -> ShardResult:
        kept, rejected, counters = super().__call__(table)
        return ShardResult(kept.slice(1), rejected, counters) if kept.num_rows else \
            ShardResult(kept, rejected.slice(1), counters)


class _NoSink:
    def log(self, metrics, step=None): ...
    def table(self, key, columns, rows): ...
    def bar(self, key, label, value, rows, title): ...
    def figure(self, key, fig): ...
    def summary(self, metrics): ...
    def finish(self, exit_code=0): ...


def test_a_step_that_drops_a_row_fails_the_stage_naming_the_folder(tmp_path, monkeypatch):
    from cluster.session import RaySettings, connect
    from pipelines.config import QualitySection
    from data_engine.schema import RECORD_SCHEMA
    from pipelines.stages import quality
    for i in range(2):
        pq.write_table(pa.table({"id": [f"d{i}{j}" for j in range(3)],
                                 "text": [f"document {i}{j}: some words here" for j in range(3)],
                                 "source": ["s"] * 3, "meta": ["{}"] * 3}, schema=RECORD_SCHEMA),
                       _mkdir(tmp_path / "dedup" / "data") / f"part-{i:05d}.parquet")
    root = tmp_path / "quality"
    ctx = StageContext(name="quality", run_id="drop", config=None, section=QualitySection(),
                       root=root, out=_mkdir(root / ".staging"), work=_mkdir(root / ".work"),
                       inputs={"dedup": tmp_path / "dedup"}, sink=_NoSink(), data_concurrency=1)
    connect(RaySettings(num_cpus=2))
    monkeypatch.setattr(quality, "QualityStep", DroppingQualityStep)
    with pytest.raises(RuntimeError, match=rf"row accounting broken in {root / '.work' / 'shards'}: "
                                           r"in=6 kept=\d+ rejected=\d+"):
        quality.run(ctx)


def test_rows_in_must_equal_what_the_input_stage_kept(tmp_path):
    store = RunStore(tmp_path, "r")
    write_json_atomic(store.stage("quality").manifest_path,
                      {"status": "done", "metrics": {"rows_in": 12, "kept": 10}})
    check_rows_in(store, "domains", {"rows_in": 10, "kept": 10, "rejected": 0})
    check_rows_in(store, "tokenizer", {"vocab_size": 512})  # not a data stage: nothing to check
    with pytest.raises(RuntimeError, match=rf"row accounting broken in {store.stage('domains').root}: "
                                           r"rows_in=9, but the input stage\(s\) kept \{'quality': 10\}"):
        check_rows_in(store, "domains", {"rows_in": 9, "kept": 9, "rejected": 0})


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
