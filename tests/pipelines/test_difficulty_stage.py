"""The difficulty stage on real Ray and real KenLM: cross-fitted fold models, resume, errors.

The input is a hand-made `domains` stage (stdlib docstring paragraphs, three
domains, random domain scores, three shards), so only `difficulty` runs. One
run goes straight through; another is killed three times, once in each phase
(after fold 0's model, while scoring, while grading), and must resume to the
same outputs without redoing finished work.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_engine.difficulty import DifficultyConfig, domain_score_thresholds, reference_mask
from pipelines.config import load_config
from pipelines.runner import StageFailed, run_pipeline
from pipelines.store import RunStore
from tests.conftest import write_recipe
from tests.data_engine.test_difficulty import stdlib_paragraphs

SHARDS = 3


def _recipe(tmp: Path) -> Path:
    return write_recipe(tmp / "difficulty.yaml", f"""
name: difficulty
runs_dir: {tmp / 'runs'}
stages: [ingest, dedup, quality, domains, difficulty]
ray: {{num_cpus: 2}}
ingest: {{inputs: [{{path: {tmp / 'unused.jsonl'}}}]}}
dedup: {{}}
quality: {{}}
domains: {{}}
difficulty: {{memory: 64M}}
""")


def _fake_domains(runs_dir: str, run_id: str) -> None:
    """A done `domains` stage: the paragraphs with random domain scores, in SHARDS shards."""
    texts = stdlib_paragraphs()
    rng = random.Random(3)
    rows = [{"id": f"p{i:04d}", "text": t, "source": "stdlib-doc",
             "domain": ("code", "math", "law")[i % 3], "domain_score": rng.random()}
            for i, t in enumerate(texts)]
    stage = RunStore(runs_dir, run_id).stage("domains")
    manifest = stage.begin("hand-made", {}, {})
    (stage.staging / "data").mkdir()
    for k in range(SHARDS):
        pq.write_table(pa.Table.from_pylist(rows[k::SHARDS]),
                       stage.staging / "data" / f"part-{k:05d}.parquet")
    stage.publish(manifest, {})


def _mtimes(folder: Path, pattern: str) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.glob(pattern))}


def _attempt(recipe: Path, fault: str | None, store: RunStore) -> dict:
    """One run of difficulty alone (ray.data_concurrency=1: shards in order); what it left."""
    cfg = load_config(recipe, ["ray.data_concurrency=1"])
    if fault:
        with pytest.raises(StageFailed):
            run_pipeline(cfg, store.run_id, stages=["difficulty"], fault=fault)
    else:
        run_pipeline(cfg, store.run_id, stages=["difficulty"])
    work = store.stage("difficulty").work
    return {"models": _mtimes(work / "kenlm", "fold*/model.binary"),
            "markers": sorted(p.name for p in (work / "kenlm").glob("fold*.json")),
            "scored": _mtimes(work / "scored" / "data", "*.parquet"),
            "scored_done": sorted(p.name for p in (work / "scored" / "done").glob("*.json")),
            "graded_done": sorted(p.name for p in (work / "shards" / "done").glob("*.json"))}


@pytest.fixture(scope="module", autouse=True)
def _fixed_code_version():
    """The fingerprint holds the git commit: a commit made while these runs go on would
    make a resume start over, which is not what they test."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("pipelines.runner.code_version", lambda: "test")
        yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("difficulty")
    recipe = _recipe(tmp)
    runs_dir = load_config(recipe).runs_dir
    for run_id in ("whole", "killed"):
        _fake_domains(runs_dir, run_id)
    whole = RunStore(runs_dir, "whole")
    _attempt(recipe, None, whole)
    killed = RunStore(runs_dir, "killed")
    attempts = [_attempt(recipe, fault, killed) for fault in
                ("difficulty:kenlm:0", "difficulty:score:after_write:1",
                 "difficulty:grade:after_write:0")]
    _attempt(recipe, None, killed)
    return {"recipe": recipe, "whole": whole, "killed": killed, "attempts": attempts}


def _rows(stage_root: Path) -> list[dict]:
    tables = [pq.read_table(p) for p in sorted((stage_root / "data").glob("*.parquet"))]
    return sorted(pa.concat_tables(tables).to_pylist(), key=lambda r: r["id"])


