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

Rebuild (one machine; nothing differs on a cluster, the file is just shipped)::

    apt-get install wordnet-base
    python -m data_engine.domain_student            # writes resources/domain_student.npz
    python -m data_engine.domain_student --teacher-cache   # + domain_teacher_seed.npz
    python benchmarks/domain_accuracy.py            # dev macro accuracy

Shapes: F = 2**hash_bits features, T = touched features, D = 18 domains.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from collections import deque
from pathlib import Path

import numpy as np

from data_engine.domains import (LEXICON_PATH, RESOURCES, SEED_PATH, DomainsConfig,
                                 HashedLinearModel, balanced_weights, training_set,
                                 write_teacher_cache)
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


# ------------------------------------------------------------ build and I/O

def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def train_student(cfg: DomainsConfig, wordnet_dir: Path = WORDNET_DIR,
                  per_domain: int = 3000, pool_weight: float = 0.3) -> tuple[HashedLinearModel, dict]:
    """Seed + lexicon (class-balanced, total mass 1) and WordNet glosses
    (class-balanced, total mass `pool_weight`)."""
    seed_t, seed_y = training_set(cfg)
    pool_t, pool_y = wordnet_documents(wordnet_dir, ANCHORS_PATH, per_domain, cfg.random_seed)
    weights = np.concatenate([balanced_weights(seed_y) / len(DOMAINS),
                              pool_weight * balanced_weights(pool_y) / len(DOMAINS)])
    model = HashedLinearModel(cfg).fit(seed_t + pool_t, np.concatenate([seed_y, pool_y]), weights)
    meta = {"format": FORMAT_VERSION, "hash_bits": cfg.hash_bits, "max_tokens": cfg.max_tokens,
            "seed_sha256": _sha256(cfg.seed_path or SEED_PATH),
            "lexicon_sha256": _sha256(cfg.lexicon_path or LEXICON_PATH) if cfg.use_lexicon else None,
            "anchors_sha256": _sha256(ANCHORS_PATH), "wordnet_docs": len(pool_t),
            "wordnet_per_domain": np.bincount(pool_y, minlength=len(DOMAINS)).tolist(),
            "seed_docs": len(seed_t), "pool_weight": pool_weight, "epochs": cfg.epochs}
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


def main() -> None:
    parser = argparse.ArgumentParser(description="Build resources/domain_student.npz")
    parser.add_argument("--out", type=Path, default=STUDENT_PATH)
    parser.add_argument("--wordnet", type=Path, default=WORDNET_DIR)
    parser.add_argument("--per-domain", type=int, default=3000)
    parser.add_argument("--pool-weight", type=float, default=0.3)
    parser.add_argument("--teacher-cache", action="store_true",
                        help="also embed the seed for the teacher (needs the domains-teacher extra)")
    parser.add_argument("--epochs", type=int, default=DomainsConfig().epochs)
    args = parser.parse_args()
    start = time.perf_counter()
    model, meta = train_student(DomainsConfig(epochs=args.epochs), args.wordnet,
                                args.per_domain, args.pool_weight)
    save_student(model, meta, args.out)
    if args.teacher_cache:
        print(f"wrote {write_teacher_cache(DomainsConfig(method='teacher'))}")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) in "
          f"{time.perf_counter() - start:.0f} s; WordNet docs per domain: "
          f"{dict(zip(DOMAINS, meta['wordnet_per_domain']))}")


if __name__ == "__main__":
    main()
