"""The shipped domain student: build it from text, save it small, load it fast.

Why a shipped file: 470 seed paragraphs cannot teach a word model the
vocabulary of 18 fields (orcas, jaundice, karst...). WordNet can. Each WordNet
synset ("lemmas: gloss; examples") gets a weak domain label from the nearest
anchor synset above it in the hypernym / topic-domain graph
(resources/domain_wordnet_anchors.json: animal -> biology, disease ->
medicine, ...). The student trains on the seed, its sentences, the lexicon and
these glosses. WordNet comes from Debian's ``wordnet-base`` package, needed
only to build, so the result ships as resources/domain_student.npz
(int8 weights of the touched hash buckets, a few MB) and loads in well under
a second, with no WordNet at run time.

Distillation (``--distill``, needs the domains-teacher extra): the teacher
labels offline unlabelled text (WordNet glosses from all of WordNet, Python
stdlib docstrings, a few synthetic paragraphs from domain_text.py), rows with
a vote share >= --min-share join the training set. Embeddings are cached per
chunk under ~/.cache/r1pipe/domain_pool, so a killed build resumes. With the
pool tried so far (3,270 rows, 1,317 kept) it did not beat the plain student,
so the shipped file is built without it.

``--cv-folds 5`` cross-validates on the seed (each fold's teacher and student
never see the held-out paragraphs) and prints the cascade threshold table the
default ``DomainsConfig.cascade_threshold`` was chosen from.

Rebuild (one machine; nothing differs on a cluster, the file is just shipped)::

    apt-get install wordnet-base
    python -m data_engine.domain_student            # writes resources/domain_student.npz
    python -m data_engine.domain_student --teacher-cache   # + domain_teacher_seed.npz
    python -m data_engine.domain_student --cv-folds 5      # + the cascade threshold table
    python benchmarks/domain_accuracy.py --method all      # dev macro accuracy, docs/s

Shapes: F = 2**hash_bits features, T = touched features, D = 18 domains.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import random
import re
import sysconfig
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np

from data_engine.domains import (LEXICON_PATH, RESOURCES, SEED_PATH, DomainsConfig,
                                 HashedLinearModel, TeacherModel, balanced_weights, load_labelled,
                                 sentence_splits, top_two, training_set, write_teacher_cache)
from data_engine.schema import DOMAINS

STUDENT_PATH = RESOURCES / "domain_student.npz"
ANCHORS_PATH = RESOURCES / "domain_wordnet_anchors.json"
WORDNET_DIR = Path("/usr/share/wordnet")
FORMAT_VERSION = 1  # bump when the featurizer changes: old files must not load
# Pointers that lead from a synset towards its anchor: hypernym, instance
# hypernym, topic domain. Membership (region, usage) is too loose a tie.
_UP_POINTERS = {"@", "@i", ";c"}


# ------------------------------------------------------------------ wordnet

def read_wordnet(wordnet_dir: Path) -> dict[str, dict]:
    """key "n00015388" -> {"lemmas": [...], "gloss": str, "up": [keys]}."""
    synsets = {}
    for pos, tag in (("noun", "n"), ("verb", "v"), ("adj", "a")):
        path = Path(wordnet_dir) / f"data.{pos}"
        if not path.exists():
            raise ValueError(f"no WordNet at {wordnet_dir} (missing {path.name}): "
                             "apt-get install wordnet-base")
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.startswith(" "):
                    key, synset = _parse_data_line(line, tag)
                    synsets[key] = synset
    return synsets


def _parse_data_line(line: str, tag: str) -> tuple[str, dict]:
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    n_words = int(fields[3], 16)
    lemmas = [re.sub(r"\(.*\)$", "", fields[4 + 2 * i]).replace("_", " ") for i in range(n_words)]
    at = 4 + 2 * n_words
    n_ptrs = int(fields[at])
    up = []
    for i in range(n_ptrs):
        symbol, offset, pos = fields[at + 1 + 4 * i: at + 4 + 4 * i]
        if symbol in _UP_POINTERS:
            up.append(("a" if pos == "s" else pos) + offset)
    return tag + fields[0], {"lemmas": lemmas, "gloss": gloss.strip(), "up": up}


def resolve_anchor(spec: str, wordnet_dir: Path) -> str:
    """'plant#2' -> the key of the second noun sense of 'plant'."""
    lemma, _, sense = spec.partition("#")
    with open(Path(wordnet_dir) / "index.noun", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if fields and fields[0] == lemma:
                offsets = fields[-int(fields[2]):]
                k = int(sense or 1)
                if not 1 <= k <= len(offsets):
                    raise ValueError(f"anchor {spec!r}: '{lemma}' has {len(offsets)} senses")
                return "n" + offsets[k - 1]
    raise ValueError(f"anchor {spec!r}: no noun '{lemma}' in WordNet")


def weak_labels(synsets: dict[str, dict], anchors: dict[str, str]) -> dict[str, int]:
    """Multi-source BFS down from the anchors: each synset takes the domain of
    its nearest anchor (ties: the anchor listed first); -1 under a block."""
    children: dict[str, list[str]] = {}
    for key, synset in synsets.items():
        for parent in synset["up"]:
            children.setdefault(parent, []).append(key)
    label = {key: DOMAINS.index(d) if d in DOMAINS else -1 for key, d in anchors.items()}
    queue = deque(anchors)
    while queue:
        key = queue.popleft()
        for child in children.get(key, ()):
            if child not in label:
                label[child] = label[key]
                queue.append(child)
    return label


def wordnet_documents(wordnet_dir: Path, anchors_path: Path, per_domain: int,
                      seed: int) -> tuple[list[str], np.ndarray]:
    """Weakly labelled glosses, at most `per_domain` per domain (a seeded sample)."""
    spec = json.loads(Path(anchors_path).read_text(encoding="utf-8"))
    anchors = {resolve_anchor(s, wordnet_dir): d
               for d in ("_block",) + DOMAINS for s in spec.get(d, [])}
    synsets = read_wordnet(wordnet_dir)
    labels = weak_labels(synsets, anchors)
    rng = np.random.default_rng(seed)
    texts, ys = [], []
    for d in range(len(DOMAINS)):
        keys = sorted(k for k, lab in labels.items() if lab == d and k in synsets)
        for key in rng.permutation(keys)[:per_domain]:
            syn = synsets[key]
            texts.append(", ".join(syn["lemmas"]) + ": " + syn["gloss"].replace('"', ""))
            ys.append(d)
    return texts, np.asarray(ys, dtype=np.int64)


# ------------------------------------------------------------ distillation

def wordnet_glosses(wordnet_dir: Path, n: int, seed: int) -> list[str]:
    """A seeded sample of `n` glosses from all of WordNet, anchored or not:
    the teacher labels what the hypernym anchors could not reach."""
    texts = sorted({", ".join(s["lemmas"]) + ": " + s["gloss"].replace('"', "")
                    for s in read_wordnet(wordnet_dir).values()})
    texts = [t for t in texts if len(t.split()) >= 8]
    return [texts[i] for i in np.random.default_rng(seed).permutation(len(texts))[:n]]


def stdlib_docstrings(n: int, seed: int) -> list[str]:
    """First paragraphs of the Python standard library's docstrings (>= 8 words)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = set()
    for path in sorted(root.rglob("*.py")):
        if {"test", "tests", "idlelib", "lib2to3", "site-packages"} & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                paragraph = " ".join((ast.get_docstring(node) or "").split("\n\n")[0].split())
                if len(paragraph.split()) >= 8:
                    found.add(paragraph[:400])  # the first sentences carry the topic
    texts = sorted(found)
    return [texts[i] for i in np.random.default_rng(seed).permutation(len(texts))[:n]]