def test_publishes_one_model_per_fold_and_reference_rows_per_fold(runs):
    stage = runs["whole"].stage("difficulty")
    outputs = {o["path"] for o in stage.manifest()["outputs"]}
    assert {"model/kenlm-fold0.binary", "model/kenlm-fold1.binary", "model/cuts.json"} <= outputs
    m = stage.manifest()["metrics"]
    per_fold = m["reference_rows_per_fold"]
    assert len(per_fold) == 2 and sum(per_fold) == m["reference_rows"]
    rows_per_domain = Counter(r["domain"] for r in _rows(stage.root))
    assert m["reference_rows"] == sum(round(0.3 * n) for n in rows_per_domain.values())
    # model k trains on the reference rows of the other fold (every text is non-empty)
    assert m["kenlm_train_rows_per_fold"] == [per_fold[1], per_fold[0]]


def test_reference_rows_are_graded_like_the_rest(runs):
    """The stage wires each row to the model that did not see it: with random domain
    scores the reference is ~30% of the basic rows, as of all rows (sd of that share over
    ~280 basic rows: 0.027; the bound is 3 sd). One model trained on the whole reference
    puts it far above, as test_difficulty.py shows on the same paragraphs."""
    table = pa.Table.from_pylist(_rows(runs["whole"].stage("difficulty").root))
    cfg = DifficultyConfig()
    in_reference = reference_mask(table, cfg, domain_score_thresholds(table, cfg))
    basic = np.array(table.column("difficulty").to_pylist()) == "basic"
    assert abs(in_reference[basic].mean() - in_reference.mean()) < 0.08


def test_killed_stage_resumes_without_retraining_or_rescoring(runs):
    after_kenlm, after_score, after_grade = runs["attempts"]
    # 1. killed once fold 0's model was saved: fold 1 never started
    assert after_kenlm["markers"] == ["fold0.json"] and not after_kenlm["scored"]
    # 2. fold 0 reused (same file), fold 1 trained; scoring killed after shard 1 was written
    assert after_score["models"]["fold0/model.binary"] == after_kenlm["models"]["fold0/model.binary"]
    assert after_score["markers"] == ["fold0.json", "fold1.json"]
    # Ray Data usually scores shard 0 before shard 1, but does not promise it: the shards that
    # finished before the kill are whichever have a marker, and shard 1 never has one
    finished = after_score["scored_done"]
    assert "part-00001.json" not in finished and set(finished) <= {f"part-{k:05d}.json" for k in range(SHARDS)}
    # 3. no model retrained, finished scored shards kept, shard 1 (written, no marker) rescored;
    #    grading (its own fault point) killed after its shard 0 was written
    assert after_grade["models"] == after_score["models"]
    for name in (f.replace(".json", ".parquet") for f in finished):
        assert after_grade["scored"][name] == after_score["scored"][name]
    assert after_grade["scored"]["part-00001.parquet"] > after_score["scored"]["part-00001.parquet"]
    assert after_grade["scored_done"] == [f"part-{k:05d}.json" for k in range(SHARDS)]
    assert after_grade["graded_done"] == []
    # 4. the last attempt finishes: nothing left to score, the same models published
    stage = runs["killed"].stage("difficulty")
    manifest = stage.manifest()
    assert manifest["status"] == "done" and manifest["attempts"] == 4
    assert manifest["metrics"]["scored_shards_reused"] == SHARDS
    published = _mtimes(stage.root / "model", "kenlm-fold*.binary")
    assert list(published.values()) == list(after_score["models"].values())  # copy2 keeps mtimes


def test_resumed_run_matches_an_uninterrupted_one(runs):
    whole, killed = runs["whole"].stage("difficulty"), runs["killed"].stage("difficulty")
    assert _rows(killed.root) == _rows(whole.root)
    for name in ("cuts.json", "kenlm-fold0.binary", "kenlm-fold1.binary"):
        assert (killed.root / "model" / name).read_bytes() == (whole.root / "model" / name).read_bytes()
    metrics = [s.manifest()["metrics"] for s in (whole, killed)]
    for key in ("reference_rows_per_fold", "kenlm_train_rows_per_fold", "tables"):
        assert metrics[0][key] == metrics[1][key]


def test_error_budget_names_the_input_shard(runs):
    cfg = load_config(runs["recipe"], ["difficulty.max_ppl=1.0", "difficulty.max_reject_fraction=0.1"])
    _fake_domains(cfg.runs_dir, "budget")
    with pytest.raises(StageFailed) as failed:  # ppl > 1 always: every row over max_ppl
        run_pipeline(cfg, "budget", stages=["difficulty"])
    worst = re.search(r"max_reject_fraction=0.1; worst: (.*)", str(failed.value)).group(1)
    assert re.findall(r"\S+\.parquet", worst) == [f"domains/data/part-{k:05d}.parquet"
                                                 for k in range(SHARDS)], worst
