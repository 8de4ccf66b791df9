"""Demo corpus: deterministic, every planted defect counted, every domain present."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_engine.generators import demo_corpus, offline_text
from data_engine.generators.corpus_noise import JUNK_KINDS, MALFORMED_KINDS
from data_engine.generators.demo_corpus import build_demo_corpus, main, write_task_file
from data_engine.schema import DOMAINS
from data_engine.generators.tasks import check_answer, format_ok, generate_tasks, load_tasks

N_DOCS, SEED = 600, 3


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    stats = build_demo_corpus(out, n_docs=N_DOCS, seed=SEED)
    rows, bad = _read(out)
    return out, stats, rows, bad


def _classify(raw: bytes):
    """(row, None) for a valid record, else (None, the ingest reason it must get)."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not_utf8"
    except json.JSONDecodeError:
        return None, "bad_json"
    if row.get("text") is None:
        return None, "missing_text"
    if not isinstance(row["text"], str):
        return None, "wrong_type"
    if not row["text"].strip():
        return None, "empty_text"
    return row, None


def _read(out: Path) -> tuple[list[dict], Counter]:
    rows, bad = [], Counter()
    for path in sorted(out.glob("*.jsonl")):
        for raw in path.read_bytes().split(b"\n")[:-1]:
            row, reason = _classify(raw)
            if reason:
                bad[reason] += 1
            else:
                rows.append(row)
    for path in sorted(out.glob("*.parquet")):
        for rec in pq.read_table(path).to_pylist():
            meta = {k: v for k, v in rec.items() if k not in ("id", "text", "source") and v is not None}
            rows.append({**({"id": rec["id"]} if rec["id"] is not None else {}),
                         "text": rec["text"], "source": rec["source"], "meta": meta})
    return rows, bad


def _word_jaccard(a: str, b: str) -> float:
    def grams(t):
        w = t.lower().split()
        return {tuple(w[i:i + 5]) for i in range(len(w) - 4)}
    return len(grams(a) & grams(b)) / len(grams(a) | grams(b))


# ---------------------------------------------------------------- determinism and files
def test_same_seed_same_bytes_other_seed_other_bytes(built, tmp_path):
    out, stats, _, _ = built
    again = build_demo_corpus(tmp_path / "again", n_docs=N_DOCS, seed=SEED)
    other = build_demo_corpus(tmp_path / "other", n_docs=N_DOCS, seed=SEED + 1)
    assert again == stats
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir()) == sorted(stats["files"])
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    assert (out / names[0]).read_bytes() != (tmp_path / "other" / names[0]).read_bytes()
    assert other["n_docs"] == N_DOCS


def test_jsonl_and_one_parquet_file(built):
    out, stats, rows, bad = built
    assert [p.suffix for p in sorted(out.iterdir())] == [".jsonl", ".jsonl", ".jsonl", ".parquet"]
    n_parquet = pq.ParquetFile(out / "demo-00003.parquet").metadata.num_rows
    assert stats["files"]["demo-00003.parquet"] == n_parquet > 0
    assert len(rows) == stats["n_docs"] == N_DOCS
    assert stats["n_lines"] == N_DOCS - stats["files"]["demo-00003.parquet"] + stats["n_malformed"]


def test_a_rebuild_replaces_old_shards(tmp_path):
    build_demo_corpus(tmp_path, n_docs=200, seed=0, n_jsonl_files=5)
    (tmp_path / "keep.txt").write_text("not ours")
    stats = build_demo_corpus(tmp_path, n_docs=200, seed=0, n_jsonl_files=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*stats["files"], "keep.txt"])