def distill_pool(wordnet_dir: Path | None, sizes: dict[str, int], seed: int) -> dict[str, list[str]]:
    """Unlabelled offline text by source. The synthetic paragraphs are easy
    (a small vocabulary per domain), so they get a small share."""
    from data_engine.generators.domain_text import synthetic_documents  # only the build needs it
    pool = {"stdlib": stdlib_docstrings(sizes["stdlib"], seed),
            "synthetic": [d["text"] for d in synthetic_documents(sizes["synthetic"], random.Random(seed))]}
    if wordnet_dir is not None and Path(wordnet_dir).exists():
        pool["wordnet"] = wordnet_glosses(wordnet_dir, sizes["wordnet"], seed)
    return pool


def embed_cached(texts: list[str], encoder, cache_dir: Path, chunk: int = 256) -> np.ndarray:
    """(N, E) teacher embeddings, one file per chunk named by the chunk's
    hash: a killed build resumes, and a larger pool reuses the chunks of a
    smaller one (each source is a prefix of one seeded permutation)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    for start in range(0, len(texts), chunk):
        block = texts[start:start + chunk]
        path = cache_dir / (hashlib.sha256("\0".join(block).encode()).hexdigest()[:24] + ".npy")
        if not path.exists():
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, encoder.encode(block).astype(np.float16))
            os.replace(tmp, path)
        parts.append(np.load(path).astype(np.float32))
    return np.concatenate(parts) if parts else np.zeros((0, 384), np.float32)


def embed_pool(pool: dict[str, list[str]], encoder, cache_dir: Path
               ) -> tuple[list[str], np.ndarray, list[str]]:
    """All sources -> texts, (N, E) embeddings, source name per row."""
    texts, parts, sources = [], [], []
    for source, rows in pool.items():
        start = time.perf_counter()
        parts.append(embed_cached(rows, encoder, cache_dir))
        texts += rows
        sources += [source] * len(rows)
        print(f"embedded {len(rows)} {source} rows in {time.perf_counter() - start:.0f} s", flush=True)
    return texts, np.concatenate(parts), sources


def distilled_set(teacher: TeacherModel, texts: list[str], emb_NE: np.ndarray,
                  min_share: float) -> tuple[list[str], np.ndarray]:
    """The teacher's label for each pool row whose vote share is >= min_share."""
    best, share, _ = top_two(teacher.vote(emb_NE))
    keep = np.flatnonzero(share >= min_share)
    return [texts[i] for i in keep], best[keep]


