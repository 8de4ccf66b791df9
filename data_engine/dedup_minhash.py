"""Dedup's text side: normalising, exact keys, shingling, MinHash signatures, LSH bands and
the candidate edges they give, verified by estimated Jaccard.

    sigs = signature_batch(batch, cfg)                   # Table(id, sig, n_chars)
    edges = bucket_edges(band_rows(sigs, cfg), cfg, sigs=sigs)   # Table(a, b, jaccard_est)

``cfg`` is a data_engine.dedup.DedupConfig (``optimal_bands`` derives its bands and rows).
Pure Arrow and numpy over batches; data_engine/dedup.py composes these with the survivor
choice of data_engine/dedup_survivors.py.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from functools import lru_cache
from typing import TYPE_CHECKING, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasketch import MinHash

if TYPE_CHECKING:
    from data_engine.dedup import DedupConfig

SIG_TYPE = pa.list_(pa.uint32())
EDGE_SCHEMA = pa.schema([("a", pa.string()), ("b", pa.string()), ("jaccard_est", pa.float64())])
_EMPTY_SIG = np.uint32(0xFFFFFFFF)  # datasketch's value for a set with no shingles
# Operators carry meaning in math and code ("2x + 3" is not "2x - 3"): they stay, as tokens of
# their own. A hyphen that follows a word character and precedes no digit ("well-known") is
# punctuation; any other minus ("x-3", "-5", "a - b") is an operator. Other symbols go.
# Three plain passes (each starts on a character class, so the scan stays fast): word hyphens to
# spaces, other punctuation to spaces, then operators padded into tokens.
_OPERATORS = "+*/=<>^%|&~\u00d7\u00f7\u2200-\u22ff"
_WORD_HYPHEN_RE = re.compile(r"-(?<=\w-)(?!\d)")
_PUNCT_RE = re.compile(rf"[^\w\s{_OPERATORS}-]+")
_OPERATOR_RE = re.compile(rf"[{_OPERATORS}-]")
_NGRAM_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd, so the n-gram polynomial mixes every word


# --- LSH parameters ------------------------------------------------------------

def _band_probability(s: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """P(two docs with Jaccard s share at least one band)."""
    return 1.0 - (1.0 - s ** rows) ** bands


def _area(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoid rule (np.trapezoid is numpy>=2 only)."""
    return float(((y[1:] + y[:-1]) * np.diff(x)).sum() / 2)


