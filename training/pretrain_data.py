"""Pretraining data: curated Parquet -> token pools -> packed sequences -> a curriculum sampler.

    cache = build_token_cache(parquet_files, tokenizer, work_dir / "tokens", val_fraction=0.05)
    corpus = PackedCorpus(cache, seq_len=128)
    sampler = CurriculumSampler(corpus, cfg, total_steps=1000, seed=0)
    ids = sampler.next_batch()                     # global batch of sequence ids
    x_BT, y_BT = corpus.batch(rank_slice(ids, rank, world))   # training.distributed

A *pool* holds every token of one (split, domain, difficulty), documents joined as
``<s> text </s>``; sequences are windows of seq_len + 1 tokens with stride seq_len, so
no token is padding. The sampler draws a global batch per step: pools are chosen by the
domain weights among those the curriculum phase allows, and each pool hands out its
sequences in a fresh permutation per epoch. Everything is a function of (seed, step,
pool cursors), so a run is deterministic and resumes mid-phase from ``state_dict()``.
Every rank draws the same global batch and keeps its own slice: the data order does not
depend on the number of workers, which is what lets a run resume on a different world size.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from training.config import DataConfig
from training.tokenizer import BOS, EOS, load_tokenizer

DIFFICULTIES = ("basic", "advanced", "expert")
PHASES = ("basic", "basic+advanced", "all")
_NO_DOMAIN = "all"


# ----------------------------------------------------------------------------- tokenize + cache


def cache_key(files: list[Path], tokenizer_file: Path, val_fraction: float, text_column: str,
              exclude_ids: set[str] | None = None) -> str:
    """Changes when the corpus, the tokenizer, the split or the excluded documents change."""
    h = hashlib.sha256(Path(tokenizer_file).read_bytes())
    for f in files:
        st = Path(f).stat()
        h.update(f"{Path(f).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(f"{val_fraction}|{text_column}".encode())
    if exclude_ids:
        h.update(("\n".join(sorted(exclude_ids))).encode())
    return h.hexdigest()[:16]


def is_validation(doc_id: str, val_fraction: float) -> bool:
    # a stable hash, so the split does not move when files are re-sharded or reordered
    bucket = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big") % 100_000
    return bucket < val_fraction * 100_000


def _read_table(path: Path, text_column: str):
    names = pq.ParquetFile(path).schema_arrow.names
    if text_column not in names:
        raise ValueError(f"{path}: no {text_column!r} column (data.text_column); it has {names}")
    cols = [c for c in (text_column, "id", "domain", "difficulty") if c in names]
    return pq.read_table(path, columns=cols).to_pydict()


def _doc_keys(rows: dict, path: Path, text_column: str) -> list[tuple[str, str, str]]:
    """(id, domain, difficulty) per row; a corpus without difficulty counts as all basic."""
    n = len(rows[text_column])
    ids = rows.get("id") or [f"{path.name}:{i}" for i in range(n)]
    domains = rows.get("domain") or [_NO_DOMAIN] * n
    levels = rows.get("difficulty") or ["basic"] * n
    for i, level in enumerate(levels):
        if level not in DIFFICULTIES:
            raise ValueError(f"{path}: row {i} has difficulty {level!r}; expected one of {DIFFICULTIES}")
    return list(zip(ids, [d or _NO_DOMAIN for d in domains], levels))


def build_token_cache(files: list[Path], tokenizer_file: Path, cache_root: Path, *,
                      val_fraction: float, text_column: str = "text", exclude_ids: set[str] | None = None) -> Path:
    """Tokenize the corpus once into per-pool .npy streams; returns the cache folder.

    Documents whose id is in exclude_ids are left out (the tasks stage's decontamination:
    documents that contain a held-out evaluation prompt). Reused while the files, tokenizer,
    split and exclusions are unchanged; written to a temporary folder and renamed, so a crash
    never leaves half a cache.
    """
    files = sorted(Path(f) for f in files)
    if not files:
        raise ValueError("no Parquet files to pretrain on")
    folder = Path(cache_root) / cache_key(files, tokenizer_file, val_fraction, text_column, exclude_ids)
    if (folder / "pools.json").is_file():
        return folder
    tok = load_tokenizer(tokenizer_file)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    streams: dict[tuple[str, str, str], list[np.ndarray]] = {}
    docs: dict[tuple[str, str, str], int] = {}
    for path in files:
        rows = _read_table(path, text_column)
        encoded = tok.encode_batch([t or "" for t in rows[text_column]], add_special_tokens=False)
        for (doc_id, domain, level), enc in zip(_doc_keys(rows, path, text_column), encoded):
            if exclude_ids and str(doc_id) in exclude_ids:
                continue
            split = "val" if is_validation(str(doc_id), val_fraction) else "train"
            key = (split, domain, level)
            streams.setdefault(key, []).append(np.asarray([bos, *enc.ids, eos], dtype=np.uint32))
            docs[key] = docs.get(key, 0) + 1
    _write_cache(folder, streams, docs)
    return folder


def _write_cache(folder: Path, streams: dict, docs: dict) -> None:
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pools = []
    for i, key in enumerate(sorted(streams)):
        tokens = np.concatenate(streams[key])
        np.save(tmp / f"pool_{i:04d}.npy", tokens, allow_pickle=False)
        pools.append({"file": f"pool_{i:04d}.npy", "split": key[0], "domain": key[1],
                      "difficulty": key[2], "docs": docs[key], "tokens": int(tokens.size)})
    (tmp / "pools.json").write_text(json.dumps(pools, indent=1))
    if folder.exists():  # another process finished the same cache first
        shutil.rmtree(tmp)
        return
    os.replace(tmp, folder)


# ----------------------------------------------------------------------------- packed sequences


class Pool:
    def __init__(self, meta: dict, tokens: np.ndarray, seq_len: int):
        self.split, self.domain, self.difficulty = meta["split"], meta["domain"], meta["difficulty"]
        self.tokens = tokens
        self.n = max(0, (tokens.size - 1) // seq_len)  # windows of seq_len + 1, stride seq_len

    @property
    def name(self) -> str:
        return f"{self.domain}/{self.difficulty}"


class PackedCorpus:
    """Train and validation pools of one token cache, cut into sequences of seq_len."""

    def __init__(self, cache: Path, seq_len: int):
        self.seq_len = seq_len
        meta = json.loads((Path(cache) / "pools.json").read_text())
        pools = [Pool(m, np.load(Path(cache) / m["file"], mmap_mode="r"), seq_len) for m in meta]
        self.train = [p for p in pools if p.split == "train" and p.n > 0]
        self.val = [p for p in pools if p.split == "val" and p.n > 0]
        if not self.train:
            raise ValueError(f"token cache {cache}: no document is long enough for data.seq_len={seq_len}")

    def sequence(self, pool: Pool, i: int) -> tuple[np.ndarray, np.ndarray]:
        window = np.asarray(pool.tokens[i * self.seq_len: i * self.seq_len + self.seq_len + 1], dtype=np.int64)
        return window[:-1], window[1:]

    def batch(self, pools: list[Pool], ids: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(pool index, sequence index) pairs -> x_BT, y_BT."""
        xs, ys = zip(*(self.sequence(pools[p], i) for p, i in ids))
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))

    def micro_batches(self, ids: list[tuple[int, int]], micro: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.batch(self.train, ids[i:i + micro]) for i in range(0, len(ids), micro)]

    def val_ids(self, max_per_pool: int) -> list[tuple[int, int]]:
        return [(p, i) for p, pool in enumerate(self.val) for i in range(min(pool.n, max_per_pool))]


