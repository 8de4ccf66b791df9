"""Exact and MinHash-LSH near-duplicate removal, as batch functions.

The batch functions here map pyarrow Tables to pyarrow Tables and know nothing
of where they run, so an executor can compose them (``cfg`` is a ``DedupConfig``):

  in process  ``dedup_table`` (tests, small local runs): the exact pass, then the near
              pass on what it kept, each ending in apply_removals -> (kept, rejected)
      exact:  exact_keys -> choose_survivors(group_col="exact_hash", reason="exact_duplicate")
      near:   signature_batch -> band_rows -> bucket_edges(sigs=...)   verified candidate pairs
              -> connected_components -> attach_roots -> choose_survivors
  Ray Data    cluster/dedup.py (its docstring has the passes in full), both passes at once:
              per shard, exact_keys and band_rows become key rows, each with a ``part``
              (a hash of (band, key) mod P) -> groupby("part") -> per part,
              choose_survivors on its exact groups and bucket_edges on its LSH buckets
              (one sort splits a part into buckets; grouping on (band, key) itself would
              call Python once per bucket, and almost every bucket is a singleton);
              component_labels (driver) puts each candidate component in a cluster part
              -> per part verify_edges -> connected_components -> attach_roots
              -> choose_survivors; per shard apply_removals.

Band rows carry ids, not signatures: a signature is num_perm*4 bytes and a
doc has one row per band, so shuffling signatures with the bands would move
bands*num_perm*4 bytes per doc. Only candidate endpoints need signatures.
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from functools import lru_cache
from typing import Iterable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasketch import MinHash
from pydantic import Field, model_validator

from data_engine.schema import REJECT_SCHEMA, Strict

DEDUP_REJECT_SCHEMA = REJECT_SCHEMA.append(pa.field("duplicate_of", pa.string())).append(
    pa.field("jaccard", pa.float64()))
SIG_TYPE = pa.list_(pa.uint32())
REMOVED_SCHEMA = pa.schema([
    ("id", pa.string()), ("reason", pa.string()),
    ("duplicate_of", pa.string()), ("jaccard", pa.float64()),
])
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


class DedupConfig(Strict):
    """Dedup settings. ``bands``/``rows`` are derived from ``threshold`` when not given."""
    num_perm: int = Field(128, ge=2, le=1024)  # MinHash permutations per signature
    # Verified pairs need an estimated Jaccard >= threshold. At 0.7 and 128
    # permutations a pair at true J=0.8 passes with p~0.997 and one at J=0.5
    # with p~2e-6, which puts the targets (recall >= 0.95 at J >= 0.8,
    # < 2% of removals below J=0.5) well inside the margins.
    #: the Jaccard level: LSH is tuned to it, verification cuts at it
    threshold: float = Field(0.7, gt=0.0, le=1.0)
    bands: int | None = Field(None, ge=1)  # LSH bands; None: derived from threshold
    rows: int | None = Field(None, ge=1)  # LSH rows per band; with bands, or neither
    # (false-positive, false-negative) weights of the band/row optimisation.
    # With verify on, LSH false positives only cost a comparison, so the
    # default leans on recall; without it, they become false removals.
    #: (false-positive, false-negative) weights; None: (0.1, 0.9) verified
    lsh_weights: tuple[float, float] | None = None
    ngram: int = Field(5, ge=1)  # shingles are word n-grams of this length
    seed: int = 1  # MinHash permutation seed
    #: survivor of a cluster: the smallest id, or the longest/shortest text
    keep: Literal["first_id", "longest", "shortest"] = "first_id"
    verify: bool = True  # candidates and removals need estimated Jaccard >= threshold (to the survivor too)
    # Buckets up to this size link all pairs; larger ones link a star to the
    # min id, which keeps edges linear in bucket size.
    all_pairs_max: int = Field(8, ge=2)  # bucket size up to which all pairs are linked
    exact: bool = True  # the exact pass (hash of the normalised text)
    near: bool = True  # the MinHash-LSH near-duplicate pass
    lowercase: bool = True  # normalisation before hashing and shingling
    strip_punctuation: bool = True  # punctuation becomes spaces; operators (+ - = ...) stay as tokens
    unicode_nfkc: bool = True  # NFKC-normalise before hashing and shingling
    # Error budget of the dedup stage: more removed than this fraction of the
    # input fails it (a corpus that is mostly copies is usually a broken input).
    max_reject_fraction: float = Field(0.9, ge=0.0, le=1.0)  # error budget

    @model_validator(mode="after")
    def _resolve_bands(self):
        if (self.bands is None) != (self.rows is None):
            raise ValueError("dedup.bands and dedup.rows must be given together (or neither)")
        if self.bands is not None:
            if self.bands * self.rows > self.num_perm:
                raise ValueError(f"dedup.bands * dedup.rows = {self.bands * self.rows} "
                                 f"exceeds dedup.num_perm = {self.num_perm}")
            return self
        weights = self.lsh_weights or ((0.1, 0.9) if self.verify else (0.5, 0.5))
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"dedup.lsh_weights must be non-negative, got {weights}")
        self.bands, self.rows = optimal_bands(self.threshold, self.num_perm, *weights)
        return self


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


# --- clusters and survivors ----------------------------------------------------

def component_labels(edges: pa.Table | Iterable[pa.Table]) -> pa.Table:
    """Table(id, label) for every id on an edge: its component's number (0..C-1, arbitrary);
    ids are large_string. Vectorised: ids are dictionary-encoded to ints and scipy's
    connected_components labels the graph, so memory is a few integers per edge, not a
    Python dict of strings."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as label_components
    tables = [edges] if isinstance(edges, pa.Table) else list(edges)
    a = pa.chunked_array([c for t in tables for c in t.column("a").chunks], pa.string())
    b = pa.chunked_array([c for t in tables for c in t.column("b").chunks], pa.string())
    if not len(a):
        return pa.table({"id": pa.array([], pa.large_string()), "label": pa.array([], pa.int64())})
    # large_string: 64-bit offsets, so the ends of 10^8 pairs may hold more than 2 GiB of ids
    encoded = pa.concat_arrays([a.cast(pa.large_string()).combine_chunks(),
                                b.cast(pa.large_string()).combine_chunks()]).dictionary_encode()
    ids, ends = encoded.dictionary, encoded.indices.to_numpy()
    n = len(ids)
    graph = coo_matrix((np.ones(len(a), np.int8), (ends[:len(a)], ends[len(a):])), shape=(n, n))
    _, labels = label_components(graph, directed=False)
    return pa.table({"id": ids, "label": pa.array(labels.astype(np.int64))})