@lru_cache(maxsize=64)
def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5,
                  fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimising weighted FP + FN area, as datasketch's _optimal_param.

    bands * rows may be below num_perm, as in datasketch: the unused
    permutations still sharpen the Jaccard estimate used for verification.
    """
    lo, hi = np.linspace(0.0, threshold, 401), np.linspace(threshold, 1.0, 401)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = _area(_band_probability(lo, b, r), lo)
            fn = _area(1.0 - _band_probability(hi, b, r), hi)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


# --- text -> keys and signatures -------------------------------------------------

def normalize_text(text: str | None, cfg: DedupConfig) -> str:
    """The text both passes compare: NFKC, lowercased, punctuation to spaces, operators as
    tokens of their own, one space."""
    text = text or ""
    if cfg.unicode_nfkc:
        text = unicodedata.normalize("NFKC", text)
    if cfg.lowercase:
        text = text.lower()
    if cfg.strip_punctuation:
        # A space, not nothing: "foo.bar(x)" must not fuse into one word.
        text = _OPERATOR_RE.sub(r" \g<0> ", _PUNCT_RE.sub(" ", _WORD_HYPHEN_RE.sub(" ", text)))
    return " ".join(text.split())


def exact_hash(normalized: str) -> str:
    return hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).hexdigest()


def shingles(normalized: str, n: int) -> set[str]:
    """Word n-grams; a text shorter than n words is one shingle, an empty text none."""
    words = normalized.split()
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def _texts(batch: pa.Table) -> list[str]:
    return [t or "" for t in batch.column("text").to_pylist()]


def _n_chars(batch: pa.Table) -> pa.Array:
    return pc.fill_null(pc.utf8_length(batch.column("text")), 0).cast(pa.int64())


def normalized_texts(batch: pa.Table, cfg: DedupConfig) -> list[str]:
    """normalize_text of every row: computed once when a batch needs both keys and signatures."""
    return [normalize_text(t, cfg) for t in _texts(batch)]


def exact_keys(batch: pa.Table, cfg: DedupConfig, normalized: list[str] | None = None) -> pa.Table:
    """Table(id string, exact_hash string, n_chars int64): one row per record."""
    normalized = normalized if normalized is not None else normalized_texts(batch, cfg)
    hashes = [exact_hash(t) for t in normalized]
    return pa.table({"id": batch.column("id"), "exact_hash": pa.array(hashes, pa.string()),
                     "n_chars": _n_chars(batch)})


def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


def shingle_hashes(normalized: str, n: int, cache: dict[str, int] | None = None) -> list[int]:
    """32-bit hashes of the word n-grams of ``shingles()``, one per position.

    The n-gram strings are never built: each distinct word is hashed once
    (blake2b, memoised in ``cache`` across a batch) and an n-gram hashes as a
    polynomial of its words' hashes mod 2^64, high 32 bits kept. This is 3-4x
    cheaper than SHA-1 over every n-gram string, the cost that dominated
    signatures. A repeated n-gram repeats its hash, which a minimum ignores.
    """
    words = normalized.split()
    if not words:
        return []
    cache = {} if cache is None else cache
    ids = np.fromiter((cache[w] if w in cache else cache.setdefault(w, _word_hash(w))
                       for w in words), np.uint64, len(words))
    n = min(n, len(words))  # a text shorter than n words is one shingle, as in shingles()
    m = len(words) - n + 1
    h = np.zeros(m, np.uint64)
    for k in range(n):  # uint64 arithmetic wraps: the polynomial is mod 2^64
        h = h * _NGRAM_BASE + ids[k:k + m]
    return (h >> np.uint64(32)).astype(np.uint32).tolist()


def signature_batch(batch: pa.Table, cfg: DedupConfig,
                    normalized: list[str] | None = None) -> pa.Table:
    """Table(id string, sig list<uint32>[num_perm], n_chars int64) via MinHash.bulk."""
    cache: dict[str, int] = {}
    normalized = normalized if normalized is not None else normalized_texts(batch, cfg)
    sets = [shingle_hashes(t, cfg.ngram, cache) for t in normalized]
    # A fixed seed and scheme make the permutations, hence the signatures,
    # identical in every process. The items are already hashes: ``int`` passes them through.
    minhashes = MinHash.bulk(sets, num_perm=cfg.num_perm, seed=cfg.seed, scheme="affine32",
                             hashfunc=int)
    matrix = np.stack([m.hashvalues.astype(np.uint32) for m in minhashes]) if minhashes \
        else np.zeros((0, cfg.num_perm), np.uint32)
    return pa.table({"id": batch.column("id"), "sig": sig_array(matrix),
                     "n_chars": _n_chars(batch)})


def sig_array(matrix: np.ndarray) -> pa.Array:
    """(N, P) uint32 -> list<uint32> array."""
    n, p = matrix.shape
    offsets = pa.array(np.arange(0, (n + 1) * p, p, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1), pa.uint32()))


def sig_matrix(column: pa.Array | pa.ChunkedArray, num_perm: int) -> np.ndarray:
    """list<uint32> column -> (N, num_perm) uint32."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], SIG_TYPE)
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.uint32, copy=False)
    if values.size != len(column) * num_perm:
        raise ValueError(f"sig column does not hold {num_perm} values per row "
                         f"(dedup.num_perm changed between steps?)")
    return values.reshape(len(column), num_perm)


# --- LSH bands -> candidate and verified edges ----------------------------------

def band_rows(sig_batch: pa.Table, cfg: DedupConfig) -> pa.Table:
    """Table(band int32, key int64, id string): one row per (doc, band).

    Docs with no shingles (empty text) get no rows: their signatures are all
    the same sentinel and would collide with each other.
    """
    sigs = sig_matrix(sig_batch.column("sig"), cfg.num_perm)
    ids = sig_batch.column("id").to_pylist()
    live = np.flatnonzero(~np.all(sigs == _EMPTY_SIG, axis=1))
    bands, keys, out_ids = [], [], []
    for b in range(cfg.bands):
        block = np.ascontiguousarray(sigs[live, b * cfg.rows:(b + 1) * cfg.rows])
        for row, i in zip(block, live):
            digest = hashlib.blake2b(row.tobytes(), digest_size=8).digest()
            keys.append(int.from_bytes(digest, "little", signed=True))
        bands.extend([b] * len(live))
        out_ids.extend(ids[i] for i in live)
    return pa.table({"band": pa.array(bands, pa.int32()), "key": pa.array(keys, pa.int64()),
                     "id": pa.array(out_ids, pa.string())})


def _bucket_pairs(members: list[str], all_pairs_max: int) -> Iterable[tuple[str, str]]:
    """members sorted by id; all pairs for small buckets, else a star to the min id."""
    if len(members) <= all_pairs_max:
        return ((a, b) for i, a in enumerate(members) for b in members[i + 1:])
    return ((members[0], b) for b in members[1:])