# ---------------------------------------------------------------- planted defects
def test_only_the_planted_malformed_lines_fail(built):
    _, stats, _, bad = built
    assert dict(bad) == {k: v for k, v in stats["malformed"].items() if v}
    assert set(stats["malformed"]) == set(MALFORMED_KINDS) and all(stats["malformed"].values())
    assert stats["n_malformed"] == sum(bad.values()) == max(len(MALFORMED_KINDS), N_DOCS // 300)


def test_exact_duplicates_match_the_stats(built):
    _, stats, rows, _ = built
    texts = Counter(r["text"] for r in rows)
    assert sum(n - 1 for n in texts.values()) == stats["noise"]["exact_dup"] > 0
    by_id = {r["id"]: r for r in rows if "id" in r}
    dups = [r for r in rows if r["meta"].get("noise") == "exact_dup"]
    assert len(dups) == stats["noise"]["exact_dup"]
    for dup in dups:
        assert dup["id"] != dup["meta"]["of"] and by_id[dup["meta"]["of"]]["text"] == dup["text"]


def test_near_duplicates_are_close_but_not_equal(built):
    _, stats, rows, _ = built
    by_id = {r["id"]: r for r in rows if "id" in r}
    near = [r for r in rows if r["meta"].get("noise") == "near_dup"]
    assert len(near) == stats["noise"]["near_dup"] > 0
    for row in near:
        original = by_id[row["meta"]["of"]]["text"]
        assert row["text"] != original
        assert _word_jaccard(row["text"], original) >= 0.8
        assert abs(_word_jaccard(row["text"], original) - row["meta"]["jaccard"]) < 1e-3


def test_junk_counts_and_pii(built):
    _, stats, rows, _ = built
    kinds = Counter(r["meta"]["noise"] for r in rows if r["meta"].get("noise") in JUNK_KINDS)
    assert dict(kinds) == {k: stats["noise"][k] for k in JUNK_KINDS} and all(kinds.values())
    for row in rows:
        if row["meta"].get("noise") == "pii":
            assert row["source"] == "noise-pii" and row["meta"]["pii"]
            assert set(row["meta"]["pii"].split(",")) <= {"email", "phone", "ip", "api_key"}
            assert "@example.com" in row["text"] or {"ip", "api_key"} & set(row["meta"]["pii"].split(","))
        if row["meta"].get("noise") == "very_short":
            assert len(row["text"]) < 30


# ---------------------------------------------------------------- content
def test_all_domains_present_with_true_labels(built):
    _, stats, rows, _ = built
    synthetic = [r for r in rows if r["source"].startswith("synthetic-")]
    assert {r["meta"]["domain"] for r in synthetic} == set(DOMAINS)
    assert all(r["source"] == f"synthetic-{r['meta']['domain']}" for r in synthetic)
    counts = Counter(r["meta"]["domain"] for r in synthetic)
    assert stats["domains"] == {d: counts[d] for d in DOMAINS}


def test_sources_and_stats_agree(built):
    _, stats, rows, _ = built
    assert stats["by_source"] == dict(sorted(Counter(r["source"] for r in rows).items()))
    for source in ("stdlib-doc", "stdlib-src", "tasks", "noise-dup", "noise-near-dup", "noise-junk"):
        assert stats["by_source"].get(source, 0) > 0, source
    if offline_text.license_files():
        assert stats["by_source"]["license"] > 0
    code = [r["text"] for r in rows if r["source"] == "stdlib-src"]
    assert all(("def " in t or "class " in t) for t in code)


def test_task_documents_carry_their_checked_answer(built):
    _, _, rows, _ = built
    tasks = [r for r in rows if r["source"] == "tasks"]
    assert {r["meta"]["family"] for r in tasks} >= {"arithmetic", "python_eval", "linear_equation"}
    for row in tasks:
        prompt, solution = row["text"].split("\n\n<think>")
        assert format_ok("<think>" + solution) and check_answer(row["meta"]["answer"], row["text"])


def test_some_rows_have_no_id_and_ids_are_unique(built):
    _, stats, rows, _ = built
    ids = [r["id"] for r in rows if "id" in r]
    assert len(ids) == len(set(ids))
    assert len(rows) - len(ids) == stats["no_id"] > 0


# ---------------------------------------------------------------- degraded machines
def test_no_licence_files_is_filled_with_synthetic_text(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_corpus, "license_documents", lambda dirs: [])
    stats = build_demo_corpus(tmp_path, n_docs=200, seed=1)
    assert stats["n_docs"] == 200 and "license" not in stats["by_source"]
    assert sum(stats["domains"].values()) == stats["planned"]["synthetic"] + stats["planned"]["license"]


def test_missing_licence_folder_degrades_gracefully(tmp_path):
    docs = offline_text.license_documents(extra_dirs=(tmp_path / "nowhere",))
    assert all(d["source"] == "license" for d in docs)


def test_stdlib_without_source_files_falls_back_to_docstrings(monkeypatch):
    import random
    monkeypatch.setattr(offline_text, "_module_source", lambda name: None)
    docs, srcs = offline_text.stdlib_documents(random.Random(0), want_doc=20, want_src=5)
    assert len(docs) >= 20 and srcs == []
    assert all(d["source"] == "stdlib-doc" and len(d["text"]) >= 200 for d in docs)


# ---------------------------------------------------------------- task file, CLI, ingest, errors
def test_task_file_round_trip(tmp_path):
    info = write_task_file(tmp_path / "sub" / "tasks.jsonl", 40, seed=5)
    assert info["n_tasks"] == 40 and sum(info["by_family"].values()) == 40
    assert load_tasks(tmp_path / "sub" / "tasks.jsonl") == generate_tasks(40, 5)


def test_cli_writes_the_corpus_and_the_task_file(tmp_path, capsys):
    assert main([str(tmp_path / "c"), "--n-docs", "150", "--seed", "2",
                 "--task-file", str(tmp_path / "t.jsonl"), "--n-tasks", "13"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["n_docs"] == 150 and stats["task_file"]["n_tasks"] == 13
    assert main([str(tmp_path / "c"), "--n-docs", "5"]) == 2
    assert "n_docs" in capsys.readouterr().err


def test_ingest_keeps_every_row_and_rejects_every_planted_line(built):
    ingest = pytest.importorskip("data_engine.ingest")
    out, stats, _, _ = built
    cfg = ingest.IngestConfig(inputs=[ingest.InputSpec(path=str(out))])
    files = [(path, fmt, None) for path, fmt in ingest.resolve_files(cfg.inputs[0])]
    kept, reasons = 0, Counter()
    for chunk in ingest.plan_chunks(files, cfg):
        good, rejected = ingest.read_chunk(chunk, cfg.fields)
        kept += good.num_rows
        reasons.update(rejected.column("reason").to_pylist())
    assert kept == stats["n_docs"] and dict(reasons) == stats["malformed"]


@pytest.mark.parametrize("kwargs,name", [
    ({"n_docs": 10}, "n_docs"), ({"seed": "x"}, "seed"), ({"n_jsonl_files": 0}, "n_jsonl_files"),
    ({"parquet_fraction": 2}, "parquet_fraction"), ({"mix": {"synthetic": 1.0}}, "mix"),
    ({"n_malformed": -1}, "n_malformed"),
])
def test_wrong_arguments_name_themselves(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        build_demo_corpus(tmp_path, **kwargs)
    with pytest.raises(ValueError, match="^out_dir"):
        build_demo_corpus(42)