def component_roots(edges: pa.Table | Iterable[pa.Table]) -> pa.Table:
    """component_labels plus ``root``, each component's smallest id."""
    table = component_labels(edges)
    roots = table.group_by("label").aggregate([("id", "min")]).sort_by("label")
    return table.append_column("root", pc.take(roots.column("id_min"), table.column("label")))


def connected_components(edges: pa.Table | Iterable[pa.Table]) -> dict[str, str]:
    """{id: root} for every id on an edge; root = min id of its component."""
    roots = component_roots(edges)
    return dict(zip(roots.column("id").to_pylist(), roots.column("root").to_pylist()))


def attach_roots(sig_batch: pa.Table, components: dict[str, str]) -> pa.Table:
    """Rows of sig_batch whose id is in a component, with a ``root`` column added."""
    ids = sig_batch.column("id").to_pylist()
    mask = [i in components for i in ids]
    kept = sig_batch.filter(pa.array(mask, pa.bool_()))
    roots = [components[i] for i in kept.column("id").to_pylist()]
    return kept.append_column("root", pa.array(roots, pa.string()))


# The sort that puts a group's survivor first; executors reuse it.
KEEP_ORDER = {"first_id": [], "longest": [("n_chars", "descending")],
              "shortest": [("n_chars", "ascending")]}


def choose_survivors(members: pa.Table, cfg: DedupConfig, group_col: str = "root",
                     reason: str = "near_duplicate") -> pa.Table:
    """Apply cfg.keep per group; REMOVED_SCHEMA rows for every non-survivor.

    ``members`` has id, n_chars, ``group_col`` and, unless reason is
    exact_duplicate, sig (for the estimated Jaccard to the survivor). Ties on
    length fall back to the smallest id, so the choice is deterministic.
    """
    order = [(group_col, "ascending")] + KEEP_ORDER[cfg.keep] + [("id", "ascending")]
    ordered = members.sort_by(order)
    groups = ordered.column(group_col).to_pylist()
    ids = ordered.column("id").to_pylist()
    first = np.array([i == 0 or groups[i] != groups[i - 1] for i in range(len(ids))], bool)
    survivor_idx = np.maximum.accumulate(np.where(first, np.arange(len(ids)), 0))
    if reason == "exact_duplicate":
        removed = np.flatnonzero(~first)
        jaccard = np.ones(len(removed))
    else:
        sigs = sig_matrix(ordered.column("sig"), cfg.num_perm)
        jaccard_all = estimate_jaccard(sigs, sigs[survivor_idx])
        if cfg.verify:
            _split_chains(sigs, first, survivor_idx, jaccard_all, cfg.threshold)
        removed = np.flatnonzero(survivor_idx != np.arange(len(ids)))
        jaccard = jaccard_all[removed]
    return pa.table({
        "id": pa.array([ids[i] for i in removed], pa.string()),
        "reason": pa.array([reason] * len(removed), pa.string()),
        "duplicate_of": pa.array([ids[i] for i in survivor_idx[removed]], pa.string()),
        "jaccard": pa.array(jaccard, pa.float64()),
    }, schema=REMOVED_SCHEMA)


