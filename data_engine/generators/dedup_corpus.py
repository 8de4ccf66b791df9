"""A test corpus of (base, variant) pairs with controlled word-n-gram Jaccard.

Base documents are sentences of words drawn from a Zipf-distributed
vocabulary (common English words, then pronounceable pseudo-words for the
long tail), 200-400 words each. A variant applies the first m edits of a
random edit script (substitute / insert / delete a word) to its base; m is
binary-searched so that the *exact* Jaccard of the two n-gram shingle sets is
as close as possible to a target drawn from [min_jaccard, max_jaccard].
Targets at 1.0 give a cosmetic copy (new sentence breaks, case, spacing),
which normalises to the same text: an exact duplicate.

    table, truth = make_jaccard_corpus(300, seed=0)
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from data_engine.dedup import DedupConfig
from data_engine.dedup_minhash import normalize_text, shingles
from data_engine.schema import RECORD_SCHEMA

_COMMON = """the of and to a in is that it for was on are as with his they at be this from
have or by one had not but what all were when we there can an your which their said if do
will each about how up out them then she many some so these would other into has more her
two like him see time could no make than first been its who now people my made over did
down only way find use may water long little very after words called just where most know
get through back much go good new write our me man too any day same right look think also
around another came come work three word must because does part even place well such here
take why things help put years different away again off went old number great tell men
say small every found still between name should home big give air line set own under read
last never us left end along while might next sound below saw something thought both few
those always looked show large often together asked house world going want school important
until form food keep children feet land side without boy once animals life enough took
sometimes four head above kind began almost live page got earth need far hand high year
mother light parts country father let night following picture being study second eyes soon
times story boys since white days ever paper hard near sentence better best across during
today others however sure means knew try told young miles sun ways thing whole hear example
heard several change answer room sea against top turned learn point city play toward five
using himself usually river money market energy value system model theory problem result
method function process structure reason history power field state order market law court""".split()
_ONSETS = "b c d f g h j k l m n p r s t v w z br cr dr fr gr pr tr st sp sl ch sh th".split()
_NUCLEI = "a e i o u ai ea ee oo ou ie".split()
_CODAS = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ck", "ng"]


def true_jaccard(a: str, b: str, n: int = 5) -> float:
    """Exact Jaccard of the word n-gram sets of two texts, normalised as dedup does."""
    cfg = DedupConfig(ngram=n)
    sa, sb = shingles(normalize_text(a, cfg), n), shingles(normalize_text(b, cfg), n)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def _set_jaccard(sa: set, sb: set) -> float:
    return len(sa & sb) / len(sa | sb) if sa or sb else 1.0


def _vocabulary(rng: np.random.Generator, size: int) -> list[str]:
    words = list(dict.fromkeys(_COMMON))
    seen = set(words)
    while len(words) < size:
        # Draw syllable parts in bulk: per-syllable rng calls dominate otherwise.
        k = 4 * (size - len(words))
        parts = zip(rng.integers(len(_ONSETS), size=(k, 3)), rng.integers(len(_NUCLEI), size=(k, 3)),
                    rng.integers(len(_CODAS), size=(k, 3)), rng.integers(1, 4, size=k))
        for onset, nucleus, coda, syllables in parts:
            word = "".join(_ONSETS[onset[j]] + _NUCLEI[nucleus[j]] + _CODAS[coda[j]]
                           for j in range(syllables))
            if word not in seen and len(words) < size:
                seen.add(word)
                words.append(word)
    return words


class _Sampler:
    """Zipf-Mandelbrot word sampler: frequency ~ 1 / (rank + 2.7)."""

    def __init__(self, rng: np.random.Generator, vocab_size: int):
        self.rng = rng
        self.words = _vocabulary(rng, vocab_size)
        weights = 1.0 / (np.arange(vocab_size) + 2.7)
        self.cdf = np.cumsum(weights / weights.sum())

    def draw(self, k: int) -> list[str]:
        idx = np.searchsorted(self.cdf, self.rng.random(k) * self.cdf[-1], side="right")
        return [self.words[i] for i in np.minimum(idx, len(self.words) - 1)]


def _render(words: list[str], rng: np.random.Generator) -> str:
    """Words -> prose: sentences of 6-20 words, capitalised, with some commas."""
    out, i = [], 0
    while i < len(words):
        n = int(rng.integers(6, 21))
        sentence = list(words[i:i + n])
        sentence[0] = sentence[0].capitalize()
        if len(sentence) > 8 and rng.random() < 0.5:
            cut = int(rng.integers(3, len(sentence) - 3))
            sentence[cut] += ","
        out.append(" ".join(sentence) + ".")
        i += n
    return " ".join(out)


def _edit_script(rng: np.random.Generator, sampler: _Sampler, length: int) -> list[tuple]:
    ops = rng.choice(["sub", "sub", "sub", "ins", "del"], size=length)
    return list(zip(ops, rng.random(length).tolist(), sampler.draw(length)))


def _apply(words: list[str], script: list[tuple], m: int) -> list[str]:
    out = list(words)
    for op, frac, word in script[:m]:
        pos = min(int(frac * len(out)), len(out) - 1)
        if op == "sub":
            out[pos] = word
        elif op == "ins":
            out.insert(pos, word)
        elif len(out) > 1:
            del out[pos]
    return out


def _variant_words(base: list[str], target: float, n: int, script: list[tuple]) -> list[str]:
    """Binary-search the number of edits whose result has Jaccard closest to target."""
    base_set = shingles(" ".join(base), n)

    def jac(m: int) -> float:
        return _set_jaccard(base_set, shingles(" ".join(_apply(base, script, m)), n))

    lo, hi = 0, len(script)  # jac(lo) > target >= jac(hi), roughly monotone
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if jac(mid) > target else (lo, mid)
    best = min((lo, hi), key=lambda m: abs(jac(m) - target))
    return _apply(base, script, best)


def _targets(rng: np.random.Generator, n_pairs: int, lo: float, hi: float) -> np.ndarray:
    """Stratified uniform targets, so every Jaccard range is covered even for small n."""
    strata = (np.arange(n_pairs) + rng.random(n_pairs)) / max(n_pairs, 1)
    targets = lo + (hi - lo) * strata
    rng.shuffle(targets)
    return targets


def make_jaccard_corpus(n_pairs: int, seed: int = 0, *, n: int = 5, min_jaccard: float = 0.2,
                        max_jaccard: float = 1.0, n_singletons: int = 0,
                        min_words: int = 200, max_words: int = 400, vocab_size: int = 5000,
                        exact_above: float = 0.995) -> tuple[pa.Table, pa.Table]:
    """(records, truth) for n_pairs (base, variant) pairs plus n_singletons loners.

    records: RECORD_SCHEMA (id, text, source="jaccard_corpus", meta JSON with
    role and pair index); ids are shuffled so neither role always sorts first.
    truth: Table(base_id string, variant_id string, target float64,
    jaccard float64) with the exact n-gram Jaccard of the rendered texts.
    A target >= exact_above yields a cosmetic (exact after normalisation) copy.
    """
    if not 0.0 <= min_jaccard <= max_jaccard <= 1.0:
        raise ValueError(f"need 0 <= min_jaccard <= max_jaccard <= 1, got "
                         f"{min_jaccard}, {max_jaccard}")
    rng = np.random.default_rng(seed)
    sampler = _Sampler(rng, vocab_size)
    n_docs = 2 * n_pairs + n_singletons
    ids = [f"doc{i:06d}" for i in rng.permutation(n_docs)]
    texts, metas, truth = [], [], []
    for pair, target in enumerate(_targets(rng, n_pairs, min_jaccard, max_jaccard)):
        base = sampler.draw(int(rng.integers(min_words, max_words + 1)))
        if target >= exact_above:
            variant = base
        else:
            variant = _variant_words(base, target, n, _edit_script(rng, sampler, 2 * len(base)))
        base_text, variant_text = _render(base, rng), _render(variant, rng)
        texts += [base_text, variant_text]
        metas += [f'{{"role": "base", "pair": {pair}}}', f'{{"role": "variant", "pair": {pair}}}']
        truth.append((ids[2 * pair], ids[2 * pair + 1], float(target),
                      true_jaccard(base_text, variant_text, n)))
    for k in range(n_singletons):
        texts.append(_render(sampler.draw(int(rng.integers(min_words, max_words + 1))), rng))
        metas.append(f'{{"role": "singleton", "index": {k}}}')
    records = pa.table({"id": ids, "text": texts, "source": ["jaccard_corpus"] * n_docs,
                        "meta": metas}, schema=RECORD_SCHEMA)
    base_ids, variant_ids, targets, jaccards = zip(*truth) if truth else ((), (), (), ())
    truth_table = pa.table({"base_id": pa.array(base_ids, pa.string()),
                            "variant_id": pa.array(variant_ids, pa.string()),
                            "target": pa.array(targets, pa.float64()),
                            "jaccard": pa.array(jaccards, pa.float64())})
    return records, truth_table