# ------------------------------------------------------------ build and I/O

def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def train_student(cfg: DomainsConfig, glosses: tuple[list[str], np.ndarray],
                  distilled: tuple[list[str], np.ndarray], pool_weight: float = 0.3,
                  distill_weight: float = 0.3) -> tuple[HashedLinearModel, dict]:
    """Seed + lexicon (class-balanced, total mass 1), WordNet glosses
    (class-balanced, mass `pool_weight`) and teacher-labelled pool rows
    (class-balanced, mass `distill_weight`). Unbalanced, the pool's skew
    (stdlib docstrings are all "code") taught the student that generic
    words like "return" or "value" mean code."""
    seed_t, seed_y = training_set(cfg)
    (gloss_t, gloss_y), (dist_t, dist_y) = glosses, distilled
    weights = [balanced_weights(seed_y) / len(DOMAINS),
               pool_weight * balanced_weights(gloss_y) / len(DOMAINS),
               distill_weight * balanced_weights(dist_y) / len(DOMAINS)]
    model = HashedLinearModel(cfg).fit(seed_t + gloss_t + dist_t,
                                       np.concatenate([seed_y, gloss_y, dist_y]),
                                       np.concatenate(weights))
    meta = {"format": FORMAT_VERSION, "hash_bits": cfg.hash_bits, "max_tokens": cfg.max_tokens,
            "seed_sha256": _sha256(cfg.seed_path or SEED_PATH),
            "lexicon_sha256": _sha256(cfg.lexicon_path or LEXICON_PATH) if cfg.use_lexicon else None,
            "anchors_sha256": _sha256(ANCHORS_PATH), "wordnet_docs": len(gloss_t),
            "wordnet_per_domain": np.bincount(gloss_y, minlength=len(DOMAINS)).tolist(),
            "distilled_docs": len(dist_t),
            "distilled_per_domain": np.bincount(dist_y, minlength=len(DOMAINS)).tolist(),
            "seed_docs": len(seed_t), "pool_weight": pool_weight,
            "distill_weight": distill_weight, "epochs": cfg.epochs}
    return model, meta


