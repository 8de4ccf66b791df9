"""Dedup: exact surviving ids on tiny corpora, the batch functions composed as
a distributed executor would, and the recall/precision target on the
controlled-Jaccard corpus."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from data_engine.dedup import (
    DEDUP_REJECT_SCHEMA, DedupConfig, apply_removals, dedup_table, near_removals,
)
from data_engine.dedup_minhash import (
    band_rows, bucket_edges, exact_keys, normalize_text, optimal_bands, shingle_hashes, shingles,
    batch_ngram_hashes, minhash_matrix, sig_matrix, signature_batch, verify_edges, with_shingles,
)
from data_engine.generators.dedup_corpus import make_jaccard_corpus, true_jaccard
from data_engine.dedup_survivors import attach_roots, choose_survivors, connected_components
from data_engine.schema import RECORD_SCHEMA

BASE = [f"word{i}" for i in range(200)]  # distinct words: every 5-gram is unique


def edited(positions: list[int], words: list[str] = BASE, tag: str = "x") -> str:
    """BASE with the words at ``positions`` replaced; 5 apart, each edit kills 5 shingles."""
    out = list(words)
    for p in positions:
        out[p] = f"{tag}{p}"
    return " ".join(out)


def records(rows: dict[str, str]) -> pa.Table:
    return pa.table({"id": list(rows), "text": list(rows.values()),
                     "source": ["test"] * len(rows), "meta": ["{}"] * len(rows)},
                    schema=RECORD_SCHEMA)


def removed_map(rejected: pa.Table) -> dict[str, tuple[str, str]]:
    return {r["id"]: (r["reason"], r["duplicate_of"]) for r in rejected.to_pylist()}


def assert_partition(table: pa.Table, kept: pa.Table, rejected: pa.Table) -> None:
    ids = table.column("id").to_pylist()
    kept_ids, rej_ids = kept.column("id").to_pylist(), rejected.column("id").to_pylist()
    assert sorted(kept_ids + rej_ids) == sorted(ids)
    assert not set(kept_ids) & set(rej_ids)
    assert kept.schema == table.schema
    assert rejected.schema == DEDUP_REJECT_SCHEMA


# --- config -------------------------------------------------------------------------

def test_default_bands_rows_are_derived_for_recall():
    cfg = DedupConfig()
    assert (cfg.num_perm, cfg.threshold, cfg.bands, cfg.rows) == (128, 0.7, 20, 6)
    assert optimal_bands(0.7, 128, 0.5, 0.5) == (DedupConfig(verify=False).bands,
                                                 DedupConfig(verify=False).rows)


@pytest.mark.parametrize("kwargs, key", [
    ({"bands": 16, "rows": 9}, "dedup.bands * dedup.rows"),
    ({"bands": 16}, "dedup.bands and dedup.rows"),
    ({"lsh_weights": (-1.0, 1.0)}, "dedup.lsh_weights"),
    ({"keep": "newest"}, "keep"),
    ({"nperm": 64}, "nperm"),
])
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace("*", r"\*")):
        DedupConfig(**kwargs)


def test_explicit_bands_rows_are_kept():
    cfg = DedupConfig(bands=16, rows=8)
    assert (cfg.bands, cfg.rows) == (16, 8)


# --- text, keys, signatures ------------------------------------------------------------

def test_normalisation_and_shingles():
    cfg = DedupConfig()
    assert normalize_text("  Hello,\tWORLD!  foo.bar(x) ", cfg) == "hello world foo bar x"
    keep_punct = DedupConfig(strip_punctuation=False, lowercase=False)
    assert normalize_text("A,  b!", keep_punct) == "A, b!"
    assert shingles("a b c", 5) == {"a b c"}
    assert shingles("", 5) == set()
    assert shingles("a b c d e f", 5) == {"a b c d e", "b c d e f"}


def test_shingle_hashes_are_one_per_distinct_shingle():
    """The hashed n-grams stand in for the shingle strings: as many distinct values as
    distinct shingles, position-sensitive, and the same whatever the word cache holds."""
    text = " ".join(BASE + BASE[:50])  # 250 words, 200 distinct 5-grams (the tail repeats)
    hashes = shingle_hashes(text, 5)
    assert len(hashes) == 246 and len(set(hashes)) == len(shingles(text, 5)) == 200
    assert shingle_hashes(text, 5, {"word3": 1}) != hashes  # the cache is the word hash
    cache: dict[str, int] = {}
    shingle_hashes("word9 word1", 5, cache)
    assert shingle_hashes(text, 5, cache) == hashes
    assert shingle_hashes("a b c", 5) != shingle_hashes("c b a", 5)
    assert len(shingle_hashes("a b c", 5)) == 1 and shingle_hashes("", 5) == []


def test_batch_ngram_hashes_are_each_texts_polynomial_of_its_word_hashes():
    """A whole batch at once gives, text by text, the polynomial mod 2^64 of each n-gram's
    blake2b word hashes; texts shorter than n are one shingle of all their words, empty ones
    none; the per-text shingle_hashes are its high 32 bits."""
    import hashlib

    def reference(text: str, n: int) -> list[int]:
        words = text.split()
        ids = [int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
               for w in words]
        n = min(n, len(words))
        out = []
        for i in range(len(words) - n + 1 if words else 0):
            h = 0
            for w in ids[i:i + n]:
                h = (h * 0x9E3779B97F4A7C15 + w) % 2 ** 64
            out.append(h)
        return out

    texts = ["", "a", "a b c d", "a b c d e", "x y a b c d e f g", "", "q " * 7, "lone"]
    for n in (1, 3, 5):
        values, offsets = batch_ngram_hashes(texts, n)
        assert len(offsets) == len(texts) + 1
        got = [values[lo:hi].tolist() for lo, hi in zip(offsets[:-1], offsets[1:])]
        assert got == [reference(t, n) for t in texts]
        assert [shingle_hashes(t, n) for t in texts] == [[v >> 32 for v in r] for r in got]


def test_minhash_matrix_equals_datasketch():
    """The batched MinHash is datasketch's MinHash(scheme="affine32", hashfunc=int) for every
    set: empty (all 0xFFFFFFFF), one item, repeats, and sets that straddle the blocks."""
    from datasketch import MinHash
    rng = np.random.default_rng(0)
    sizes = [0, 1, 3, 0, 2500, 40, 1, 5000, 7]
    sets = [rng.integers(0, 2 ** 32, size=k, dtype=np.uint64).astype(np.uint32) for k in sizes]
    sets[2] = np.array([5, 5, 9], np.uint32)
    offsets = np.r_[0, np.cumsum(sizes)]
    values = np.concatenate(sets)
    for num_perm, seed in [(128, 1), (64, 7)]:
        got = minhash_matrix(values, offsets, num_perm, seed)
        expected = np.stack([m.hashvalues for m in MinHash.bulk(
            [s.tolist() for s in sets], num_perm=num_perm, seed=seed, scheme="affine32",
            hashfunc=int)])
        assert got.dtype == np.uint32 and np.array_equal(got, expected)
    assert (minhash_matrix(values, offsets, 128, 1)[0] == 0xFFFFFFFF).all()


def test_band_keys_put_equal_bands_together_and_different_ones_apart():
    cfg = DedupConfig()
    sigs = signature_batch(records({"a": edited([]), "b": edited([]).upper(),
                                    "c": edited([100]), "d": edited(list(range(0, 200, 5)))}), cfg)
    bands = band_rows(sigs, cfg)
    m = sig_matrix(sigs["sig"], cfg.num_perm)
    key = {(r["band"], r["id"]): r["key"] for r in bands.to_pylist()}
    ids = ["a", "b", "c", "d"]
    for band in range(cfg.bands):
        cols = slice(band * cfg.rows, (band + 1) * cfg.rows)
        for i, x in enumerate(ids):
            for j, y in enumerate(ids):
                same = bool((m[i, cols] == m[j, cols]).all())
                assert (key[band, x] == key[band, y]) == same, (band, x, y)
    assert len({key[b, "a"] for b in range(cfg.bands)}) == cfg.bands  # bands differ by index


def test_exact_keys_match_after_normalisation():
    keys = exact_keys(records({"a": "Hello,  World!", "b": "hello world", "c": "hello there"}),
                      DedupConfig())
    hashes = keys.column("exact_hash").to_pylist()
    assert hashes[0] == hashes[1] != hashes[2]
    assert keys.column("n_chars").to_pylist() == [14, 11, 11]


def test_operators_are_tokens_so_math_that_differs_survives():
    """Punctuation goes, but "2x + 3 = 7" and "2x - 3 = 7" are different problems."""
    cfg = DedupConfig()
    assert normalize_text("Solve 2x - 3 = 7, a well-known x-1.", cfg) == "solve 2x - 3 = 7 a well known x - 1"
    assert normalize_text("y=x**2 (<= 4)", cfg) == "y = x * * 2 < = 4"
    problems = {f"p{i}": f"Solve 2x {op} 3 = 7 for x, then check the answer by substitution."
                for i, op in enumerate(["+", "-", "*", "/"])}
    problems["p4"] = "solve 2x + 3 = 7 for x then check the answer by substitution"  # p0 again
    kept, rejected = dedup_table(records(problems), cfg)
    assert sorted(kept.column("id").to_pylist()) == ["p0", "p1", "p2", "p3"]
    assert rejected.select(["id", "reason", "duplicate_of"]).to_pylist() == [
        {"id": "p4", "reason": "exact_duplicate", "duplicate_of": "p0"}]


def test_signatures_are_reproducible_across_processes():
    table = records({"a": edited([]), "b": "short text"})
    here = signature_batch(table, DedupConfig()).column("sig").to_pylist()
    code = ("import json; from data_engine.dedup import DedupConfig; import pyarrow as pa;"
            "from data_engine.dedup_minhash import signature_batch;"
            f"t = pa.table({{'id': ['a', 'b'], 'text': {json.dumps([edited([]), 'short text'])}}});"
            "print(json.dumps(signature_batch(t, DedupConfig()).column('sig').to_pylist()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == here
    assert len(here[0]) == 128 and max(here[0]) < 2 ** 32


def test_band_rows_one_row_per_doc_and_band_and_none_for_empty_text():
    cfg = DedupConfig()
    sigs = signature_batch(records({"a": edited([]), "b": edited([100]), "e": ""}), cfg)
    bands = band_rows(sigs, cfg)
    assert bands.schema.names == ["band", "key", "id"]
    assert bands.num_rows == 2 * cfg.bands
    assert set(bands.column("id").to_pylist()) == {"a", "b"}


# --- edges, components, survivors ------------------------------------------------------

def test_bucket_edges_all_pairs_for_small_buckets_star_for_large():
    group = pa.table({"band": pa.array([0] * 4 + [1] * 2, pa.int32()),
                      "key": pa.array([7] * 4 + [9] * 2, pa.int64()),
                      "id": ["d", "b", "c", "a", "b", "a"]})
    star = bucket_edges(group, DedupConfig(all_pairs_max=3))
    assert list(zip(star["a"].to_pylist(), star["b"].to_pylist())) == [
        ("a", "b"), ("a", "c"), ("a", "d")]
    assert star["jaccard"].null_count == 3  # candidates: no members given
    full = bucket_edges(group, DedupConfig(all_pairs_max=8))
    assert full.num_rows == 6


def test_connected_components_roots_are_min_ids_in_any_edge_order():
    edges = pa.table({"a": ["c", "b", "x"], "b": ["d", "c", "y"],
                      "jaccard": [0.9, 0.9, 0.9]})
    expected = {"b": "b", "c": "b", "d": "b", "x": "x", "y": "x"}
    assert connected_components(edges) == expected
    assert connected_components([edges.slice(2), edges.slice(0, 2)]) == expected


def test_vectorised_components_match_a_union_find_on_a_random_graph():
    """scipy labels, Arrow min per label: the same {id: root} as a plain union-find."""
    rng = np.random.default_rng(7)
    ids = [f"doc{i:04d}" for i in rng.permutation(3000)]
    pairs = rng.integers(0, 3000, size=(2500, 2))  # sparse: many small components and chains
    edges = pa.table({"a": [ids[i] for i, _ in pairs], "b": [ids[j] for _, j in pairs]})
    parent: dict[str, str] = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x
    for a, b in pairs:
        ra, rb = find(ids[a]), find(ids[b])
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    expected = {x: find(x) for x in list(parent)}
    assert connected_components(edges) == expected
    assert connected_components([edges.slice(0, 1000), edges.slice(1000)]) == expected
    assert connected_components(edges.slice(0, 0)) == {}


@pytest.mark.parametrize("keep, survivor", [("first_id", "a"), ("longest", "c"),
                                            ("shortest", "b")])
def test_choose_survivors_keep_rules(keep, survivor):
    members = pa.table({"id": ["a", "b", "c", "z"], "exact_hash": ["h", "h", "h", "other"],
                        "n_chars": pa.array([10, 5, 20, 1], pa.int64())})
    removed = choose_survivors(members, DedupConfig(keep=keep), group_col="exact_hash",
                               reason="exact_duplicate")
    assert sorted(removed["id"].to_pylist()) == sorted({"a", "b", "c"} - {survivor})
    assert set(removed["duplicate_of"].to_pylist()) == {survivor}
    assert removed["jaccard"].to_pylist() == [1.0, 1.0]


def test_length_ties_fall_back_to_smallest_id():
    members = pa.table({"id": ["b", "a"], "exact_hash": ["h", "h"],
                        "n_chars": pa.array([5, 5], pa.int64())})
    removed = choose_survivors(members, DedupConfig(keep="longest"), group_col="exact_hash",
                               reason="exact_duplicate")
    assert removed["id"].to_pylist() == ["b"]


# --- dedup_table: exact surviving ids ----------------------------------------------------

def test_exact_duplicates_survivor_is_smallest_id():
    table = records({"d3": "The cat sat.", "d1": "the  CAT sat", "d2": "The cat sat!",
                     "d4": "A different text."})
    kept, rejected = dedup_table(table)
    assert_partition(table, kept, rejected)
    assert kept["id"].to_pylist() == ["d1", "d4"]
    assert removed_map(rejected) == {"d3": ("exact_duplicate", "d1"),
                                     "d2": ("exact_duplicate", "d1")}
    assert rejected["jaccard"].to_pylist() == [1.0, 1.0]
    assert json.loads(rejected["detail"][0].as_py()) == {"duplicate_of": "d1", "jaccard": 1.0}


def test_near_duplicates_and_unrelated_docs():
    table = records({
        "a": edited([]), "b": edited([100]),  # J = 191/201 = 0.95
        "c": edited(list(range(0, 200, 5))),  # J(a, c) = 0
        "d": " ".join(BASE[:100]),           # half of a: J = 96/196 = 0.49
    })
    kept, rejected = dedup_table(table)
    assert_partition(table, kept, rejected)
    assert kept["id"].to_pylist() == ["a", "c", "d"]
    assert removed_map(rejected) == {"b": ("near_duplicate", "a")}
    assert 0.85 <= rejected["jaccard"][0].as_py() <= 1.0


@pytest.mark.parametrize("keep, survivor", [("first_id", "a"), ("longest", "b"),
                                            ("shortest", "a")])
def test_near_duplicate_keep_rules(keep, survivor):
    longer = edited([]) + " extra"
    kept, rejected = dedup_table(records({"a": edited([]), "b": longer}), DedupConfig(keep=keep))
    assert kept["id"].to_pylist() == [survivor]
    assert rejected["duplicate_of"].to_pylist() == [survivor]


def test_a_chain_removes_no_row_below_the_threshold_to_its_survivor():
    """A~B and B~C at J = 176/216 = 0.81 each; A and C share less (J = 0.66). One component,
    but C is not a duplicate of A: A survives and takes B, then C survives on its own. The
    B~C pair still loses B, so recall holds."""
    a, b, c = "a", "b", "c"
    text_b = edited([10, 60, 110, 160])
    text_c = edited([35, 85, 135, 185], text_b.split(), tag="y")
    table = records({a: edited([]), b: text_b, c: text_c})
    assert true_jaccard(table["text"][0].as_py(), text_c) < 0.7
    cfg = DedupConfig()
    sigs = signature_batch(table, cfg)
    edges = bucket_edges(band_rows(sigs, cfg), cfg, members=with_shingles(sigs, table, cfg))
    assert list(zip(edges["a"].to_pylist(), edges["b"].to_pylist())) == [(a, b), (b, c)]
    kept, rejected = dedup_table(table, cfg)
    assert kept["id"].to_pylist() == [a, c]
    assert removed_map(rejected) == {b: ("near_duplicate", a)}
    assert rejected["jaccard"][0].as_py() >= cfg.threshold
    # verify=False trusts the LSH candidates: the whole component goes to one survivor
    kept, rejected = dedup_table(table, DedupConfig(verify=False))
    assert kept["id"].to_pylist() == [a]
    assert removed_map(rejected) == {b: ("near_duplicate", a), c: ("near_duplicate", a)}


def test_chain_splitting_keeps_keep_order_and_recall():
    """A longer chain, and a component whose far members are close to each other: every
    removed row is within the threshold of its survivor, every survivor is kept, and each
    verified pair loses at least one row."""
    base = edited([])
    texts = {"p0": base}
    prev = base
    for i in range(1, 6):  # each link ~0.8 to the previous one, drifting away from p0
        prev = edited([10 * i + 5 * k for k in range(4)], prev.split(), tag=f"t{i}")
        texts[f"p{i}"] = prev
    cfg = DedupConfig()
    table = records(texts)
    kept, rejected = dedup_table(table, cfg)
    assert_partition(table, kept, rejected)
    kept_ids = set(kept["id"].to_pylist())
    for row in rejected.to_pylist():
        assert row["duplicate_of"] in kept_ids and row["jaccard"] >= cfg.threshold
    sigs = signature_batch(table, cfg)
    edges = bucket_edges(band_rows(sigs, cfg), cfg, members=with_shingles(sigs, table, cfg))
    assert edges.num_rows >= 3
    for x, y in zip(edges["a"].to_pylist(), edges["b"].to_pylist()):
        assert not (x in kept_ids and y in kept_ids), (x, y)


def test_exact_then_near_and_in_equals_kept_plus_rejected():
    table = records({"a": edited([]), "a2": edited([]).upper(), "b": edited([50]),
                     "c": edited(list(range(0, 200, 5))), "e": "", "e2": "  "})
    kept, rejected = dedup_table(table)
    assert_partition(table, kept, rejected)
    assert removed_map(rejected) == {"a2": ("exact_duplicate", "a"), "e2": ("exact_duplicate", "e"),
                                     "b": ("near_duplicate", "a")}


def test_duplicate_ids_are_refused():
    with pytest.raises(ValueError, match=r"unique.*repeated \['a'\] \(1 ids in all\)"):
        dedup_table(records({"a": "some text", "b": "other"}).take([0, 1, 0]))
    table = records({"a": "some text", "b": "other"})
    table = table.set_column(0, "id", pa.array(["a", None]))
    with pytest.raises(ValueError, match="row 1 has none"):
        dedup_table(table)


# --- the batch functions composed as a distributed executor would ----------------------

def _groups(table: pa.Table, keys: list[str]) -> list[pa.Table]:
    """What a groupby(...).map_groups(...) hands to each call."""
    uniques = table.select(keys).group_by(keys).aggregate([]).to_pylist()
    out = []
    for u in uniques:
        mask = pc.and_(*[pc.equal(table[k], u[k]) for k in keys]) if len(keys) > 1 \
            else pc.equal(table[keys[0]], u[keys[0]])
        out.append(table.filter(mask))
    return out


def test_sharded_composition_matches_the_local_executor():
    table, _ = make_jaccard_corpus(40, seed=3, n_singletons=10)
    cfg = DedupConfig()
    shards = [table.slice(i, 30) for i in range(0, table.num_rows, 30)]
    sigs = [signature_batch(s, cfg) for s in shards]                           # map_batches
    bands = pa.concat_tables([band_rows(s, cfg) for s in sigs])               # map_batches
    candidates = [bucket_edges(g, cfg) for g in _groups(bands, ["band", "key"])]  # groupby
    candidates = pa.concat_tables(candidates)
    endpoints = pa.chunked_array(candidates["a"].chunks + candidates["b"].chunks).unique()
    endpoint_sigs = pa.concat_tables([s.filter(pc.is_in(s["id"], value_set=endpoints))
                                      for s in sigs])                         # broadcast filter
    endpoint_sigs = with_shingles(endpoint_sigs, table, cfg)                  # their texts
    edges = verify_edges(candidates, endpoint_sigs, cfg)
    components = connected_components(edges)                                  # driver
    members = attach_roots(endpoint_sigs, components)                         # map_batches
    removed = pa.concat_tables([choose_survivors(g, cfg) for g in _groups(members, ["root"])])
    local = near_removals(table, cfg)
    assert sorted(removed.to_pylist(), key=lambda r: r["id"]) == \
        sorted(local.to_pylist(), key=lambda r: r["id"])
    assert local.num_rows > 10
    kept, rejected = apply_removals(table, removed)
    assert_partition(table, kept, rejected)


def test_verify_edges_scores_by_estimated_jaccard_and_keeps_those_at_threshold():
    cfg = DedupConfig(jaccard="estimated")
    sigs = signature_batch(records({"a": edited([]), "b": edited([100]), "c": edited(
        list(range(0, 200, 5)))}), cfg)
    m = sig_matrix(sigs["sig"], cfg.num_perm)
    candidates = pa.table({"a": ["a", "a"], "b": ["b", "c"]})
    edges = verify_edges(candidates, sigs, cfg)
    assert list(zip(edges["a"].to_pylist(), edges["b"].to_pylist())) == [("a", "b")]
    assert edges["jaccard"][0].as_py() == pytest.approx((m[0] == m[1]).mean())


def test_exact_verification_scores_by_the_shingle_sets():
    """Exact Jaccard is the word-5-gram Jaccard itself: edits at 100 kill 5 of 196 shingles of
    each side (191/201); 40 edits 5 apart leave none shared with a."""
    cfg = DedupConfig()
    assert cfg.jaccard == "exact"
    table = records({"a": edited([]), "b": edited([100]), "c": edited(list(range(0, 200, 5)))})
    members = with_shingles(signature_batch(table, cfg), table, cfg)
    assert members["shingles"].to_pylist()[0] == sorted(set(members["shingles"][0].as_py()))
    edges = verify_edges(pa.table({"a": ["a", "a"], "b": ["b", "c"]}), members, cfg)
    assert list(zip(edges["a"].to_pylist(), edges["b"].to_pylist())) == [("a", "b")]
    texts = table["text"].to_pylist()
    assert edges["jaccard"][0].as_py() == true_jaccard(texts[0], texts[1]) == 191 / 201
    with pytest.raises(ValueError, match="no text for id 'zz'"):
        with_shingles(members.slice(0, 1).set_column(0, "id", pa.array(["zz"])), table, cfg)
    with pytest.raises(ValueError, match="needs the members' shingles"):
        verify_edges(pa.table({"a": ["a"], "b": ["b"]}), members.drop_columns(["shingles"]), cfg)


def test_pair_jaccard_equals_python_sets_on_a_sliced_table_and_one_head_against_many():
    """Exact PairJaccard against plain set arithmetic: random pairs (edge verification), one row
    against many (chain splitting), empty sets (1.0 with each other, 0.0 with a non-empty one),
    on a slice of a table (non-zero list offsets)."""
    from data_engine.dedup_minhash import SHINGLES_TYPE, PairJaccard
    rng = np.random.default_rng(1)
    sets = [np.unique(rng.integers(0, 50, size=rng.integers(0, 30))).astype(np.uint64)
            for _ in range(40)]
    sets[5] = np.zeros(0, np.uint64)
    table = pa.table({"id": [str(i) for i in range(40)],
                      "shingles": pa.array([x.tolist() for x in sets], SHINGLES_TYPE)}).slice(3, 30)
    jaccard = PairJaccard(table, DedupConfig())

    def truth(i: int, j: int) -> float:
        a, b = set(sets[i + 3].tolist()), set(sets[j + 3].tolist())
        return len(a & b) / len(a | b) if a | b else 1.0
    rows_a, rows_b = rng.integers(0, 30, 300), rng.integers(0, 30, 300)
    assert jaccard(rows_a, rows_b).tolist() == pytest.approx([truth(i, j) for i, j in zip(rows_a, rows_b)])
    many = np.arange(30)
    assert jaccard(many, np.full(30, 7)).tolist() == pytest.approx([truth(i, 7) for i in many])
    assert jaccard(np.array([2, 2]), np.array([2, 0])).tolist() == [1.0, 0.0]  # row 2 is sets[5]
    assert jaccard(np.zeros(0, int), np.zeros(0, int)).size == 0


def test_exact_verification_drops_a_pair_the_estimate_keeps_and_says_its_jaccard():
    """Two texts whose MinHash estimate lands above 0.7 while their shingle sets share less:
    the estimate removes one of them, exact verification keeps both; every removal's jaccard
    is the true word-5-gram Jaccard to the row it names."""
    cfg_est, cfg_exact = DedupConfig(jaccard="estimated"), DedupConfig()
    # 7 edits 5 apart: J = 161/231 = 0.697; the estimate falls on either side by the tag.
    for tag in [f"t{i}" for i in range(20)]:
        table = records({"a": edited([]), "b": edited(list(range(10, 45, 5)), tag=tag)})
        est = verify_edges(pa.table({"a": ["a"], "b": ["b"]}), signature_batch(table, cfg_est),
                           DedupConfig(jaccard="estimated", verify=False))["jaccard"][0].as_py()
        truth = true_jaccard(*table["text"].to_pylist())
        if est >= 0.7 > truth:
            break
    else:
        pytest.fail("no pair with estimate >= 0.7 > exact among the tags tried")
    assert removed_map(dedup_table(table, cfg_est)[1]) == {"b": ("near_duplicate", "a")}
    kept, rejected = dedup_table(table, cfg_exact)
    assert rejected.num_rows == 0 and kept.num_rows == 2
    close = records({"a": edited([]), "b": edited([0, 50, 100])})
    _, rejected = dedup_table(close, cfg_exact)
    assert rejected["jaccard"].to_pylist() == [true_jaccard(*close["text"].to_pylist())]


# --- the quality target on the controlled corpus ----------------------------------------

def test_controlled_corpus_hits_its_targets():
    table, truth = make_jaccard_corpus(30, seed=1, min_jaccard=0.3, max_jaccard=0.95)
    assert table.num_rows == 60 and table.schema == RECORD_SCHEMA
    texts = dict(zip(table["id"].to_pylist(), table["text"].to_pylist()))
    for row in truth.to_pylist():
        assert row["jaccard"] == true_jaccard(texts[row["base_id"]], texts[row["variant_id"]])
        assert abs(row["jaccard"] - row["target"]) < 0.03
        assert 200 <= len(texts[row["base_id"]].split()) <= 400


def test_recall_and_false_removals_at_default_settings():
    table, truth = make_jaccard_corpus(300, seed=0, n_singletons=100)
    kept, rejected = dedup_table(table)
    assert_partition(table, kept, rejected)
    dup_of = dict(zip(rejected["id"].to_pylist(), rejected["duplicate_of"].to_pylist()))

    def survivor(x: str) -> str:
        while x in dup_of:
            x = dup_of[x]
        return x

    jac = np.array(truth["jaccard"].to_pylist())
    found = np.array([survivor(a) == survivor(b) for a, b in
                      zip(truth["base_id"].to_pylist(), truth["variant_id"].to_pylist())])
    assert (jac >= 0.8).sum() >= 70
    recall = found[jac >= 0.8].mean()
    texts = dict(zip(table["id"].to_pylist(), table["text"].to_pylist()))
    true_j = np.array([true_jaccard(texts[r], texts[d]) for r, d in dup_of.items()])
    false_rate = (true_j < 0.5).mean()
    print(f"recall@J>=0.8 = {recall:.4f}, false removals (J<0.5) = {false_rate:.4f} "
          f"of {len(true_j)}")
    assert recall >= 0.95
    assert false_rate < 0.02
