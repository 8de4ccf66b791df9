"""Difficulty grading with the real KenLM estimator: perplexity, cuts, levels."""
from __future__ import annotations

import importlib
import inspect
import math
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data_engine import difficulty
from data_engine.difficulty import (GLOBAL, CrossFitScorer, DifficultyConfig, PerplexityScorer,
                                    assign_difficulty, domain_score_thresholds, find_kenlm_binaries,
                                    fold_training_mask, normalize_text, quantile_cuts,
                                    reference_mask, row_folds, train_kenlm)

REPO = Path(__file__).resolve().parents[2]
STDLIB_MODULES = ("argparse", "collections", "json", "pathlib", "re", "subprocess",
                  "functools", "itertools", "os", "shutil", "logging", "email.message", "http.client",
                  "unittest", "textwrap", "datetime", "decimal", "fractions", "statistics")


@pytest.fixture(scope="session")
def kenlm_tools() -> dict[str, Path]:
    """The real lmplz/build_binary; built with the project's script if missing."""
    try:
        return find_kenlm_binaries()
    except FileNotFoundError:
        venv = Path(sys.executable).parent.parent
        subprocess.run(["bash", str(REPO / "scripts" / "build_kenlm.sh"), str(venv)], check=True)
        return find_kenlm_binaries()


@pytest.fixture(scope="session")
def docstring_paragraphs() -> list[str]:
    return stdlib_paragraphs()


def stdlib_paragraphs() -> list[str]:
    """Real English prose available offline: stdlib docstring paragraphs, in a fixed order."""
    paragraphs = set()
    for name in STDLIB_MODULES:
        for _, obj in inspect.getmembers(importlib.import_module(name)):
            doc = inspect.getdoc(obj)
            if doc:
                paragraphs.update(p for p in doc.split("\n\n") if len(p.split()) >= 8)
    ordered = sorted(paragraphs)
    random.Random(0).shuffle(ordered)
    return ordered