def save_student(model: HashedLinearModel, meta: dict, path: Path) -> None:
    """Touched rows only, int8 with one scale per row: ~20x smaller than dense."""
    touched = np.flatnonzero(np.abs(model.weight_FD).max(axis=1) > 0).astype(np.int32)
    rows_TD = model.weight_FD[touched]
    scale_T = np.abs(rows_TD).max(axis=1) / 127.0
    q_TD = np.round(rows_TD / scale_T[:, None]).astype(np.int8)
    np.savez_compressed(path, touched=touched, q=q_TD, scale=scale_T.astype(np.float32),
                        bias=model.bias_D, meta=np.array(json.dumps(meta, sort_keys=True)))


def load_student(path: Path, cfg: DomainsConfig) -> HashedLinearModel:
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        if meta.get("format") != FORMAT_VERSION or meta.get("hash_bits") != cfg.hash_bits:
            raise ValueError(f"{path}: built with format {meta.get('format')} and hash_bits "
                             f"{meta.get('hash_bits')}; domains.hash_bits is {cfg.hash_bits} "
                             "(rebuild: python -m data_engine.domain_student)")
        model = HashedLinearModel(cfg)
        model.weight_FD[z["touched"]] = z["q"].astype(np.float32) * z["scale"][:, None]
        model.bias_D[:] = z["bias"]
        model.meta = meta
    return model


# -------------------------------------------------------- cascade threshold

THRESHOLDS = np.round(np.arange(0.10, 0.91, 0.05), 2)


def seed_folds(labels: np.ndarray, folds: int) -> np.ndarray:
    """Fold id per seed paragraph, dealt round-robin within each domain."""
    fold = np.zeros(len(labels), np.int64)
    for d in range(len(DOMAINS)):
        rows = np.flatnonzero(labels == d)
        fold[rows] = np.arange(len(rows)) % folds
    return fold


