"""Dedup's text side: normalising, exact keys, shingling, MinHash signatures, LSH bands and
the candidate edges they give, verified by Jaccard: exact (the candidates' shingle sets,
recomputed for them alone) or estimated from the signatures (``cfg.jaccard``).

    sigs = signature_batch(batch, cfg)                   # Table(id, sig, n_chars)
    candidates = bucket_edges(band_rows(sigs, cfg), cfg)          # Table(a, b, jaccard=null)
    members = with_shingles(sigs_of_endpoints, texts, cfg)        # + shingles, for exact
    edges = verify_edges(candidates, members, cfg)                # Table(a, b, jaccard)

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
EDGE_SCHEMA = pa.schema([("a", pa.string()), ("b", pa.string()), ("jaccard", pa.float64())])
SHINGLES_TYPE = pa.list_(pa.uint64())
_EMPTY_SIG = np.uint32(0xFFFFFFFF)  # datasketch's value for a set with no shingles
# Operators carry meaning in math and code ("2x + 3" is not "2x - 3"): they stay, as tokens of
# their own. A hyphen that follows a word character and precedes no digit ("well-known") is
# punctuation; any other minus ("x-3", "-5", "a - b") is an operator. Other symbols go.
# Three plain passes (each starts on a character class, so the scan stays fast): word hyphens to
# spaces, other punctuation to spaces, then operators padded into tokens.
_OPERATORS = "+*/=<>^%|&~\u00d7\u00f7\u2200-\u22ff"
_WORD_HYPHEN_RE = re.compile(r"-(?<=\w-)(?!\d)")
_PUNCT_RE = re.compile(rf"[^\w\s{_OPERATORS}-]+")
# Operators are padded with spaces by str.replace, once per distinct operator in the text: a
# regex with a " \g<0> " template expands it in Python for every match (slow on code).
_OPERATOR_CHARS = frozenset("+*/=<>^%|&~\u00d7\u00f7-") | frozenset(map(chr, range(0x2200, 0x2300)))
_NGRAM_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd, so the n-gram polynomial mixes every word
# MurmurHash3's 32-bit finalizer: datasketch's affine32 scheme mixes each input with it before
# its permutations a*h + b (mod 2^32); minhash_matrix applies the same to a whole batch.
_FMIX32 = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35), np.uint32(16))
_BAND_PRIME = np.uint64(0x100000001B3)  # FNV-1a's 64-bit prime: band keys fold rows with it
_MINHASH_BLOCK = 2048  # values per step of minhash_matrix


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
        if "-" in text:
            text = _WORD_HYPHEN_RE.sub(" ", text)
        text = _PUNCT_RE.sub(" ", text)
        for op in _OPERATOR_CHARS.intersection(text):
            text = text.replace(op, f" {op} ")
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


def batch_ngram_hashes(normalized: list[str], n: int, cache: dict[str, int] | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The 64-bit hashes of every text's word n-grams (one per position), concatenated, and
    the offsets (N + 1) of each text's run.

    The n-gram strings are never built: each distinct word is hashed once (blake2b, memoised
    in ``cache`` across a batch) and an n-gram hashes as a polynomial of its words' hashes mod
    2^64, for the whole batch at once. A text shorter than n words is one shingle of all its
    words (as in shingles()), an empty text none.
    """
    cache = {} if cache is None else cache
    words = [t.split() for t in normalized]
    lengths = np.fromiter(map(len, words), np.int64, len(words))
    flat = [w for ws in words for w in ws]
    for w in dict.fromkeys(flat):  # each distinct word of the batch once
        if w not in cache:
            cache[w] = _word_hash(w)
    ids = np.fromiter(map(cache.__getitem__, flat), np.uint64, len(flat))
    starts = np.r_[0, np.cumsum(lengths)[:-1]].astype(np.int64) if len(words) else lengths
    padded = np.r_[ids, np.zeros(n - 1, np.uint64)]
    h = np.zeros(len(flat), np.uint64)
    short = np.flatnonzero((lengths > 0) & (lengths < n))
    short_h = np.zeros(len(short), np.uint64)
    for k in range(n):  # uint64 arithmetic wraps: the polynomial is mod 2^64
        h = h * _NGRAM_BASE + padded[k:k + len(flat)]
        ending = lengths[short] == k + 1
        short_h[ending] = h[starts[short[ending]]]
    counts = np.where(lengths >= n, lengths - n + 1, (lengths > 0).astype(np.int64))
    offsets = np.r_[0, np.cumsum(counts)].astype(np.int64)
    doc = np.repeat(np.arange(len(words)), counts)
    values = h[starts[doc] + (np.arange(offsets[-1]) - offsets[doc])]
    values[offsets[short]] = short_h
    return values, offsets


