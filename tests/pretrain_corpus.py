"""A tiny curated corpus for training tests: offline text with domain and difficulty columns.

The text is the docstrings of standard-library modules (always on the machine). Each
document gets one of three domains by a fixed rule and a difficulty by its length, as
the difficulty stage's columns would look, so tests need no data stage to run.
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

MODULES = ("json", "inspect", "pathlib", "functools", "itertools", "collections", "textwrap",
           "argparse", "random", "statistics", "fractions", "decimal", "datetime", "calendar")
DOMAINS = ("code", "math", "history")


def documents() -> list[str]:
    docs = []
    for name in MODULES:
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80 and doc not in docs:
                docs.append(doc)
    return docs


def write_corpus(folder: Path, n_docs: int = 400, files: int = 2) -> list[Path]:
    """data/part-*.parquet with id, text, domain, difficulty; returns the file paths."""
    docs = documents()[:n_docs]
    lengths = sorted(len(d) for d in docs)
    cut1, cut2 = lengths[len(lengths) // 3], lengths[2 * len(lengths) // 3]
    rows = [{"id": f"d{i:05d}", "text": d, "domain": DOMAINS[i % len(DOMAINS)],
             "difficulty": "basic" if len(d) < cut1 else "advanced" if len(d) < cut2 else "expert"}
            for i, d in enumerate(docs)]
    data = Path(folder) / "data"
    data.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(files):
        path = data / f"part-{f:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[f::files]), path)
        paths.append(path)
    return paths


def write_tokenizer(folder: Path, files: list[Path], vocab_size: int = 512) -> Path:
    from training.tokenizer import TokenizerConfig, save_tokenizer, train_tokenizer
    texts = [t for f in files for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=vocab_size))
    return save_tokenizer(tok, folder)
