"""The demo corpus: real offline text, synthetic domain text, reasoning tasks, planted noise.

One machine (writes demo-*.jsonl and one demo-*.parquet into OUT_DIR, prints the stats):

    python -m data_engine.generators.demo_corpus OUT_DIR [--n-docs 3000] [--seed 0] \
        [--task-file tasks.jsonl --n-tasks 500]

A cluster: nothing to do by hand; the ingest stage calls ``build_demo_corpus``
when a recipe's input is ``demo: {n_docs, seed}``, and every machine with the
project installed produces the same bytes for the same seed and Python.

Everything comes from text already on the machine (see offline_text.py),
from templates (domain_text.py, tasks.py), or from the noise generators
(corpus_noise.py); nothing is downloaded.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_engine.generators.corpus_noise import (JUNK_KINDS, MALFORMED_KINDS, NEAR_DUP_MIN_WORDS, junk_text,
                                      malformed_line, near_duplicate)
from data_engine.generators.domain_text import synthetic_documents
from data_engine.generators.offline_text import COMMON_LICENSES, license_documents, stdlib_documents
from data_engine.schema import DOMAINS
from data_engine.generators.tasks import generate_tasks

# Shares of n_docs. Real text first; synthetic text also fills any shortfall of it.
DEFAULT_MIX = {
    "stdlib-doc": 0.18, "stdlib-src": 0.10, "license": 0.07, "synthetic": 0.34, "tasks": 0.15,
    "exact_dup": 0.04, "near_dup": 0.04, "junk": 0.08,
}
_REAL = ("stdlib-doc", "stdlib-src", "license")
NO_ID_FRACTION = 0.05  # rows without an id, so that ingest hashes them
MIN_DOCS = 100  # below this some domains or noise kinds would get no row
FILE_PREFIX = "demo-"


def build_demo_corpus(out_dir, n_docs: int = 3000, seed: int = 0, *, mix: dict | None = None,
                      n_jsonl_files: int = 3, parquet_fraction: float = 0.1,
                      n_malformed: int | None = None, license_dirs=(COMMON_LICENSES,)) -> dict:
    """Write the corpus into ``out_dir`` and return its stats; the same seed gives the same bytes.

    ``n_docs`` valid rows are written, plus ``n_malformed`` bad JSONL lines
    (default: one per 300 rows, at least one of each kind). Files named
    demo-* already in ``out_dir`` are replaced; other files are left alone.
    """
    mix = _check_args(out_dir, n_docs, seed, mix, n_jsonl_files, parquet_fraction, n_malformed)
    n_malformed = max(len(MALFORMED_KINDS), n_docs // 300) if n_malformed is None else n_malformed
    rng = random.Random(f"demo-corpus:{seed}")
    counts = plan_counts(n_docs, mix)
    seen: set[str] = set()
    base = _base_rows(counts, seed, rng, seen, license_dirs)
    _assign_ids(base, seed, start=0)
    noise = _noise_rows(base, counts, rng, seen)
    _assign_ids(noise, seed, start=len(base))
    rows = _drop_some_ids(base, noise, rng)
    files, bad = _write_files(Path(out_dir), rows, n_jsonl_files, parquet_fraction, n_malformed, seed, rng)
    return _stats(rows, bad, files, counts)


def plan_counts(n_docs: int, mix: dict) -> dict:
    """Rows per part; rounding leftovers go to the synthetic part."""
    total = sum(mix.values())
    counts = {k: int(n_docs * v / total) for k, v in mix.items()}
    for k in ("exact_dup", "near_dup"):
        counts[k] = max(counts[k], 1) if mix[k] > 0 else 0
    counts["junk"] = max(counts["junk"], len(JUNK_KINDS)) if mix["junk"] > 0 else 0
    counts["synthetic"] += n_docs - sum(counts.values())
    return counts


def _check_args(out_dir, n_docs, seed, mix, n_files, parquet_fraction, n_malformed) -> dict:
    if not isinstance(out_dir, (str, os.PathLike)):
        raise ValueError(f"out_dir must be a path, got {type(out_dir).__name__}")
    for name, value, low in (("n_docs", n_docs, MIN_DOCS), ("seed", seed, None),
                             ("n_jsonl_files", n_files, 1), ("n_malformed", n_malformed, 0)):
        if name == "n_malformed" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
            raise ValueError(f"{name} must be an int" + (f" >= {low}" if low is not None else "")
                             + f", got {value!r}")
    if not isinstance(parquet_fraction, (int, float)) or not 0 <= parquet_fraction <= 0.5:
        raise ValueError(f"parquet_fraction must be in [0, 0.5], got {parquet_fraction!r}")
    mix = dict(DEFAULT_MIX if mix is None else mix)
    if set(mix) != set(DEFAULT_MIX):
        raise ValueError(f"mix must have exactly the keys {sorted(DEFAULT_MIX)}, got {sorted(mix)}")
    if any(not isinstance(v, (int, float)) or v < 0 for v in mix.values()) or mix["synthetic"] <= 0:
        raise ValueError(f"mix values must be >= 0 with synthetic > 0, got {mix}")
    return mix


# ---------------------------------------------------------------- base rows
def _base_rows(counts: dict, seed: int, rng: random.Random, seen: set, license_dirs) -> list[dict]:
    docs, srcs = stdlib_documents(rng, counts["stdlib-doc"], counts["stdlib-src"])
    rows = _take(docs, counts["stdlib-doc"], rng, seen)
    rows += _take(srcs, counts["stdlib-src"], rng, seen)
    rows += _take(license_documents(license_dirs), counts["license"], rng, seen)
    shortfall = sum(counts[k] for k in _REAL) - len(rows)  # e.g. no licence files installed
    rows += _task_rows(counts["tasks"], seed, seen)
    synthetic = synthetic_documents(counts["synthetic"] + shortfall + 20, rng)
    rows += _take(synthetic, counts["synthetic"] + shortfall, None, seen)
    return rows


def _take(pool: list[dict], k: int, rng: random.Random | None, seen: set) -> list[dict]:
    """Up to k rows of ``pool`` (in a seeded random order when rng is given) with unseen texts."""
    order = rng.sample(pool, len(pool)) if rng else pool
    out = []
    for row in order:
        if len(out) == k:
            break
        if row["text"] not in seen:
            seen.add(row["text"])
            out.append(dict(row))
    return out


def _task_rows(k: int, seed: int, seen: set) -> list[dict]:
    # Own seed stream, so the corpus tasks differ from a task file written with the same seed.
    task_seed = int(hashlib.sha256(f"corpus-tasks:{seed}".encode()).hexdigest()[:8], 16)
    rows = [{"text": t.as_text(), "source": "tasks",
             "meta": {"domain": t.domain, "family": t.family, "difficulty": t.difficulty,
                      "answer": t.answer, "task_id": t.id}}
            for t in generate_tasks(k + 10, task_seed)]
    return _take(rows, k, None, seen)


def _assign_ids(rows: list[dict], seed: int, start: int) -> None:
    for i, row in enumerate(rows, start):
        row["id"] = f"demo{seed}-{i:06d}"


# ---------------------------------------------------------------- noise rows
def _noise_rows(base: list[dict], counts: dict, rng: random.Random, seen: set) -> list[dict]:
    rows = [_noise(orig["text"], "noise-dup", {"noise": "exact_dup", "of": orig["id"],
                                               "orig_source": orig["source"]})
            for orig in rng.sample(base, min(counts["exact_dup"], len(base)))]
    eligible = [r for r in base if len(r["text"].split()) >= NEAR_DUP_MIN_WORDS]
    for orig in rng.sample(eligible, min(counts["near_dup"], len(eligible))):
        text, edits, score = near_duplicate(orig["text"], rng)
        if text not in seen:  # an edit that recreates another row's text would be an exact dup
            seen.add(text)
            rows.append(_noise(text, "noise-near-dup", {
                "noise": "near_dup", "of": orig["id"], "orig_source": orig["source"],
                "edits": "+".join(edits), "jaccard": round(score, 4)}))
    for i in range(counts["junk"]):
        rows.append(_junk_row(JUNK_KINDS[i % len(JUNK_KINDS)], rng, seen))
    return rows


def _noise(text: str, source: str, meta: dict) -> dict:
    return {"text": text, "source": source, "meta": meta}


def _junk_row(kind: str, rng: random.Random, seen: set) -> dict:
    for attempt in range(50):
        text, extra = junk_text(kind, rng)
        if attempt == 49:
            text = f"{text} {len(seen)}"  # short junk has few spellings; keep it unique anyway
        if text not in seen:
            break
    seen.add(text)
    return _noise(text, "noise-pii" if kind == "pii" else "noise-junk", {"noise": kind, **extra})


def _drop_some_ids(base: list[dict], noise: list[dict], rng: random.Random) -> list[dict]:
    """Shuffle all rows and remove the id of a few base rows that no noise row points at."""
    referenced = {r["meta"]["of"] for r in noise if "of" in r["meta"]}
    free = [r["id"] for r in base if r["id"] not in referenced]
    dropped = set(rng.sample(free, min(len(free), int(NO_ID_FRACTION * len(base)))))
    rows = [({k: v for k, v in r.items() if k != "id"} if r["id"] in dropped else r) for r in base + noise]
    rows = [{k: r[k] for k in ("id", "text", "source", "meta") if k in r} for r in rows]
    rng.shuffle(rows)
    return rows


# ---------------------------------------------------------------- writing
def _write_files(out_dir: Path, rows: list[dict], n_files: int, parquet_fraction: float,
                 n_malformed: int, seed: int, rng: random.Random) -> tuple[dict, Counter]:
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in sorted(out_dir.glob(f"{FILE_PREFIX}*")):
        if old.is_file() and old.suffix in (".jsonl", ".parquet"):
            old.unlink()  # a previous, larger build must not leave extra shards behind
    n_parquet = round(len(rows) * parquet_fraction)
    shards = _split(rows[n_parquet:], n_files)
    lines = [[json.dumps(r, ensure_ascii=False).encode("utf-8") for r in shard] for shard in shards]
    bad = Counter()
    for j in range(n_malformed):
        kind = MALFORMED_KINDS[j % len(MALFORMED_KINDS)]
        shard = lines[j % n_files]
        shard.insert(rng.randint(0, len(shard)), malformed_line(kind, rng, f"demo{seed}-bad{j:04d}"))
        bad[kind] += 1
    files = {}
    for k, shard in enumerate(lines):
        name = f"{FILE_PREFIX}{k:05d}.jsonl"
        (out_dir / name).write_bytes(b"".join(line + b"\n" for line in shard))
        files[name] = len(shard)
    if n_parquet:
        name = f"{FILE_PREFIX}{n_files:05d}.parquet"
        pq.write_table(_parquet_table(rows[:n_parquet]), out_dir / name)
        files[name] = n_parquet
    return files, bad


def _split(rows: list, n: int) -> list[list]:
    size, extra = divmod(len(rows), n)
    bounds = [k * size + min(k, extra) for k in range(n + 1)]
    return [rows[bounds[k]:bounds[k + 1]] for k in range(n)]


def _parquet_table(rows: list[dict]) -> pa.Table:
    """Meta keys become columns: ingest folds extra columns into ``meta``, as it does for JSONL."""
    keys = sorted({k for r in rows for k in r["meta"]})
    floats = {k for k in keys if all(isinstance(r["meta"].get(k, 0.0), float) for r in rows)}
    fields = [pa.field(n, pa.string()) for n in ("id", "text", "source")]
    fields += [pa.field(k, pa.float64() if k in floats else pa.string()) for k in keys]
    data = [{"id": r.get("id"), "text": r["text"], "source": r["source"],
             **{k: (v if k in floats else str(v)) for k, v in r["meta"].items()}} for r in rows]
    return pa.Table.from_pylist(data, schema=pa.schema(fields))


def _stats(rows: list[dict], bad: Counter, files: dict, counts: dict) -> dict:
    noise = Counter(r["meta"]["noise"] for r in rows if "noise" in r["meta"])
    families = Counter(r["meta"]["family"] for r in rows if r["source"] == "tasks")
    return {
        "n_docs": len(rows),
        "n_malformed": sum(bad.values()),
        "n_lines": sum(n for name, n in files.items() if name.endswith(".jsonl")),
        "by_source": dict(sorted(Counter(r["source"] for r in rows).items())),
        "noise": {k: noise.get(k, 0) for k in ("exact_dup", "near_dup", *JUNK_KINDS)},
        "malformed": {k: bad.get(k, 0) for k in MALFORMED_KINDS},
        "domains": {d: sum(r["source"] == f"synthetic-{d}" for r in rows) for d in DOMAINS},
        "task_families": dict(sorted(families.items())),
        "no_id": sum("id" not in r for r in rows),
        "planned": counts,
        "files": files,
    }


# ---------------------------------------------------------------- task file and CLI
def write_task_file(path, n: int, seed: int, families=None, difficulties=None) -> dict:
    """Write ``n`` tasks as JSONL (Task fields) for SFT / DPO / RL; read back with tasks.load_tasks."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a path, got {type(path).__name__}")
    tasks = generate_tasks(n, seed, families=families, difficulties=difficulties)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    lines = (json.dumps(t.to_dict(), ensure_ascii=False) + "\n" for t in tasks)
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, path)  # readers never see half a file
    return {"path": str(path), "n_tasks": len(tasks),
            "by_family": dict(sorted(Counter(t.family for t in tasks).items())),
            "by_difficulty": dict(sorted(Counter(t.difficulty for t in tasks).items()))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_engine.generators.demo_corpus",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--n-docs", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task-file", default=None, help="also write reasoning tasks (JSONL) here")
    parser.add_argument("--n-tasks", type=int, default=500)
    args = parser.parse_args(argv)
    try:
        stats = build_demo_corpus(args.out_dir, n_docs=args.n_docs, seed=args.seed)
        if args.task_file:
            stats["task_file"] = write_task_file(args.task_file, args.n_tasks, args.seed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