def shingle_hashes(normalized: str, n: int, cache: dict[str, int] | None = None) -> list[int]:
    """32-bit hashes of the word n-grams of ``shingles()``, one per position: the high 32 bits
    of batch_ngram_hashes. A repeated n-gram repeats its hash, which a minimum ignores."""
    values, _ = batch_ngram_hashes([normalized], n, cache)
    return (values >> np.uint64(32)).astype(np.uint32).tolist()


def shingle_sets(normalized: list[str], n: int) -> pa.Array:
    """list<uint64>: each text's distinct word n-grams as their full 64-bit hashes, sorted.
    Exact verification compares these: two distinct n-grams of a pair share a hash with
    probability about 2^-64 per pair of n-grams."""
    values, offsets = batch_ngram_hashes(normalized, n)
    sets = [np.unique(values[lo:hi]) for lo, hi in zip(offsets[:-1], offsets[1:])]
    flat = np.concatenate(sets) if sets else np.zeros(0, np.uint64)
    bounds = np.r_[0, np.cumsum([len(x) for x in sets])].astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(bounds), pa.array(flat, pa.uint64()))


def with_shingles(members: pa.Table, texts: pa.Table, cfg: DedupConfig) -> pa.Table:
    """``members`` (with ``id``) plus ``shingles`` (shingle_sets) when cfg.jaccard is exact;
    ``texts`` is a Table(id, text) holding at least the members' ids. Unchanged otherwise."""
    if cfg.jaccard != "exact":
        return members
    if pc.count_distinct(texts.column("id")).as_py() != texts.num_rows:
        raise ValueError("exact verification needs unique ids: the texts repeat an id")
    chosen = texts.take(_rows_of(members.column("id"), texts, "no text for id {!r}: exact "
                                 "verification needs the text of every candidate"))
    return members.append_column("shingles", shingle_sets(normalized_texts(chosen, cfg), cfg.ngram))


def signature_batch(batch: pa.Table, cfg: DedupConfig,
                    normalized: list[str] | None = None) -> pa.Table:
    """Table(id string, sig list<uint32>[num_perm], n_chars int64): each text's MinHash over
    its shingle_hashes, equal to datasketch's MinHash(scheme="affine32", hashfunc=int)."""
    normalized = normalized if normalized is not None else normalized_texts(batch, cfg)
    values, offsets = batch_ngram_hashes(normalized, cfg.ngram)
    matrix = minhash_matrix((values >> np.uint64(32)).astype(np.uint32), offsets,
                            cfg.num_perm, cfg.seed)
    return pa.table({"id": batch.column("id"), "sig": sig_array(matrix),
                     "n_chars": _n_chars(batch)})


@lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> np.ndarray:
    """(2, num_perm) uint32: datasketch's (a, b) for this seed. A fixed seed and scheme make
    the permutations, hence the signatures, identical in every process."""
    return MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations


def minhash_matrix(values: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """(N, num_perm) uint32: the MinHash of each set values[offsets[i]:offsets[i + 1]] (uint32
    items), for a whole batch in a few numpy steps instead of one datasketch object per text:
    the same arithmetic (fmix32, then a * h + b mod 2^32, then the minimum) and the same
    permutations, so equal values (tests compare them with MinHash.bulk). An empty set gets
    datasketch's empty value, 0xFFFFFFFF everywhere."""
    a, b = _permutations(num_perm, seed)
    n_sets = len(offsets) - 1
    out = np.full((n_sets, num_perm), _EMPTY_SIG, np.uint32)
    filled = np.flatnonzero(offsets[1:] > offsets[:-1])
    if not len(filled):
        return out
    s1, m1, s2, m2, s3 = _FMIX32
    h = values.astype(np.uint32)
    h = h ^ (h >> s1)
    h = h * m1
    h = h ^ (h >> s2)
    h = h * m2
    h = h ^ (h >> s3)
    # Blocks of whole sets, about _MINHASH_BLOCK values each: a block's values x permutations
    # (1 MiB) stays in cache, which more than halves the time of one pass over the batch.
    sets = offsets[filled]
    cuts = np.unique(np.r_[np.searchsorted(sets, np.arange(0, offsets[-1], _MINHASH_BLOCK)),
                           len(sets)])
    for first, last in zip(cuts[:-1], cuts[1:]):
        lo, hi = sets[first], offsets[filled[last - 1] + 1]
        permuted = h[lo:hi, None] * a + b  # uint32 arithmetic wraps: mod 2^32, as datasketch's
        out[filled[first:last]] = np.minimum.reduceat(permuted, sets[first:last] - lo, axis=0)
    return out


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

    A band's key folds its rows' values into 64 bits (FNV-1a over the 32-bit values, then
    fmix64), for every doc at once; two different bands of values share a key with
    probability about 2^-64, and then only cost a verified comparison. Docs with no shingles
    (empty text) get no rows: their signatures are all the same sentinel and would collide
    with each other.
    """
    sigs = sig_matrix(sig_batch.column("sig"), cfg.num_perm)
    live = np.flatnonzero(~np.all(sigs == _EMPTY_SIG, axis=1))
    values = sigs[live].astype(np.uint64)
    keys = []
    for b in range(cfg.bands):
        h = np.full(len(live), np.uint64(0xCBF29CE484222325) ^ np.uint64(b), np.uint64)
        for r in range(b * cfg.rows, (b + 1) * cfg.rows):
            h = (h ^ values[:, r]) * _BAND_PRIME
        h ^= h >> np.uint64(33)  # fmix64: spread the fold over all bits (parts take key mod P)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
        keys.append(h.view(np.int64))
    ids = pc.take(sig_batch.column("id"), pa.array(np.tile(live, cfg.bands)))
    return pa.table({"band": pa.array(np.repeat(np.arange(cfg.bands, dtype=np.int32), len(live))),
                     "key": pa.array(np.concatenate(keys) if keys else np.zeros(0, np.int64)),
                     "id": ids})


def _bucket_pairs(members: list[str], all_pairs_max: int) -> Iterable[tuple[str, str]]:
    """members sorted by id; all pairs for small buckets, else a star to the min id."""
    if len(members) <= all_pairs_max:
        return ((a, b) for i, a in enumerate(members) for b in members[i + 1:])
    return ((members[0], b) for b in members[1:])


def bucket_edges(group: pa.Table, cfg: DedupConfig, members: pa.Table | None = None) -> pa.Table:
    """Table(a, b, jaccard) with a < b, unique, from band rows of one or many buckets.

    With ``members`` (Table(id, sig[, shingles]) holding at least these ids: what
    PairJaccard needs) edges are scored and, if cfg.verify, filtered by verify_edges.
    Without it, jaccard is null: candidates that still need verify_edges.
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
                      "jaccard": pa.nulls(len(a), pa.float64())})
    return verify_edges(edges, members, cfg) if members is not None else edges


def endpoints(edges: pa.Table) -> pa.Array:
    """The distinct ids on any edge."""
    return pa.chunked_array(edges.column("a").chunks + edges.column("b").chunks,
                            pa.string()).unique()