def cross_validate(cfg: DomainsConfig, glosses, pool_texts: list[str], pool_NE: np.ndarray,
                   args: argparse.Namespace, tmp_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out seed paragraphs -> gold (P,), student probs (P, D), teacher
    vote shares (P, D). Each fold's teacher drops the held-out paragraphs and
    their sentences, relabels the pool, and the fold's student trains on that."""
    texts, labels = load_labelled(SEED_PATH)
    fold = seed_folds(labels, args.cv_folds)
    teacher = TeacherModel(DomainsConfig(method="teacher"))
    full_SE, full_labels = teacher.seed_SE, teacher.seed_labels
    _, owners = sentence_splits(texts, np.arange(len(texts)))  # "labels" = paragraph index
    owner_S = np.concatenate([np.arange(len(texts)), owners])
    assert len(owner_S) == len(full_SE), "teacher cache does not match the seed"
    student_PD = np.zeros((len(texts), len(DOMAINS)), np.float32)
    teacher_PD = np.zeros_like(student_PD)
    for f in range(args.cv_folds):
        held, train = fold == f, ~(fold == f)[owner_S]
        teacher.seed_SE, teacher.seed_labels = full_SE[train], full_labels[train]
        teacher_PD[held] = teacher.vote(full_SE[:len(texts)][held])
        seed_file = tmp_dir / f"seed_fold{f}.jsonl"
        seed_file.write_text("".join(json.dumps({"domain": DOMAINS[y], "text": t}) + "\n"
                                     for t, y, h in zip(texts, labels, held) if not h))
        model, _ = train_student(cfg.model_copy(update={"seed_path": seed_file}), glosses,
                                 distilled_set(teacher, pool_texts, pool_NE, args.min_share),
                                 args.pool_weight, args.distill_weight)
        student_PD[held] = model.predict_proba([t for t, h in zip(texts, held) if h])
        print(f"fold {f}: student {np.mean(student_PD[held].argmax(1) == labels[held]):.3f} "
              f"teacher {np.mean(teacher_PD[held].argmax(1) == labels[held]):.3f}", flush=True)
    return labels, student_PD, teacher_PD


def macro_accuracy(gold: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.mean([np.mean(predicted[gold == d] == d) for d in np.unique(gold)]))


def threshold_table(gold, student_PD, teacher_PD) -> list[tuple[float, float, float]]:
    """(threshold, cascade macro accuracy, fraction routed to the teacher)."""
    table = []
    for t in THRESHOLDS:
        routed = student_PD.max(axis=1) < t
        predicted = np.where(routed, teacher_PD.argmax(axis=1), student_PD.argmax(axis=1))
        table.append((float(t), macro_accuracy(gold, predicted), float(routed.mean())))
    return table


def choose_threshold(table, tolerance: float = 0.01) -> float:
    """The cheapest threshold within `tolerance` of the best cascade accuracy."""
    best = max(acc for _, acc, _ in table)
    return min(t for t, acc, _ in table if acc >= best - tolerance)


def report_cross_validation(gold, student_PD, teacher_PD) -> None:
    print(f"seed {len(gold)}-paragraph CV macro accuracy: student "
          f"{macro_accuracy(gold, student_PD.argmax(1)):.3f}, teacher {macro_accuracy(gold, teacher_PD.argmax(1)):.3f}")
    table = threshold_table(gold, student_PD, teacher_PD)
    for t, acc, routed in table:
        print(f"  cascade_threshold {t:.2f}: macro {acc:.3f}, teacher sees {routed:.0%}")
    share = teacher_PD.max(1)
    for s in (0.4, 0.5, 0.6, 0.7, 0.8):
        kept = share >= s
        print(f"  teacher vote share >= {s:.1f}: covers {kept.mean():.0%}, "
              f"accuracy {np.mean(teacher_PD[kept].argmax(1) == gold[kept]):.3f}")
    print(f"chosen cascade_threshold: {choose_threshold(table)}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Build resources/domain_student.npz")
    parser.add_argument("--out", type=Path, default=STUDENT_PATH)
    parser.add_argument("--wordnet", type=Path, default=WORDNET_DIR)
    parser.add_argument("--per-domain", type=int, default=3000)
    parser.add_argument("--pool-weight", type=float, default=0.3)
    parser.add_argument("--epochs", type=int, default=DomainsConfig().epochs)
    parser.add_argument("--teacher-cache", action="store_true",
                        help="also embed the seed for the teacher (needs the domains-teacher extra)")
    distill = parser.add_argument_group("distillation (needs the domains-teacher extra); off by "
                                        "default: it did not beat the plain student (BENCHMARKS.md)")
    distill.add_argument("--distill", action="store_true", help="add teacher-labelled pool rows")
    distill.add_argument("--distill-wordnet", type=int, default=2400)
    distill.add_argument("--distill-stdlib", type=int, default=600)
    distill.add_argument("--distill-synthetic", type=int, default=270)
    distill.add_argument("--min-share", type=float, default=0.6, help="keep teacher labels this sure")
    distill.add_argument("--distill-weight", type=float, default=0.3)
    distill.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache/r1pipe/domain_pool")
    distill.add_argument("--cv-folds", type=int, default=0,
                         help="> 1: cross-validate on the seed and print the cascade threshold table")
    args = parser.parse_args()
    start, cfg = time.perf_counter(), DomainsConfig(epochs=args.epochs)
    if args.teacher_cache:
        print(f"wrote {write_teacher_cache(DomainsConfig(method='teacher'))}")
    glosses = wordnet_documents(args.wordnet, ANCHORS_PATH, args.per_domain, cfg.random_seed)
    pool_texts, pool_NE, teacher = [], np.zeros((0, 384), np.float32), None
    if args.distill:
        sizes = {"wordnet": args.distill_wordnet, "stdlib": args.distill_stdlib,
                 "synthetic": args.distill_synthetic}
        teacher = TeacherModel(DomainsConfig(method="teacher"))
        pool_texts, pool_NE, _ = embed_pool(distill_pool(args.wordnet, sizes, cfg.random_seed),
                                            teacher.encoder, args.cache_dir)
    distilled = (distilled_set(teacher, pool_texts, pool_NE, args.min_share) if teacher
                 else ([], np.zeros(0, np.int64)))
    model, meta = train_student(cfg, glosses, distilled, args.pool_weight, args.distill_weight)
    save_student(model, meta, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) in "
          f"{time.perf_counter() - start:.0f} s; distilled rows per domain: "
          f"{dict(zip(DOMAINS, meta['distilled_per_domain']))}", flush=True)
    if args.cv_folds > 1:
        with tempfile.TemporaryDirectory() as tmp:
            report_cross_validation(*cross_validate(cfg, glosses, pool_texts, pool_NE, args, Path(tmp)))


if __name__ == "__main__":
    main()
