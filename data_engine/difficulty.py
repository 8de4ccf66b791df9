"""Difficulty grading: KenLM perplexity, cut per domain into basic/advanced/expert.

The convention follows CCNet: a KenLM model trained on a reference subset
measures how far each document is from that reference. Low perplexity = close
to the clean, prototypical reference text = ``basic``; the middle band is
``advanced``; the tail (unusual, dense or specialised text) is ``expert``.
With the default quantiles (0.3, 0.6), 30% of each domain's rows are basic,
30% advanced and 40% expert, like CCNet's head/middle/tail.

Cross-fitting. A model scores the text it was trained on far lower than text
it never saw, so grading the reference with the model trained on it would say
"was in the reference" rather than "reads like it". Every row therefore falls
into one of ``folds`` folds by a hash of its id; model k is trained on the
reference rows outside fold k and scores exactly the rows of fold k. No row is
scored by a model that saw it, and all models train on about (folds-1)/folds
of the reference, so their perplexities are comparable and one set of cuts
applies to all of them.

The steps, each usable on its own (``cluster/`` wires them onto Ray Data):

    mask = fold_training_mask(batch, cfg, k, thresholds)  # rows that train model k
    models[k] = train_kenlm(texts[mask], out_dir_k, cfg)  # lmplz + build_binary
    scored = CrossFitScorer(models)(batch)                 # + "ppl", from each row's fold model
    cuts = quantile_cuts(scored_ppl_and_domain, cfg)      # {domain: (q1, q2), "*": global}
    graded = assign_difficulty(scored, cuts)              # + "difficulty" (string)

One machine: ``scripts/build_kenlm.sh`` once (builds lmplz/build_binary into
the venv), then the calls above. A cluster: the same; the folds' train_kenlm
calls run on the driver or one worker, the scorer runs as a Ray Data callable
class (the models are small: every worker loads all of them).

Reference subset (``DifficultyConfig.reference``):
  top_domain_score  (default) per domain, exactly max(1, round(reference_fraction
                    * rows)) rows with the highest domain_score, ties broken by
                    a hash of the id: text that is clearly about its field, the
                    closest thing a web-like corpus has to CCNet's Wikipedia
                    reference, and every domain is present.
  fraction          a seeded ``reference_fraction`` of rows, chosen by a hash
                    of the row id, so every Ray batch agrees without a shuffle.
  sources           rows whose ``source`` is in ``reference_sources``.
"""
from __future__ import annotations

import hashlib
import math
import re
import shutil
import subprocess
import sys
import tempfile
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterable, Literal, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator, model_validator

from data_engine.schema import DIFFICULTIES, DOMAINS, Strict

GLOBAL = "*"  # key of the corpus-wide cuts in quantile_cuts' result
REFERENCE_COLUMNS = ["id", "source", "domain", "domain_score"]  # what picks the reference
KENLM_TOOLS = ("lmplz", "build_binary")
_MEMORY_RE = re.compile(r"^\d+(\.\d+)?[%bkmgtBKMGT]?$")
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_DIGIT_RE = re.compile(r"\d")


class DifficultyConfig(Strict):
    order: int = Field(3, ge=2, le=6, description="KenLM is built with KENLM_MAX_ORDER=6")
    reference: Literal["top_domain_score", "fraction", "sources"] = Field("top_domain_score", description=(
        "the KenLM training subset (module docstring)"))
    reference_fraction: float = Field(0.3, gt=0.0, le=1.0, description=(
        "share of rows in the reference (top_domain_score, fraction)"))
    reference_sources: list[str] = Field(default_factory=list, description=(
        "reference = sources: these `source` values"))
    reference_seed: int = Field(0, description="reference = fraction: seed of the id hash")
    folds: int = Field(2, ge=2, le=10, description=(
        "cross-fitting folds (by id hash): model k trains on the reference outside fold k, scores fold k; "
        "at least 2, so no row is scored by a model that saw it"))
    quantiles: list[float] = Field(default_factory=lambda: [0.3, 0.6], description=(
        "perplexity cuts: basic <= q1 < advanced <= q2 < expert"))
    per_domain: bool = Field(True, description="cut each domain at its own quantiles")
    min_rows_per_domain: int = Field(50, ge=1, description="fewer rows: the domain uses the global cuts")
    memory: str = Field("10%", description="lmplz -S: always set, or lmplz sizes buffers from total RAM")
    discount_fallback: bool = Field(True, description="small corpora lack the counts Kneser-Ney needs")
    keep_arpa: bool = Field(False, description="the binary is the artifact; the ARPA file is large")

    @field_validator("quantiles")
    @classmethod
    def _quantiles(cls, value: list[float]) -> list[float]:
        if len(value) != len(DIFFICULTIES) - 1:
            raise ValueError(f"difficulty.quantiles needs {len(DIFFICULTIES) - 1} cuts, got {value}")
        if not all(0.0 < q < 1.0 for q in value) or any(a >= b for a, b in zip(value, value[1:])):
            raise ValueError(f"difficulty.quantiles must be strictly increasing in (0, 1), got {value}")
        return value

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str) -> str:
        if not _MEMORY_RE.match(value):
            raise ValueError(f"difficulty.memory must look like '10%' or '256M', got {value!r}")
        return value

    @model_validator(mode="after")
    def _sources(self) -> "DifficultyConfig":
        if self.reference == "sources" and not self.reference_sources:
            raise ValueError("difficulty.reference_sources is empty but reference = 'sources'")
        return self