def bucket_edges(group: pa.Table, cfg: DedupConfig, sigs: pa.Table | None = None) -> pa.Table:
    """Table(a, b, jaccard_est) with a < b, unique, from band rows of one or many buckets.

    With ``sigs`` (a Table(id, sig) holding at least these ids) edges are
    scored and, if cfg.verify, filtered by verify_edges. Without it,
    jaccard_est is null: candidates that still need verify_edges.
    """
    ordered = group.select(["band", "key", "id"]).sort_by(
        [("band", "ascending"), ("key", "ascending"), ("id", "ascending")])
    band = ordered.column("band").to_numpy()
    key = ordered.column("key").to_numpy()
    ids = ordered.column("id").to_pylist()
    starts = np.flatnonzero(np.r_[True, (band[1:] != band[:-1]) | (key[1:] != key[:-1]), True])
    pairs: set[tuple[str, str]] = set()
    for lo, hi in zip(starts[:-1], starts[1:]):
        if hi - lo > 1:
            pairs.update(_bucket_pairs(ids[lo:hi], cfg.all_pairs_max))
    a, b = zip(*sorted(pairs)) if pairs else ((), ())
    edges = pa.table({"a": pa.array(a, pa.string()), "b": pa.array(b, pa.string()),
                      "jaccard_est": pa.nulls(len(a), pa.float64())})
    return verify_edges(edges, sigs, cfg) if sigs is not None else edges


def _lookup_sigs(ids: pa.Array | pa.ChunkedArray, sigs: pa.Table, num_perm: int) -> np.ndarray:
    pos = pc.index_in(ids, value_set=sigs.column("id"))
    if pos.null_count:
        missing = pc.filter(ids, pc.is_null(pos))[0]
        raise ValueError(f"no signature for id {missing!r}: pass the signatures of every "
                         f"edge endpoint")
    return sig_matrix(sigs.column("sig"), num_perm)[pos.to_numpy(zero_copy_only=False)]


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Row-wise fraction of equal MinHash values: (N, P), (N, P) -> (N,)."""
    return (sig_a == sig_b).mean(axis=1) if len(sig_a) else np.zeros(0)


def verify_edges(edges: pa.Table, sigs: pa.Table, cfg: DedupConfig) -> pa.Table:
    """Score edges with estimated Jaccard; if cfg.verify keep those >= cfg.threshold.

    ``sigs`` (Table(id, sig)) holds the signature of every edge endpoint.
    """
    est = estimate_jaccard(_lookup_sigs(edges.column("a"), sigs, cfg.num_perm),
                           _lookup_sigs(edges.column("b"), sigs, cfg.num_perm))
    scored = pa.table({"a": edges.column("a"), "b": edges.column("b"),
                       "jaccard_est": pa.array(est, pa.float64())}, schema=EDGE_SCHEMA)
    if not cfg.verify:
        return scored
    # The tiny epsilon keeps e.g. 90/128 >= 0.703 from flickering on rounding.
    return scored.filter(pa.array(est >= cfg.threshold - 1e-12))


def cross_edges(left: pa.Table, right: pa.Table, cfg: DedupConfig) -> pa.Table:
    """Near-duplicate pairs *between* two tables of (id, text), none within one: Table(a, b,
    jaccard_est) with a from left and b from right, found by the same LSH bands and verified
    like dedup's own edges (the tasks stage: held-out prompts against training prompts)."""
    sigs_l, sigs_r = signature_batch(left, cfg), signature_batch(right, cfg)
    bands_l, bands_r = band_rows(sigs_l, cfg), band_rows(sigs_r, cfg)
    joined = bands_l.join(bands_r, keys=["band", "key"], join_type="inner", left_suffix="_a", right_suffix="_b")
    pairs = joined.group_by(["id_a", "id_b"]).aggregate([]).sort_by([("id_a", "ascending"), ("id_b", "ascending")])
    a, b = pairs.column("id_a"), pairs.column("id_b")
    est = estimate_jaccard(_lookup_sigs(a, sigs_l, cfg.num_perm), _lookup_sigs(b, sigs_r, cfg.num_perm))
    scored = pa.table({"a": a.cast(pa.string()), "b": b.cast(pa.string()),
                       "jaccard_est": pa.array(est, pa.float64())}, schema=EDGE_SCHEMA)
    return scored.filter(pa.array(est >= cfg.threshold - 1e-12)) if cfg.verify else scored