def _split_chains(sigs: np.ndarray, first: np.ndarray, survivor_idx: np.ndarray,
                  jaccard: np.ndarray, threshold: float) -> None:
    """Keep every removal within ``threshold`` of the row it names (in place).

    A component can chain A~B~C with A and C far apart. Its first row in keep order survives
    and takes the members close to it; among the rest, the first in keep order survives too
    and takes those close to it, and so on. A pair at or above the threshold still loses one
    row (the earlier one survives and takes the later, unless the later went first), so
    recall holds while no removed row is below the threshold to its survivor.
    """
    far = np.flatnonzero(jaccard < threshold - 1e-12)
    starts = np.flatnonzero(first)
    for start in np.unique(survivor_idx[far]):
        stop = starts[np.searchsorted(starts, start, side="right")] \
            if start < starts[-1] else len(first)
        pending = [i for i in range(start + 1, stop) if jaccard[i] < threshold - 1e-12]
        while pending:
            head, rest = pending[0], np.array(pending[1:], int)
            survivor_idx[head], jaccard[head] = head, 1.0
            if not len(rest):
                break
            est = estimate_jaccard(sigs[rest], sigs[np.full(len(rest), head)])
            close = est >= threshold - 1e-12
            survivor_idx[rest[close]], jaccard[rest[close]] = head, est[close]
            pending = list(rest[~close])


def apply_removals(batch: pa.Table, removed: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Split records into (kept, rejected); rejected follows DEDUP_REJECT_SCHEMA."""
    pos = pc.index_in(batch.column("id"), value_set=removed.column("id"))
    hit = pc.is_valid(pos)
    kept = batch.filter(pc.invert(hit))
    rows = batch.filter(hit)
    info = removed.take(pc.filter(pos, hit))
    dups, jacs = info.column("duplicate_of").to_pylist(), info.column("jaccard").to_pylist()
    detail = [json.dumps({"duplicate_of": d, "jaccard": round(j, 6)}, sort_keys=True)
              for d, j in zip(dups, jacs)]
    source = rows.column("source") if "source" in rows.column_names \
        else pa.nulls(rows.num_rows, pa.string())
    rejected = pa.table({
        "id": rows.column("id"), "text": rows.column("text"), "source": source,
        "reason": info.column("reason"), "detail": pa.array(detail, pa.string()),
        "duplicate_of": info.column("duplicate_of"), "jaccard": info.column("jaccard"),
    }, schema=DEDUP_REJECT_SCHEMA)
    return kept, rejected


# --- the in-process executor ------------------------------------------------------

def exact_removals(table: pa.Table, cfg: DedupConfig) -> pa.Table:
    return choose_survivors(exact_keys(table, cfg), cfg, group_col="exact_hash",
                            reason="exact_duplicate")


def near_removals(table: pa.Table, cfg: DedupConfig) -> pa.Table:
    sigs = signature_batch(table, cfg)
    edges = bucket_edges(band_rows(sigs, cfg), cfg, sigs=sigs)
    components = connected_components(edges)
    return choose_survivors(attach_roots(sigs, components), cfg)


def dedup_table(table: pa.Table, cfg: DedupConfig | None = None) -> tuple[pa.Table, pa.Table]:
    """Exact then near dedup of one in-memory table: (kept, rejected).

    The reference executor for tests and small local runs. A row removed as an
    exact duplicate names the exact pass's survivor in duplicate_of, even if
    that survivor is removed by the near pass afterwards.
    """
    cfg = cfg or DedupConfig()
    ids = table.column("id")
    if ids.null_count:
        row = pc.index(pc.is_null(ids), True).as_py()
        raise ValueError(f"dedup needs a unique, non-null `id` column: row {row} has none")
    if pc.count_distinct(ids).as_py() != table.num_rows:
        counts = pc.value_counts(ids)
        repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
        raise ValueError("dedup needs a unique, non-null `id` column: repeated "
                         f"{repeated.slice(0, 5).to_pylist()} ({len(repeated)} ids in all)")
    kept, rejected = table, DEDUP_REJECT_SCHEMA.empty_table()
    if cfg.exact:
        kept, rej = apply_removals(kept, exact_removals(kept, cfg))
        rejected = pa.concat_tables([rejected, rej])
    if cfg.near and kept.num_rows > 1:
        kept, rej = apply_removals(kept, near_removals(kept, cfg))
        rejected = pa.concat_tables([rejected, rej])
    return kept, rejected