@pytest.fixture(scope="session")
def model_path(kenlm_tools, docstring_paragraphs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kenlm")
    return train_kenlm(docstring_paragraphs[200:], out, DifficultyConfig(order=3, memory="64M"))


def test_train_kenlm_writes_a_binary_model(model_path):
    assert model_path.name == "model.binary" and model_path.stat().st_size > 10_000
    assert not (model_path.parent / "model.arpa").exists()  # keep_arpa = False
    lines = (model_path.parent / "reference.txt").read_text().splitlines()
    assert lines and all(line == normalize_text(line) for line in lines[:50])


def test_real_text_scores_lower_perplexity_than_shuffled(model_path, docstring_paragraphs):
    scorer = PerplexityScorer(model_path)
    held_out = docstring_paragraphs[:200]  # never seen by lmplz
    rng = random.Random(1)
    shuffled = []
    for text in held_out:
        words = text.split()
        rng.shuffle(words)
        shuffled.append(" ".join(words))
    real_ppl = np.array([scorer.perplexity(t) for t in held_out])
    shuffled_ppl = np.array([scorer.perplexity(t) for t in shuffled])
    assert np.mean(real_ppl < shuffled_ppl) >= 0.95
    assert np.median(shuffled_ppl) > 2 * np.median(real_ppl)


def test_scorer_adds_float64_ppl_and_matches_kenlm(model_path):
    import kenlm
    scorer = PerplexityScorer(model_path)
    batch = pa.table({"id": ["a", "b", "c"],
                      "text": ["Return the number of items in the list.", "", None]})
    out = scorer(batch)
    assert out.schema.field("ppl").type == pa.float64()
    ppl = out.column("ppl").to_pylist()
    assert ppl[1] == math.inf and ppl[2] == math.inf  # nothing to score: the hardest level
    line = normalize_text("Return the number of items in the list.")
    # CCNet: 10 ** (-log10 / (words + </s>)), which is exactly kenlm's own perplexity.
    assert ppl[0] == pytest.approx(kenlm.Model(str(model_path)).perplexity(line))
    assert scorer(out).column_names == out.column_names  # re-scoring replaces "ppl"


def test_normalize_text_is_one_lowercase_line():
    assert normalize_text("Café  NOIR,\n costs 12€!") == "cafe noir , costs 00 € !"


def test_train_kenlm_rejects_an_empty_reference(kenlm_tools, tmp_path):
    with pytest.raises(ValueError, match="reference subset is empty"):
        train_kenlm(["", "   "], tmp_path, DifficultyConfig())


def test_missing_binaries_name_the_build_script(monkeypatch):
    monkeypatch.setattr(difficulty.sys, "executable", "/nonexistent/bin/python")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(FileNotFoundError, match="scripts/build_kenlm.sh"):
        find_kenlm_binaries()


def levels(table: pa.Table) -> Counter:
    return Counter(table.column("difficulty").to_pylist())


def test_quantile_cut_counts_are_exact():
    ppl = list(range(1, 101))
    random.Random(3).shuffle(ppl)
    table = pa.table({"ppl": pa.array(ppl, pa.float64())})
    cfg = DifficultyConfig(per_domain=False)
    cuts = quantile_cuts(table, cfg)
    assert cuts == {GLOBAL: (30.0, 60.0)}
    assert levels(assign_difficulty(table, cuts)) == {"basic": 30, "advanced": 30, "expert": 40}
    cuts = quantile_cuts(table, DifficultyConfig(per_domain=False, quantiles=[0.25, 0.9]))
    assert levels(assign_difficulty(table, cuts)) == {"basic": 25, "advanced": 65, "expert": 10}


def test_ties_at_a_cut_take_the_easier_level():
    ppl = [1.0] * 10 + [2.0] * 10 + [3.0] * 10  # cut 1 lands inside the 1.0 block
    table = pa.table({"ppl": ppl})
    cuts = quantile_cuts(table, DifficultyConfig(per_domain=False, quantiles=[0.2, 0.5]))
    assert cuts[GLOBAL] == (1.0, 2.0)
    assert levels(assign_difficulty(table, cuts)) == {"basic": 10, "advanced": 10, "expert": 10}


def test_per_domain_cuts_and_global_fallback():
    domains = ["math"] * 100 + ["law"] * 100 + ["arts"] * 10
    ppl = list(range(1, 101)) + list(range(1001, 1101)) + list(range(500, 510))
    table = pa.table({"domain": domains, "ppl": pa.array(ppl, pa.float64())})
    cfg = DifficultyConfig(min_rows_per_domain=50)
    cuts = quantile_cuts(table, cfg)
    assert cuts["math"] == (30.0, 60.0) and cuts["law"] == (1030.0, 1060.0)
    assert cuts["arts"] == cuts[GLOBAL] == cuts["physics"]  # 10 rows / absent: global cuts
    assert cuts[GLOBAL] == (sorted(ppl)[62], sorted(ppl)[125])  # ceil(0.3*210)=63, ceil(0.6*210)=126
    out = assign_difficulty(table, cuts)
    by_domain = Counter(zip(out.column("domain").to_pylist(), out.column("difficulty").to_pylist()))
    for domain in ("math", "law"):
        assert [by_domain[(domain, d)] for d in ("basic", "advanced", "expert")] == [30, 30, 40]
    assert by_domain[("arts", "advanced")] == 10  # 500..509 sit between the global cuts
    unknown = assign_difficulty(pa.table({"domain": ["new", None], "ppl": [1.0, 1e9]}), cuts)
    assert unknown.column("difficulty").to_pylist() == ["basic", "expert"]


def test_quantile_cuts_accept_plain_arrays():
    cuts = quantile_cuts({"ppl": np.arange(1, 11, dtype=float), "domain": ["code"] * 10},
                         DifficultyConfig(min_rows_per_domain=5))
    assert cuts["code"] == (3.0, 6.0)


def test_config_validation_names_the_key():
    for bad in ([0.6, 0.3], [0.3], [0.0, 0.5], [0.3, 1.0]):
        with pytest.raises(ValueError, match="quantiles"):
            DifficultyConfig(quantiles=bad)
    with pytest.raises(ValueError, match="memory"):
        DifficultyConfig(memory="lots")
    with pytest.raises(ValueError, match="reference_sources"):
        DifficultyConfig(reference="sources")
    with pytest.raises(ValueError, match="ordr"):
        DifficultyConfig(ordr=3)
    with pytest.raises(ValueError, match="order"):
        DifficultyConfig(order=9)


def test_reference_fraction_is_stable_across_batches():
    ids = [f"doc{i}" for i in range(2000)]
    table = pa.table({"id": ids, "text": ["x"] * 2000})
    cfg = DifficultyConfig(reference="fraction", reference_fraction=0.25)
    whole = reference_mask(table, cfg)
    split = np.concatenate([reference_mask(table.slice(0, 700), cfg),
                            reference_mask(table.slice(700), cfg)])
    assert np.array_equal(whole, split)
    assert 0.22 < whole.mean() < 0.28


def test_reference_by_source_and_by_top_domain_score():
    table = pa.table({"id": ["a", "b", "c", "d"], "source": ["wiki", "web", "wiki", "books"],
                      "domain": ["math"] * 4, "domain_score": [0.9, 0.2, 0.5, 0.7]})
    by_source = reference_mask(table, DifficultyConfig(reference="sources",
                                                       reference_sources=["wiki", "books"]))
    assert by_source.tolist() == [True, False, True, True]
    cfg = DifficultyConfig(reference_fraction=0.5)  # top_domain_score is the default
    thresholds = domain_score_thresholds(table, cfg)
    assert thresholds["math"][0] == 0.7
    assert reference_mask(table, cfg, thresholds).tolist() == [True, False, False, True]
    with pytest.raises(ValueError, match="thresholds"):
        reference_mask(table, cfg)


def test_tied_domain_scores_give_exactly_round_fraction_rows():
    # math: 600 rows at exactly 1.0 (a unanimous vote), 400 below; law: 10 at 0.9, 200 tied
    # at 0.5, 90 below. Joining every row >= the threshold would take 600 and 210 rows.
    rows = [("math", 1.0)] * 600 + [("math", 0.1 + i / 1000) for i in range(400)]
    rows += [("law", 0.9)] * 10 + [("law", 0.5)] * 200 + [("law", 0.2)] * 90
    table = pa.table({"id": [f"doc{i}" for i in range(len(rows))],
                      "domain": [d for d, _ in rows], "domain_score": [s for _, s in rows]})
    cfg = DifficultyConfig(reference_fraction=0.3)
    mask = reference_mask(table, cfg, domain_score_thresholds(table, cfg))
    domains, scores = np.array([d for d, _ in rows]), np.array([s for _, s in rows])
    assert mask[domains == "math"].sum() == 300 and mask[domains == "law"].sum() == 90
    assert mask[(domains == "math") & (scores < 1.0)].sum() == 0
    assert mask[(domains == "law") & (scores == 0.9)].all()  # above the tie: always in
    assert mask[(domains == "law") & (scores == 0.2)].sum() == 0
    # The tie-break is a hash of the id: the same rows in any order, split or batch.
    order = np.random.default_rng(0).permutation(len(rows))
    shuffled = table.take(pa.array(order))
    again = reference_mask(shuffled, cfg, domain_score_thresholds(shuffled, cfg))
    assert np.array_equal(again, mask[order])
    thresholds = domain_score_thresholds(table, cfg)
    split = np.concatenate([reference_mask(table.slice(0, 333), cfg, thresholds),
                            reference_mask(table.slice(333), cfg, thresholds)])
    assert np.array_equal(split, mask)
    one = pa.table({"id": ["only"], "domain": ["arts"], "domain_score": [0.4]})
    assert reference_mask(one, cfg, domain_score_thresholds(one, cfg)).tolist() == [True]


def test_row_folds_are_stable_balanced_and_independent_of_the_reference():
    ids = [f"doc{i}" for i in range(4000)]
    folds = row_folds(ids, 3)
    assert np.array_equal(folds[1000:], row_folds(ids[1000:], 3))
    assert set(np.bincount(folds).tolist()) <= set(range(1200, 1467))
    in_reference = reference_mask(pa.table({"id": ids}), DifficultyConfig(reference="fraction"))
    # reference = fraction hashes the id too; a shared hash would put the reference in one fold
    assert all(0.25 < in_reference[folds == k].mean() < 0.35 for k in range(3))
    with pytest.raises(ValueError, match="folds"):
        DifficultyConfig(folds=1)


# --- cross-fitting on real text: no row is graded by a model that saw it ---------------

@pytest.fixture(scope="module")
def crossfit(kenlm_tools, docstring_paragraphs, tmp_path_factory) -> dict:
    """The paragraphs as a 3-domain corpus with random domain scores (so the reference says
    nothing about the text), one model per fold, and the old single leaky model."""
    rng = random.Random(7)
    n = len(docstring_paragraphs)
    table = pa.table({"id": [f"p{i:04d}" for i in range(n)], "text": docstring_paragraphs,
                      "domain": [("code", "math", "law")[i % 3] for i in range(n)],
                      "domain_score": [rng.random() for _ in range(n)]})
    cfg = DifficultyConfig(order=3, memory="64M")
    thresholds = domain_score_thresholds(table, cfg)
    out = tmp_path_factory.mktemp("crossfit")
    models = [train_kenlm(_masked_texts(table, fold_training_mask(table, cfg, k, thresholds)),
                          out / f"fold{k}", cfg) for k in range(cfg.folds)]
    in_reference = reference_mask(table, cfg, thresholds)
    single = train_kenlm(_masked_texts(table, in_reference), out / "single", cfg)
    return {"table": table, "cfg": cfg, "models": models, "single": single,
            "in_reference": in_reference}


def _masked_texts(table: pa.Table, mask: np.ndarray) -> list[str]:
    return table.column("text").filter(pa.array(mask)).to_pylist()


def test_each_row_is_scored_by_the_model_that_did_not_see_it(crossfit):
    table, models = crossfit["table"], crossfit["models"]
    scored = CrossFitScorer(models)(table).column("ppl").to_pylist()
    folds = row_folds(table.column("id").to_pylist(), 2)
    by_model = [PerplexityScorer(m) for m in models]
    texts = table.column("text").to_pylist()
    assert all(ppl == by_model[k].perplexity(t) for ppl, k, t in zip(scored, folds, texts))
    # Fold-0 reference rows trained model 1, not model 0: model 0 finds them harder.
    seen_by_1 = [t for t, k, ref in zip(texts, folds, crossfit["in_reference"]) if k == 0 and ref]
    unseen = np.array([by_model[0].perplexity(t) for t in seen_by_1])
    seen = np.array([by_model[1].perplexity(t) for t in seen_by_1])
    assert len(seen_by_1) > 100 and np.mean(unseen > seen) > 0.95


def _reference_share_of_basic(crossfit, scorer) -> tuple[float, float]:
    scored = scorer(crossfit["table"])
    graded = assign_difficulty(scored, quantile_cuts(scored, crossfit["cfg"]))
    basic = np.array(graded.column("difficulty").to_pylist()) == "basic"
    return float(crossfit["in_reference"][basic].mean()), float(basic.mean())


def test_reference_rows_are_not_concentrated_in_basic(crossfit):
    base_rate = crossfit["in_reference"].mean()  # 0.3: the reference's share of all rows
    share, basic_rate = _reference_share_of_basic(crossfit, CrossFitScorer(crossfit["models"]))
    # The domain scores are random, so without leakage reference rows are graded like any
    # other: the share of basic rows that are reference rows is the base rate, up to the
    # sampling error of ~280 basic rows (sd sqrt(0.3 * 0.7 / 280) = 0.027; 0.08 is 3 sd).
    assert basic_rate == pytest.approx(0.3, abs=0.01)
    assert abs(share - base_rate) < 0.08, (share, base_rate)
    # The old way, one model trained on the reference scoring it, fails that bound by far.
    leaky, _ = _reference_share_of_basic(crossfit, PerplexityScorer(crossfit["single"]))
    assert leaky > base_rate + 0.3, leaky
