"""The spine on real Ray: ingest, fingerprint caching, a killed stage, W&B offline."""
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.config import load_config
from pipelines.runner import StageFailed, run_pipeline
from pipelines.store import RunStore
from tests.conftest import write_jsonl_with_malformed, write_recipe
from tests.wandb_records import logged_values, records


@pytest.fixture()
def recipe(tmp_path):
    write_jsonl_with_malformed(tmp_path / "in.jsonl")
    return write_recipe(tmp_path / "r.yaml", f"""
name: t
runs_dir: {tmp_path / 'runs'}
stages: [ingest]
ray: {{num_cpus: 2}}
ingest:
  inputs: [{{path: {tmp_path / 'in.jsonl'}}}]
  chunk_bytes: 1500
""")


def _rows(folder: Path) -> list[dict]:
    return [r for p in sorted(folder.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def test_ingest_counts_reasons_and_caching(recipe, tmp_path):
    cfg = load_config(recipe)
    [res] = run_pipeline(cfg, "r1")
    assert res.action == "ran"
    m = res.metrics
    assert (m["rows_in"], m["kept"], m["rejected"]) == (100, 95, 5)
    assert m["rejected_by_reason"] == {"bad_json": 1, "empty_text": 1, "missing_text": 1,
                                       "not_utf8": 1, "wrong_type": 1}
    stage = RunStore(cfg.runs_dir, "r1").stage("ingest")
    rejected = {r["line"]: r for r in _rows(stage.root / "rejected")}
    assert {line: r["reason"] for line, r in rejected.items()} == {
        11: "bad_json", 21: "missing_text", 31: "empty_text", 41: "wrong_type", 51: "not_utf8"}
    assert all(r["file"].endswith("in.jsonl") for r in rejected.values())
    kept = _rows(stage.root / "data")
    assert len(kept) == 95 and len({r["id"] for r in kept}) == 95
    assert json.loads(kept[0]["meta"]) == {"lang": "en"}
    manifest = stage.manifest()
    assert manifest["status"] == "done" and manifest["outputs"]
    assert all(len(o["sha256"]) == 64 for o in manifest["outputs"])
    assert not (stage.root / ".staging").exists() and not (stage.root / ".work").exists()

    [again] = run_pipeline(cfg, "r1")
    assert again.action == "skipped" and again.fingerprint == res.fingerprint

    changed = load_config(recipe, ["ingest.chunk_bytes=900"])
    [rerun] = run_pipeline(changed, "r1")
    assert rerun.action == "ran" and rerun.fingerprint != res.fingerprint
    assert rerun.metrics["kept"] == 95

    [forced] = run_pipeline(changed, "r1", force=True)
    assert forced.action == "ran" and forced.fingerprint == rerun.fingerprint


def test_killed_stage_leaves_no_done_manifest_and_resumes(recipe):
    cfg = load_config(recipe, ["ray.data_concurrency=1"])
    with pytest.raises(StageFailed):
        run_pipeline(cfg, "crash", fault="ingest:after_write:1")
    stage = RunStore(cfg.runs_dir, "crash").stage("ingest")
    assert stage.manifest()["status"] == "failed"
    assert not (stage.root / "data").exists()
    # Ray Data may run the shards in any order: shard 1 died unfinished; those that finished
    # before it keep their markers, and the resume must not redo them.
    done = stage.work / "shards" / "done"
    before = {p.name: p.stat().st_mtime_ns for p in done.glob("*.json")}
    assert "part-00001.json" not in before
    # Shard 1 is redone, and dies again: the shards finished the first time were not redone.
    with pytest.raises(StageFailed):
        run_pipeline(cfg, "crash", fault="ingest:after_write:1")
    assert {name: (done / name).stat().st_mtime_ns for name in before} == before

    [res] = run_pipeline(cfg, "crash")
    assert res.action == "ran" and stage.manifest()["resumed"] is True
    assert (res.metrics["rows_in"], res.metrics["kept"]) == (100, 95)
    assert stage.manifest()["status"] == "done"
    assert res.metrics["chunks"] > 2


def test_wandb_offline_run_holds_metric(recipe):
    cfg = load_config(recipe)
    run_pipeline(cfg, "wb")
    wandb_dir = Path(cfg.runs_dir) / "wb" / "wandb" / "wandb"
    [run_file] = sorted(wandb_dir.glob("offline-run-*/run-*.wandb"))
    values = logged_values(run_file)
    assert values["kept"] == 95 and values["rejected_by_reason/bad_json"] == 1
    [run] = [r.run for r in records(run_file) if r.WhichOneof("record_type") == "run"]
    assert (run.run_group, run.job_type) == ("wb", "ingest")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["ingest"]["chunk_bytes"] == 1500


def test_unreadable_file_is_a_rejection_within_its_budget_and_fails_beyond(recipe, tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 cut off mid-write")
    inputs = f"ingest.inputs=[{{path: {tmp_path / 'in.jsonl'}}}, {{path: {tmp_path / 'broken.parquet'}}}]"
    cfg = load_config(recipe, [inputs, "ingest.max_unreadable_file_fraction=0.5"])
    [res] = run_pipeline(cfg, "bad")
    m = res.metrics
    assert (m["rows_in"], m["kept"], m["rejected"], m["files"]) == (101, 95, 6, 2)
    assert m["rejected_by_reason"]["unreadable_file"] == 1

    strict = load_config(recipe, [inputs])  # the default budget: 1 of 2 files is over 0.1
    with pytest.raises(StageFailed, match=r"1 of 2 input file\(s\) unreadable.*broken\.parquet: "):
        run_pipeline(strict, "bad")
    assert RunStore(strict.runs_dir, "bad").stage("ingest").manifest()["status"] == "failed"