# ----------------------------------------------------------------------------- the sampler


class CurriculumSampler:
    """Global batches of (pool, sequence) ids: domain mixture x curriculum phase x seed."""

    def __init__(self, corpus: PackedCorpus, cfg: DataConfig, total_steps: int, seed: int, *,
                 weights: dict[str, float] | None = None, weights_key: str = "data.domain_weights"):
        """corpus: anything with `train` pools (each with n, domain, difficulty, name); cfg: anything
        with global_batch and curriculum. SFT groups its pools by task family and passes its
        family weights as `weights` (else cfg.domain_weights)."""
        self.pools, self.cfg, self.total, self.seed = corpus.train, cfg, total_steps, seed
        self.weights = cfg.domain_weights if weights is None else weights
        self.weights_key = weights_key
        self._check_domains()
        self.step = 0
        self.cursors = [0] * len(self.pools)
        self.epochs = [0] * len(self.pools)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}
        self._probs = [self._phase_probs(p) for p in range(len(PHASES))]

    def _check_domains(self) -> None:
        have = {p.domain for p in self.pools}
        cur = self.cfg.curriculum
        for key, names in ((self.weights_key, list(self.weights)),
                           ("data.curriculum.early_domains", cur.early_domains or [])):
            missing = sorted(set(names) - have)
            if missing:
                raise ValueError(f"{key}: no training data for domain(s) {missing}; the corpus has {sorted(have)}")

    def phase(self, step: int | None = None) -> int:
        step = self.step if step is None else step
        cur = self.cfg.curriculum
        if not cur.enabled:
            return len(PHASES) - 1
        frac = step / max(1, self.total)
        return 0 if frac < cur.boundaries[0] else 1 if frac < cur.boundaries[1] else 2

    def _allowed(self, pool: Pool, phase: int) -> bool:
        cur = self.cfg.curriculum
        if phase == 2:
            return True
        levels = ("basic",) if phase == 0 else ("basic", "advanced")
        return pool.difficulty in levels and (cur.early_domains is None or pool.domain in cur.early_domains)

    def _phase_probs(self, phase: int) -> np.ndarray:
        """P(pool) = P(domain) * P(difficulty | domain): domain weights, then sequence counts."""
        weights = self.weights
        allowed = np.array([self._allowed(p, phase) for p in self.pools])
        sizes = np.array([p.n for p in self.pools], dtype=np.float64) * allowed
        probs = np.zeros(len(self.pools))
        for domain in {p.domain for p, ok in zip(self.pools, allowed) if ok}:
            mask = np.array([p.domain == domain for p in self.pools])
            domain_weight = weights.get(domain, 0.0) if weights else sizes[mask].sum()
            probs[mask] = domain_weight * sizes[mask] / sizes[mask].sum()
        if probs.sum() <= 0:
            raise ValueError(f"curriculum phase {phase} ({PHASES[phase]}) has no training sequence "
                             "with a positive domain weight")
        return probs / probs.sum()

    def _perm(self, pool: int) -> np.ndarray:
        epoch = self.epochs[pool]
        cached = self._perms.get(pool)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, pool, epoch])
            cached = (epoch, rng.permutation(self.pools[pool].n))
            self._perms[pool] = cached
        return cached[1]

    def next_batch(self) -> list[tuple[int, int]]:
        """The global batch of this step, then advance: global_batch (pool, sequence) ids."""
        rng = np.random.default_rng([self.seed, 1 << 20, self.step])
        chosen = rng.choice(len(self.pools), size=self.cfg.global_batch, p=self._probs[self.phase()])
        ids = []
        for pool in chosen.tolist():
            ids.append((pool, int(self._perm(pool)[self.cursors[pool]])))
            self.cursors[pool] += 1
            if self.cursors[pool] == self.pools[pool].n:
                self.cursors[pool], self.epochs[pool] = 0, self.epochs[pool] + 1
        self.step += 1
        return ids

    def state_dict(self) -> dict:
        return {"step": self.step, "cursors": list(self.cursors), "epochs": list(self.epochs),
                "pools": [p.name for p in self.pools]}

    def load_state_dict(self, state: dict) -> None:
        if state["pools"] != [p.name for p in self.pools]:
            raise ValueError("sampler state was saved over different data pools; the corpus or "
                             "tokenizer changed since the checkpoint")
        self.step, self.cursors, self.epochs = state["step"], list(state["cursors"]), list(state["epochs"])
        self._perms.clear()