def _rows_of(ids: pa.Array | pa.ChunkedArray, table: pa.Table,
             missing: str = "no signature for id {!r}: pass the signatures of every edge "
                            "endpoint") -> np.ndarray:
    """The row of ``table`` (by its ``id``) of each id; ValueError ``missing`` naming the first
    id it lacks."""
    pos = pc.index_in(ids, value_set=table.column("id"))
    if pos.null_count:
        raise ValueError(missing.format(pc.filter(ids, pc.is_null(pos))[0].as_py()))
    return pos.to_numpy(zero_copy_only=False)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Row-wise fraction of equal MinHash values: (N, P), (N, P) -> (N,)."""
    return (sig_a == sig_b).mean(axis=1) if len(sig_a) else np.zeros(0)


class PairJaccard:
    """The Jaccard of pairs of rows of a members table, as cfg.jaccard says: ``exact`` over
    the rows' ``shingles`` (with_shingles), ``estimated`` from their MinHash ``sig``.

        jaccard = PairJaccard(members, cfg)
        jaccard(np.array([0, 0]), np.array([1, 2]))   # rows 0~1 and 0~2
    """

    def __init__(self, members: pa.Table, cfg: DedupConfig):
        self.exact = cfg.jaccard == "exact"
        if self.exact:
            if "shingles" not in members.column_names:
                raise ValueError("exact Jaccard needs the members' shingles (with_shingles)")
            column = members.column("shingles")
            column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
            self._values = column.flatten().to_numpy(zero_copy_only=False)
            self._bounds = column.offsets.to_numpy()[:len(column) + 1] - column.offsets[0].as_py()
        else:
            self.sigs = sig_matrix(members.column("sig"), cfg.num_perm)

    def __call__(self, rows_a: np.ndarray, rows_b: np.ndarray) -> np.ndarray:
        if not self.exact:
            return estimate_jaccard(self.sigs[rows_a], self.sigs[rows_b])
        if not len(rows_a):
            return np.zeros(0)
        values, bounds = self._values, self._bounds
        sizes = np.diff(bounds)
        shared = np.zeros(len(rows_a), np.int64)
        rows_a, rows_b = np.asarray(rows_a, np.int64), np.asarray(rows_b, np.int64)
        order = np.argsort(rows_b, kind="stable")
        cuts = np.flatnonzero(np.r_[True, np.diff(rows_b[order]) != 0, True])
        # One step per distinct b (chain splitting compares one head with many rows): every a of
        # it looked up in b's sorted, distinct values by binary search, counted per a.
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            pairs = order[lo:hi]
            j = rows_b[pairs[0]]
            b = values[bounds[j]:bounds[j + 1]]
            if not len(b):
                continue
            if hi - lo == 1:  # the common case when verifying edges: one plain lookup
                i = rows_a[pairs[0]]
                a = values[bounds[i]:bounds[i + 1]]
                shared[pairs[0]] = np.count_nonzero(b[np.searchsorted(b, a) % len(b)] == a)
                continue
            starts, lens = bounds[rows_a[pairs]], sizes[rows_a[pairs]]
            filled = lens > 0
            if not filled.any():
                continue
            take = np.repeat(starts[filled] - np.r_[0, np.cumsum(lens[filled])[:-1]], lens[filled]) \
                + np.arange(lens[filled].sum())
            a_values = values[take]
            hit = b[np.searchsorted(b, a_values) % len(b)] == a_values
            shared[pairs[filled]] = np.add.reduceat(hit, np.r_[0, np.cumsum(lens[filled])[:-1]])
        union = sizes[rows_a] + sizes[rows_b] - shared
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, shared / np.maximum(union, 1), 1.0)


def verify_edges(edges: pa.Table, members: pa.Table, cfg: DedupConfig) -> pa.Table:
    """Score edges with their Jaccard (PairJaccard); if cfg.verify keep those >= cfg.threshold.

    ``members`` (Table(id, sig[, shingles])) holds every edge endpoint.
    """
    jaccard = PairJaccard(members, cfg)(_rows_of(edges.column("a"), members),
                                        _rows_of(edges.column("b"), members))
    scored = pa.table({"a": edges.column("a"), "b": edges.column("b"),
                       "jaccard": pa.array(jaccard, pa.float64())}, schema=EDGE_SCHEMA)
    if not cfg.verify:
        return scored
    # The tiny epsilon keeps e.g. 90/128 >= 0.703 from flickering on rounding.
    return scored.filter(pa.array(jaccard >= cfg.threshold - 1e-12))


def cross_edges(left: pa.Table, right: pa.Table, cfg: DedupConfig) -> pa.Table:
    """Near-duplicate pairs *between* two tables of (id, text), none within one: Table(a, b,
    jaccard) with a from left and b from right, found by the same LSH bands and verified
    like dedup's own edges (the tasks stage: held-out prompts against training prompts)."""
    sigs_l, sigs_r = signature_batch(left, cfg), signature_batch(right, cfg)
    bands_l, bands_r = band_rows(sigs_l, cfg), band_rows(sigs_r, cfg)
    joined = bands_l.join(bands_r, keys=["band", "key"], join_type="inner", left_suffix="_a", right_suffix="_b")
    pairs = joined.group_by(["id_a", "id_b"]).aggregate([]).sort_by([("id_a", "ascending"), ("id_b", "ascending")])
    a, b = pairs.column("id_a").cast(pa.string()), pairs.column("id_b").cast(pa.string())
    # One members table for PairJaccard: left's endpoints, then right's (ids may repeat across them).
    ends_l = sigs_l.select(["id", "sig"]).filter(pc.is_in(sigs_l.column("id"), value_set=a.unique()))
    ends_r = sigs_r.select(["id", "sig"]).filter(pc.is_in(sigs_r.column("id"), value_set=b.unique()))
    members = pa.concat_tables([with_shingles(ends_l, left, cfg), with_shingles(ends_r, right, cfg)])
    rows_a = _rows_of(a, ends_l)
    rows_b = _rows_of(b, ends_r) + ends_l.num_rows
    jaccard = PairJaccard(members, cfg)(rows_a, rows_b)
    scored = pa.table({"a": a, "b": b, "jaccard": pa.array(jaccard, pa.float64())},
                      schema=EDGE_SCHEMA)
    return scored.filter(pa.array(jaccard >= cfg.threshold - 1e-12)) if cfg.verify else scored