# ------------------------------------------------------------ normalisation

def normalize_text(text: str | None) -> str:
    """CCNet-style normalisation, shared by training and scoring: one line,
    lowercase, accents stripped, digits -> 0, words and punctuation split."""
    text = unicodedata.normalize("NFD", (text or "").lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(_TOKEN_RE.findall(_DIGIT_RE.sub("0", text)))


# --------------------------------------------------------- reference subset

def _id_hash(ids: list, salt: str) -> np.ndarray:
    """A stable 64-bit hash per id (uint64): same row, same answer in every
    batch and on every worker. Different salts give independent hashes."""
    def one(value) -> int:
        digest = hashlib.blake2b(f"{salt}\x00{value}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big")
    return np.fromiter((one(v) for v in ids), np.uint64, len(ids))


def _id_fraction(ids: list, seed: int) -> np.ndarray:
    """A stable pseudo-random number in [0, 1) per id."""
    return _id_hash(ids, str(seed)) / 2.0 ** 64


def row_folds(ids: list, folds: int) -> np.ndarray:
    """The cross-fitting fold of each row (int64 in [0, folds)), by a hash of its id
    that is independent of the reference's own hashes."""
    return (_id_hash(ids, "fold") % np.uint64(folds)).astype(np.int64)


def _domain_scores(table: pa.Table) -> np.ndarray:
    scores = table.column("domain_score").to_numpy(zero_copy_only=False).astype(np.float64)
    scores[np.isnan(scores)] = -math.inf  # a row without a score ranks last
    return scores


def domain_score_thresholds(table: pa.Table, cfg: DifficultyConfig) -> dict[str, tuple[float, int]]:
    """Per domain, the (domain_score, tie key) of the last row that joins the reference.

    Rows rank by domain_score, highest first; equal scores (a unanimous k-NN vote
    gives exactly 1.0) rank by a hash of the id, so exactly max(1, round(fraction
    * rows)) rows of each domain join, whatever the ties. Needs the id, domain
    and domain_score columns of the whole corpus: fine to collect on the driver."""
    _require(table, ("id", "domain", "domain_score"), "reference = 'top_domain_score'")
    domains = np.asarray(table.column("domain").to_pylist(), dtype=object)
    scores = _domain_scores(table)
    ties = _id_hash(table.column("id").to_pylist(), "reference-tie")
    thresholds = {}
    for domain in sorted(set(domains.tolist()), key=str):
        rows = domains == domain
        ranked = np.lexsort((ties[rows], -scores[rows]))  # the last key sorts first
        keep = max(1, round(cfg.reference_fraction * len(ranked)))
        last = ranked[keep - 1]
        thresholds[domain] = (float(scores[rows][last]), int(ties[rows][last]))
    return thresholds


def reference_mask(batch: pa.Table, cfg: DifficultyConfig,
                   thresholds: Mapping[str, tuple[float, int]] | None = None) -> np.ndarray:
    """Which rows of this batch are in the reference subset (bool, one per row)."""
    if cfg.reference == "sources":
        _require(batch, ("source",), "reference = 'sources'")
        return np.asarray(pc.is_in(batch.column("source"),
                                   pa.array(cfg.reference_sources)).to_pylist(), bool)
    if cfg.reference == "fraction":
        _require(batch, ("id",), "reference = 'fraction'")
        return _id_fraction(batch.column("id").to_pylist(), cfg.reference_seed) < cfg.reference_fraction
    if thresholds is None:
        raise ValueError("reference = 'top_domain_score' needs the thresholds from domain_score_thresholds()")
    _require(batch, ("id", "domain", "domain_score"), "reference = 'top_domain_score'")
    domains = np.asarray(batch.column("domain").to_pylist(), dtype=object)
    scores = _domain_scores(batch)
    ties = _id_hash(batch.column("id").to_pylist(), "reference-tie")
    mask = np.zeros(batch.num_rows, bool)
    for domain, (score, tie) in thresholds.items():
        rows = domains == domain
        mask[rows] = (scores[rows] > score) | ((scores[rows] == score) & (ties[rows] <= np.uint64(tie)))
    return mask


def fold_training_mask(batch: pa.Table, cfg: DifficultyConfig, fold: int,
                       thresholds: Mapping[str, tuple[float, int]] | None = None) -> np.ndarray:
    """The rows that train fold ``fold``'s model: the reference rows of the other folds."""
    _require(batch, ("id",), "cross-fitting")
    other = row_folds(batch.column("id").to_pylist(), cfg.folds) != fold
    return reference_mask(batch, cfg, thresholds) & other


def reference_per_fold(table: pa.Table, cfg: DifficultyConfig) -> tuple[dict | None, list[int]]:
    """The top_domain_score thresholds (None for the other references) and the number of
    reference rows in each fold, from the corpus's REFERENCE_COLUMNS (those it has)."""
    thresholds = domain_score_thresholds(table, cfg) if cfg.reference == "top_domain_score" else None
    in_reference = reference_mask(table, cfg, thresholds)
    folds = row_folds(table.column("id").to_pylist(), cfg.folds)
    return thresholds, np.bincount(folds[in_reference], minlength=cfg.folds).tolist()


def check_folds(per_fold: list[int], cfg: DifficultyConfig) -> None:
    """ValueError, naming the keys to change, when some fold model would have nothing to train on."""
    if not sum(per_fold):
        raise ValueError(
            f"difficulty: the reference is empty (difficulty.reference={cfg.reference!r}); "
            f"check difficulty.reference_sources against the rows' `source` values, or "
            f"difficulty.reference_fraction")
    for fold, n in enumerate(per_fold):
        if n == sum(per_fold):
            raise ValueError(f"difficulty: all {n} reference rows fall in fold {fold}, so its model "
                             f"has nothing to train on; lower difficulty.folds or raise "
                             f"difficulty.reference_fraction")


def fold_training_texts(table: pa.Table, cfg: DifficultyConfig, fold: int,
                        thresholds: dict | None) -> list[str]:
    """The texts of ``table`` that train fold ``fold``'s model."""
    return table.column("text").filter(pa.array(fold_training_mask(table, cfg, fold, thresholds))).to_pylist()


def _require(table: pa.Table, columns: Iterable[str], why: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"difficulty: {why} needs column(s) {missing}")


# ------------------------------------------------------------------- KenLM

def find_kenlm_binaries() -> dict[str, Path]:
    """lmplz and build_binary: next to this Python (the venv's bin), else on PATH."""
    found = {}
    for tool in KENLM_TOOLS:
        beside = Path(sys.executable).parent / tool
        path = beside if beside.exists() else shutil.which(tool)
        if path is None:
            raise FileNotFoundError(
                f"KenLM's '{tool}' is neither in {beside.parent} nor on PATH; build it with "
                f"scripts/build_kenlm.sh (installs lmplz, build_binary and query into the venv)")
        found[tool] = Path(path)
    return found


def _run(cmd: list[str], stdin=None, stdout=None) -> None:
    proc = subprocess.run(cmd, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace")[-2000:]
        raise RuntimeError(f"{Path(cmd[0]).name} failed (exit {proc.returncode}): {tail}")


def write_reference(texts: Iterable[str], path: Path) -> int:
    """Normalised reference text, one document per line -> number of lines."""
    lines = 0
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            line = normalize_text(text)
            if line:
                f.write(line + "\n")
                lines += 1
    return lines


def train_kenlm(texts: Iterable[str], out_dir: Path | str, cfg: DifficultyConfig) -> Path:
    """Estimate an order-``cfg.order`` model with lmplz and compile it with
    build_binary -> path of ``model.binary`` in out_dir."""
    tools = find_kenlm_binaries()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text_path, arpa, binary = out_dir / "reference.txt", out_dir / "model.arpa", out_dir / "model.binary"
    if write_reference(texts, text_path) == 0:
        raise ValueError("difficulty: the reference subset is empty (no non-empty text to train KenLM on)")
    cmd = [str(tools["lmplz"]), "-o", str(cfg.order), "-S", cfg.memory]
    if cfg.discount_fallback:
        cmd.append("--discount_fallback")
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        with open(text_path, "rb") as src, open(arpa, "wb") as dst:
            _run(cmd + ["-T", tmp], stdin=src, stdout=dst)
    _run([str(tools["build_binary"]), str(arpa), str(binary)])
    if not cfg.keep_arpa:
        arpa.unlink()
    return binary


class PerplexityScorer:
    """Callable over a pyarrow batch with "text": adds ``ppl`` (float64).

    Per document, CCNet-style: 10 ** (-sum of log10 word probabilities /
    (words + 1)), the +1 being the end-of-sentence token KenLM scores too.
    A row with no words after normalisation gets +inf (the hardest level)."""

    def __init__(self, model_path: Path | str):
        import kenlm  # the query side, installed by pip; lmplz is only for training
        if not Path(model_path).exists():
            raise ValueError(f"difficulty: KenLM model {model_path} does not exist")
        self.model = kenlm.Model(str(model_path))

    def perplexity(self, text: str | None) -> float:
        line = normalize_text(text)
        n_words = len(line.split())
        if n_words == 0:
            return math.inf
        return 10.0 ** (-self.model.score(line, bos=True, eos=True) / (n_words + 1))

    def __call__(self, batch: pa.Table) -> pa.Table:
        _require(batch, ("text",), "perplexity scoring")
        return _with_ppl(batch, [self.perplexity(t) for t in batch.column("text").to_pylist()])


class CrossFitScorer:
    """Callable over a pyarrow batch with "id" and "text": adds ``ppl`` (float64),
    each row scored by the model of its fold (row_folds). ``model_paths[k]`` must be
    the model trained without fold k, so no row meets a model that saw it."""

    def __init__(self, model_paths: list[Path | str]):
        self.scorers = [PerplexityScorer(p) for p in model_paths]

    def __call__(self, batch: pa.Table) -> pa.Table:
        _require(batch, ("id", "text"), "cross-fitted perplexity scoring")
        folds = row_folds(batch.column("id").to_pylist(), len(self.scorers))
        texts = batch.column("text").to_pylist()
        return _with_ppl(batch, [self.scorers[k].perplexity(t) for k, t in zip(folds, texts)])


def _with_ppl(batch: pa.Table, ppl: list[float]) -> pa.Table:
    if "ppl" in batch.column_names:
        batch = batch.drop_columns(["ppl"])
    return batch.append_column("ppl", pa.array(ppl, pa.float64()))


# ------------------------------------------------------------ quantile cuts

def _cuts(ppl: np.ndarray, quantiles: list[float]) -> tuple[float, ...]:
    """The k-th smallest ppl for k = ceil(q * n): exactly k rows are <= the
    cut when values are distinct (the inverted-CDF quantile)."""
    ranked = np.sort(ppl)
    ks = [min(len(ranked), max(1, math.ceil(q * len(ranked) - 1e-9))) for q in quantiles]
    return tuple(float(ranked[k - 1]) for k in ks)


def _ppl_and_domain(data: pa.Table | Mapping[str, Iterable]) -> tuple[np.ndarray, np.ndarray | None]:
    columns = data.column_names if isinstance(data, pa.Table) else list(data)
    if "ppl" not in columns:
        raise ValueError("difficulty: quantile cuts need a 'ppl' column")
    get = (lambda c: data.column(c).to_pylist()) if isinstance(data, pa.Table) else (lambda c: list(data[c]))
    ppl = np.array([math.inf if v is None else v for v in get("ppl")], np.float64)
    ppl[np.isnan(ppl)] = math.inf  # unscorable rows sort last: the hardest level
    if "domain" not in columns:
        return ppl, None
    return ppl, np.asarray([GLOBAL if d is None else d for d in get("domain")], dtype=object)


def quantile_cuts(data: pa.Table | Mapping[str, Iterable], cfg: DifficultyConfig
                  ) -> dict[str, tuple[float, ...]]:
    """-> {GLOBAL: cuts, domain: cuts, ...}. Per domain when cfg.per_domain and
    the domain has at least min_rows_per_domain rows; others use the global
    cuts (every one of DOMAINS is present in the result)."""
    ppl, domains = _ppl_and_domain(data)
    if len(ppl) == 0:
        raise ValueError("difficulty: no rows to compute quantile cuts from")
    global_cuts = _cuts(ppl, cfg.quantiles)
    cuts = {GLOBAL: global_cuts}
    if not cfg.per_domain:
        return cuts
    if domains is None:
        raise ValueError("difficulty.per_domain = true needs a 'domain' column")
    for domain in sorted((set(DOMAINS) | set(domains.tolist())) - {GLOBAL}):
        rows = ppl[domains == domain]
        cuts[domain] = _cuts(rows, cfg.quantiles) if len(rows) >= cfg.min_rows_per_domain else global_cuts
    return cuts


def assign_difficulty(batch: pa.Table, cuts: Mapping[str, tuple[float, ...]]) -> pa.Table:
    """Adds ``difficulty`` (string): basic if ppl <= cut 1, advanced if
    <= cut 2, else expert. A row equal to a cut takes the easier level, so
    tied rows never split. Domains without their own cuts use cuts[GLOBAL]."""
    if GLOBAL not in cuts:
        raise ValueError(f"difficulty: cuts lack the global entry {GLOBAL!r}")
    ppl, domains = _ppl_and_domain(batch)
    if domains is None or len(cuts) == 1:
        domains = np.full(len(ppl), GLOBAL, dtype=object)
    level = np.zeros(len(ppl), np.int64)
    for domain in set(domains.tolist()):
        rows = domains == domain
        bounds = np.asarray(cuts.get(domain, cuts[GLOBAL]), np.float64)
        level[rows] = np.searchsorted(bounds, ppl[rows], side="left")
    names = np.asarray(DIFFICULTIES, dtype=object)[level].tolist()
    if "difficulty" in batch.column_names:
        batch = batch.drop_columns(["difficulty"])
    return batch.append_column("difficulty", pa.array(names, pa.string()))


# --- the stage's report tables -----------------------------------------------------------

def cuts_table(cuts: dict) -> dict:
    """quantile_cuts' result as a table: the global cuts, then each domain's."""
    names = [f"{a}/{b}" for a, b in zip(DIFFICULTIES, DIFFICULTIES[1:])]
    rows = [[d] + [round(c, 3) for c in cuts[d]] for d in [GLOBAL] + [d for d in DOMAINS if d in cuts]]
    return {"columns": ["domain"] + [f"cut {n}" for n in names], "rows": rows}


def difficulty_by_domain(cells: Mapping[tuple[str, str], int]) -> dict:
    """The difficulty x domain table from the rows per (domain, level)."""
    cells = Counter(cells)
    domains = [d for d in DOMAINS if any(cells[d, lvl] for lvl in DIFFICULTIES)]
    domains += sorted({d for d, _ in cells} - set(DOMAINS))  # GLOBAL when untagged
    rows = [[d] + [cells[d, lvl] for lvl in DIFFICULTIES] + [sum(cells[d, lvl] for lvl in DIFFICULTIES)]
            for d in domains]
    rows.append(["total"] + [sum(r[i + 1] for r in rows) for i in range(len(DIFFICULTIES) + 1)])
    return {"columns": ["domain", *DIFFICULTIES, "total"], "rows": rows}


def ppl_histogram(ppl: np.ndarray, step: float = 0.25) -> dict:
    """Counts per bin of log10(perplexity); unscorable rows (inf) get their own bin."""
    finite = ppl[np.isfinite(ppl)]
    rows = []
    if len(finite):
        logs = np.log10(np.maximum(finite, 1.0))
        lo, hi = math.floor(logs.min() / step) * step, math.floor(logs.max() / step) * step + step
        edges = np.arange(lo, hi + step / 2, step)
        counts, _ = np.histogram(logs, bins=edges)
        rows = [[f"{a:.2f}-{b:.2f}", int(n)] for a, b, n in zip(edges, edges[1:], counts)]
    if len(finite) < len(ppl):
        rows.append(["inf", int(len(ppl) - len(finite))])
    return {"columns": ["log10 ppl", "rows"], "rows": rows}
