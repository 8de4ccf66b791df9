"""The four data stages on real Ray: ingest -> dedup -> quality -> domains -> difficulty.

One pipeline run is shared by every test (module fixture). It is driven the
way a user would hit it: a first attempt killed inside `quality` after its
shard 1 is written, a rerun that resumes, then a changed dedup option that
reruns everything from dedup on.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from data_engine.generators.dedup_corpus import make_jaccard_corpus
from data_engine.schema import DIFFICULTIES, DOMAINS
from pipelines.config import load_config
from pipelines.runner import StageFailed, run_pipeline
from pipelines.status import collect, render
from pipelines.store import RunStore
from tests.conftest import write_recipe
from tests.wandb_records import logged_values

DATA_STAGES = ["ingest", "dedup", "quality", "domains", "difficulty"]
EMAIL = "jane.doe@example.com"


def _corpus() -> tuple[list[dict], set[str], dict[str, str]]:
    """Rows, the ids dedup must remove, and the ids quality must reject -> reason."""
    near, _ = make_jaccard_corpus(4, seed=5, min_jaccard=0.85, max_jaccard=0.95,
                                  n_singletons=24, min_words=60, max_words=120)
    far, _ = make_jaccard_corpus(2, seed=6, min_jaccard=0.2, max_jaccard=0.3,
                                 min_words=60, max_words=120)
    texts = near.column("text").to_pylist()
    rows = [{"id": f"n{p}{side}", "text": texts[2 * p + k]}            # pairs at J 0.85-0.95
            for p in range(4) for k, side in enumerate("ab")]
    rows += [{"id": f"s{k:02d}", "text": t} for k, t in enumerate(texts[8:])]
    rows += [{"id": f"f{p}{side}", "text": t}                           # pairs at J 0.2-0.3
             for p, pair in enumerate(zip(*[iter(far.column("text").to_pylist())] * 2))
             for side, t in zip("ab", pair)]
    rows += [{"id": "x0", "text": rows[8]["text"].upper().replace(". ", ".\n\n")},  # = s00
             {"id": "x1", "text": "  " + rows[0]["text"]},                          # = n0a
             {"id": "q-short", "text": "Too short to keep."},
             {"id": "q-lorem", "text": "Lorem ipsum dolor sit amet. " + rows[9]["text"][:300]},
             {"id": "p-email", "text": rows[10]["text"][:400] + f" Write to {EMAIL} for more."}]
    removed = {"n0b", "n1b", "n2b", "n3b", "x0", "x1"}
    rejected = {"q-short": "quality:word_count", "q-lorem": "quality:junk_phrase"}
    return rows, removed, rejected


def _recipe(tmp: Path) -> Path:
    rows, _, _ = _corpus()
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return write_recipe(tmp / "data.yaml", f"""
name: data
runs_dir: {tmp / 'runs'}
stages: {DATA_STAGES}
ray: {{num_cpus: 2}}
ingest:
  inputs: [{{path: {corpus}}}]
  chunk_bytes: {corpus.stat().st_size // 4}
dedup: {{}}
quality: {{}}
domains: {{method: student}}
difficulty: {{min_rows_per_domain: 1, reference_fraction: 0.5}}
""")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    recipe = _recipe(tmp_path_factory.mktemp("data"))
    cfg = load_config(recipe)
    store = RunStore(cfg.runs_dir, "main")
    # 1. killed inside quality, after shard 1 is written but before its marker
    with pytest.raises(StageFailed):
        run_pipeline(load_config(recipe, ["ray.data_concurrency=1"]), "main",
                     fault="quality:after_write:1")
    quality = store.stage("quality")
    killed = {"status": quality.manifest()["status"],
              "done": sorted(p.name for p in (quality.work / "shards" / "done").glob("*.json")),
              "mtime": (quality.work / "shards" / "data" / "part-00001.parquet").stat().st_mtime_ns}
    # 2. the rerun resumes quality and finishes the pipeline
    resumed = {r.name: r for r in run_pipeline(cfg, "main")}
    resumed_quality = quality.manifest()
    # os.replace keeps mtimes: a reused shard's file is older than the kill
    mtimes = {p.name: p.stat().st_mtime_ns for p in (quality.root / "data").glob("*.parquet")}
    # 3. a changed dedup option reruns dedup and everything after it
    changed = {r.name: r for r in run_pipeline(load_config(recipe, ["dedup.all_pairs_max=9"]), "main")}
    return {"cfg": cfg, "store": store, "killed": killed, "resumed": resumed,
            "resumed_quality": resumed_quality, "mtimes": mtimes, "changed": changed}


def _rows(folder: Path, columns: list[str] | None = None) -> list[dict]:
    tables = [pq.read_table(p, columns=columns) for p in sorted(folder.glob("*.parquet"))]
    return pa.concat_tables(tables).to_pylist() if tables else []


def _stage(run, name: str) -> Path:
    return run["store"].stage(name).root


def test_dedup_keeps_exactly_the_expected_ids(run):
    rows, removed, _ = _corpus()
    kept = {r["id"] for r in _rows(_stage(run, "dedup") / "data", ["id"])}
    assert kept == {r["id"] for r in rows} - removed
    rejected = {r["id"]: r for r in _rows(_stage(run, "dedup") / "rejected")}
    assert set(rejected) == removed
    assert (rejected["x0"]["reason"], rejected["x0"]["duplicate_of"]) == ("exact_duplicate", "s00")
    assert (rejected["x1"]["reason"], rejected["x1"]["duplicate_of"]) == ("exact_duplicate", "n0a")
    for p in range(4):
        r = rejected[f"n{p}b"]
        assert (r["reason"], r["duplicate_of"]) == ("near_duplicate", f"n{p}a")
        assert 0.7 <= r["jaccard"] < 1.0


def test_in_equals_kept_plus_rejected_for_every_stage(run):
    previous_kept = None
    for name in DATA_STAGES:
        m = run["store"].stage(name).manifest()["metrics"]
        kept = len(_rows(_stage(run, name) / "data", ["id"]))
        rejected = _rows(_stage(run, name) / "rejected", ["id", "reason"])
        assert (m["kept"], m["rejected"]) == (kept, len(rejected))
        assert m["rows_in"] == m["kept"] + m["rejected"]
        assert m["rejected_by_reason"] == dict(Counter(r["reason"] for r in rejected))
        if previous_kept is not None:
            assert m["rows_in"] == previous_kept
        previous_kept = m["kept"]


def test_quality_rejects_with_the_rule_and_redacts_pii(run):
    _, _, expected = _corpus()
    rejected = {r["id"]: r for r in _rows(_stage(run, "quality") / "rejected")}
    assert {i: r["reason"] for i, r in rejected.items()} == expected
    assert json.loads(rejected["q-short"]["detail"])  # the measured value and threshold
    [email_row] = [r for r in _rows(_stage(run, "quality") / "data") if r["id"] == "p-email"]
    assert EMAIL not in email_row["text"] and "<EMAIL>" in email_row["text"]
    assert run["store"].stage("quality").manifest()["metrics"]["redactions"]["email"] == 1


def test_domain_and_difficulty_columns_are_valid(run):
    rows = _rows(_stage(run, "difficulty") / "data")
    assert rows and all(r["domain"] in DOMAINS and r["domain_runner_up"] in DOMAINS for r in rows)
    assert all(r["domain"] != r["domain_runner_up"] and 0 < r["domain_score"] <= 1 for r in rows)
    assert all(r["difficulty"] in DIFFICULTIES and r["ppl"] > 0 for r in rows)
    models = sorted((_stage(run, "difficulty") / "model").glob("kenlm-fold*.binary"))
    assert [p.name for p in models] == ["kenlm-fold0.binary", "kenlm-fold1.binary"]
    assert all(p.stat().st_size > 0 for p in models)
    outputs = {o["path"] for o in run["store"].stage("difficulty").manifest()["outputs"]}
    assert {"model/kenlm-fold0.binary", "model/cuts.json"} <= outputs


def test_quantile_cuts_split_every_domain_30_60(run):
    rows = _rows(_stage(run, "difficulty") / "data", ["domain", "ppl", "difficulty"])
    for domain in {r["domain"] for r in rows}:
        mine = [r for r in rows if r["domain"] == domain]
        assert len({r["ppl"] for r in mine}) == len(mine)  # distinct: the counts are exact
        levels = Counter(r["difficulty"] for r in mine)
        n = len(mine)
        assert levels["basic"] == math.ceil(0.3 * n), domain
        assert levels["basic"] + levels["advanced"] == math.ceil(0.6 * n), domain


def test_data_report_tables_status_and_wandb(run):
    kept = run["store"].stage("difficulty").manifest()["metrics"]["kept"]
    domains = run["store"].stage("domains").manifest()["metrics"]["tables"]["domain histogram"]
    assert [r[0] for r in domains["rows"]] == list(DOMAINS)
    assert sum(r[1] for r in domains["rows"]) == kept
    tables = run["store"].stage("difficulty").manifest()["metrics"]["tables"]
    grid = tables["difficulty x domain"]
    assert grid["columns"] == ["domain", *DIFFICULTIES, "total"]
    assert grid["rows"][-1][0] == "total" and grid["rows"][-1][-1] == kept
    assert sum(r[1] for r in tables["perplexity histogram"]["rows"]) == kept
    console = Console(record=True, width=200)
    render(collect(run["cfg"].runs_dir, "main"), console)
    text = console.export_text()
    assert "data funnel" in text and "difficulty x domain" in text and "domain histogram" in text
    wandb_dir = Path(run["cfg"].runs_dir) / "main" / "wandb" / "wandb"
    runs = sorted(wandb_dir.glob("offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    values = logged_values(runs[-1])  # the last stage run: difficulty
    assert values["kept"] == kept and any(k.startswith("difficulty_x_domain") for k in values)


def test_killed_stage_resumes_without_redoing_finished_shards(run):
    killed = run["killed"]
    assert killed["status"] == "failed"
    assert "part-00000.json" in killed["done"] and "part-00001.json" not in killed["done"]
    resumed = run["resumed"]
    assert [resumed[s].action for s in DATA_STAGES] == ["skipped", "skipped", "ran", "ran", "ran"]
    assert run["resumed_quality"]["resumed"] is True
    metrics = resumed["quality"].metrics
    assert metrics["shards"] > 2 and metrics["shards_reused"] == 1
    # Shard 0 was written before the kill and kept; shard 1 (written, no marker) was redone.
    written_before_kill = killed["mtime"]
    assert run["mtimes"]["part-00000.parquet"] <= written_before_kill
    assert run["mtimes"]["part-00001.parquet"] > written_before_kill
    assert resumed["quality"].metrics["rows_in"] == resumed["dedup"].metrics["kept"]


def test_changed_dedup_option_reruns_downstream_only(run):
    changed = run["changed"]
    assert [changed[s].action for s in DATA_STAGES] == ["skipped", "ran", "ran", "ran", "ran"]
    assert changed["dedup"].fingerprint != run["resumed"]["dedup"].fingerprint
    assert changed["difficulty"].metrics["kept"] == run["resumed"]["difficulty"].metrics["kept"]


def test_error_budget_fails_naming_the_worst_shards(tmp_path):
    from data_engine.schema import RECORD_SCHEMA, reject_table
    from pipelines.stages.common import shard_funnel
    stats = []
    for i, (kept, rejected) in enumerate([(9, 1), (2, 8), (5, 5)]):
        source = _mkdir(tmp_path / "dedup" / "data") / f"part-{i:05d}.parquet"  # rows_in: read here
        pq.write_table(pa.table({"id": [f"i{i}{j}" for j in range(kept + rejected)]}), source)
        pq.write_table(RECORD_SCHEMA.empty_table() if not kept else pa.table(
            {"id": [f"k{i}{j}" for j in range(kept)], "text": ["t"] * kept,
             "source": ["s"] * kept, "meta": ["{}"] * kept}, schema=RECORD_SCHEMA),
            _mkdir(tmp_path / "data") / f"part-{i:05d}.parquet")
        pq.write_table(reject_table([{"id": f"r{i}{j}", "reason": "quality:word_count"}
                                     for j in range(rejected)]),
                       _mkdir(tmp_path / "rejected") / f"part-{i:05d}.parquet")
        stats.append({"index": i, "kept": kept, "rejected": rejected,
                      "counters": {"reject:quality:word_count": rejected},
                      "item": {"path": str(source)}, "reused": i == 0})
    metrics = shard_funnel("quality", stats, tmp_path, max_fraction=0.5)
    assert (metrics["rows_in"], metrics["kept"], metrics["rejected"], metrics["shards_reused"]) == (30, 16, 14, 1)
    with pytest.raises(ValueError, match=r"max_reject_fraction=0.4; worst: "
                                         r"dedup/data/part-00001.parquet \(8 rows\), "
                                         r"dedup/data/part-00002.parquet \(5 rows\)"):
        shard_funnel("quality", stats, tmp_path, max_fraction=0.4)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
