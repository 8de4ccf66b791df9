"""A corpus of short real documents with planted near-duplicates, for the dedup benchmark.

The generated corpus of the dedup benchmark (data_engine's Jaccard corpus) has 200-400-word
documents of one made-up language. Real corpora are full of short texts, so this one is built
from text every machine of ours has offline, in a fixed order:

- the docstrings of the Python standard library (modules, classes, functions), many under 50 words;
- the source of its functions (code: short lines, operators, repeated identifiers);
- the licence texts of /usr/share/common-licenses and the copyright files of /usr/share/doc, which
  repeat licences nearly verbatim: near-duplicates nobody planted.

``pairs`` documents of at least ``min_base_words`` words get a planted variant whose exact
word-5-gram Jaccard to its base is drawn uniformly from [0.2, 1.0] (the edit search of the
generated corpus, on the normalised words); ``truth`` lists them. Natural duplicates are scored
with ``partner_jaccard``: the exact Jaccard of a document to its most similar other document.

    records, truth = make_short_docs_corpus(18000, pairs=2000, seed=0)
"""
from __future__ import annotations

import ast
import sys
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_engine.dedup import DedupConfig
from data_engine.dedup_minhash import normalize_text, shingles
from data_engine.generators.dedup_corpus import _targets, _variant_words, true_jaccard
from data_engine.schema import RECORD_SCHEMA

SOURCE = "short_docs"


def _python_documents(root: Path) -> list[str]:
    """Docstrings, then function sources, of every standard-library module, in path order."""
    docs, code = [], []
    for path in sorted(root.rglob("*.py")):
        if "test" in path.parts or "idlelib" in path.parts or "site-packages" in path.parts:
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and doc.strip():
                    docs.append(doc.strip())
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                segment = ast.get_source_segment(source, node)
                if segment and 5 <= segment.count("\n") <= 60:
                    code.append(segment)
    return docs + code


def _licence_documents() -> list[str]:
    paths = sorted(Path("/usr/share/common-licenses").glob("*"))
    paths += sorted(Path("/usr/share/doc").glob("*/copyright"))
    texts = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            continue
        if text:
            texts.append(text[:20000])
    return texts


def collect_documents(cache: Path | None = None) -> list[str]:
    """Every offline text of the corpus, deduplicated by exact string, in a fixed order.
    Parsing the standard library takes a minute: ``cache`` keeps the result (per Python version)."""
    path = cache / f"short_docs_pool_py{sys.version_info.major}{sys.version_info.minor}.parquet" if cache else None
    if path is not None and path.exists():
        return pq.read_table(path)["text"].to_pylist()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = list(dict.fromkeys(_python_documents(stdlib) + _licence_documents()))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": texts}), path)
    return texts


def make_short_docs_corpus(n_docs: int, pairs: int, seed: int = 0, *, n: int = 5,
                           min_base_words: int = 20, cache: Path | None = None) -> tuple[pa.Table, pa.Table]:
    """(records, truth): n_docs documents, of which ``pairs`` are planted variants of others.

    truth: Table(base_id, variant_id, target, jaccard) as in make_jaccard_corpus."""
    rng = np.random.default_rng(seed)
    pool = collect_documents(cache)
    if n_docs - pairs > len(pool):
        raise ValueError(f"n_docs - pairs = {n_docs - pairs}, but this machine has only {len(pool)} "
                         "documents for the short-docs corpus")
    chosen = [pool[i] for i in sorted(rng.choice(len(pool), size=n_docs - pairs, replace=False))]
    cfg = DedupConfig(ngram=n)
    normal = [normalize_text(t, cfg).split() for t in chosen]
    vocabulary = list(Counter(w for words in normal for w in words))
    bases = [i for i, words in enumerate(normal) if len(words) >= min_base_words]
    if pairs > len(bases):
        raise ValueError(f"pairs={pairs}, but only {len(bases)} documents have {min_base_words}+ words")
    texts = list(chosen)
    planted = []
    for base, target in zip(rng.choice(bases, size=pairs, replace=False).tolist(),
                            _targets(rng, pairs, 0.2, 1.0)):
        words = normal[base]
        length = 2 * len(words)
        script = list(zip(rng.choice(["sub", "sub", "sub", "ins", "del"], size=length).tolist(),
                          rng.random(length).tolist(),
                          rng.choice(vocabulary, size=length).tolist()))
        variant = words if target >= 0.995 else _variant_words(words, float(target), n, script)
        planted.append((base, len(texts), float(target)))
        texts.append(" ".join(variant))
    ids = [f"sd{i:06d}" for i in rng.permutation(len(texts))]
    records = pa.table({"id": ids, "text": texts, "source": [SOURCE] * len(texts),
                        "meta": ["{}"] * len(texts)}, schema=RECORD_SCHEMA)
    truth = pa.table({"base_id": pa.array([ids[b] for b, _, _ in planted], pa.string()),
                      "variant_id": pa.array([ids[v] for _, v, _ in planted], pa.string()),
                      "target": pa.array([t for _, _, t in planted], pa.float64()),
                      "jaccard": pa.array([true_jaccard(texts[b], texts[v], n) for b, v, _ in planted],
                                          pa.float64())})
    return records, truth


def partner_jaccard(records: pa.Table, ids: set[str], n: int = 5) -> dict[str, float]:
    """For each of ``ids``: the exact shingle Jaccard to its most similar other document of
    ``records`` (0.0 when it shares no shingle with any), through an inverted shingle index."""
    cfg = DedupConfig(ngram=n)
    sets = [shingles(normalize_text(t, cfg), n) for t in records.column("text").to_pylist()]
    postings: dict[str, list[int]] = {}
    for doc, s in enumerate(sets):
        for sh in s:
            postings.setdefault(sh, []).append(doc)
    out = {}
    for doc, doc_id in enumerate(records.column("id").to_pylist()):
        if doc_id not in ids:
            continue
        shared = Counter(o for sh in sets[doc] for o in postings[sh] if o != doc)
        best = 0.0
        for other, common in shared.items():
            union = len(sets[doc]) + len(sets[other]) - common
            best = max(best, common / union if union else 1.0)
        out[doc_id] = best
    return out
