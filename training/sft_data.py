"""SFT data: task rows -> tokenized examples (prompt masked) -> packed or padded batches.

    cache = build_sft_cache(train_files, tokenizer_dir, work / "sft", seq_len=512)
    corpus = SftCorpus(cache, seq_len=512, packing=True)       # pools by (family, difficulty)
    sampler = CurriculumSampler(corpus, cfg, total_steps, seed, weights=cfg.family_weights)
    batch = corpus.batch(corpus.train, ids)                    # {"x", "y", "positions", "doc"} or {"x", "y"}

An example is the template's prompt and response (training/template.py); only the response
tokens are targets, the prompt's are -100. Examples longer than seq_len are left out and
counted. With ``packing`` a pool's sequences are rows of whole examples, filled first-fit in
decreasing length, and a block-diagonal mask keeps each example to itself: positions restart
at every example, and the last token of one never predicts the first of the next. Without
packing a sequence is one example, and a micro-batch is right-padded to its longest (a
multiple of 8); causal attention keeps the padding after the real tokens out of their way.
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

from training.logprobs import IGNORE
from training.template import encode_example
from training.tokenizer import PAD, load_tokenizer

_COLUMNS = ("id", "family", "difficulty", "prompt", "system", "context", "response")


def read_examples(files: list[Path]) -> list[dict]:
    """Task rows (the tasks stage's TASK_SCHEMA) that have a response to learn."""
    rows = []
    for path in sorted(Path(f) for f in files):
        names = pq.ParquetFile(path).schema_arrow.names
        missing = [c for c in ("prompt", "response") if c not in names]
        if missing:
            raise ValueError(f"{path}: SFT data needs columns {missing}; it has {names}")
        table = pq.read_table(path, columns=[c for c in _COLUMNS if c in names]).to_pylist()
        rows += [r for r in table if r.get("response")]
    return rows


def cache_key(files: list[Path], tokenizer_file: Path, seq_len: int) -> str:
    h = hashlib.sha256(Path(tokenizer_file).read_bytes())
    for f in sorted(Path(p) for p in files):
        h.update(hashlib.sha256(Path(f).read_bytes()).digest())
    h.update(f"{seq_len}".encode())
    return h.hexdigest()[:16]


def build_sft_cache(files: list[Path], tokenizer_dir: Path, cache_root: Path, *, seq_len: int) -> Path:
    """Tokenize the examples once: tokens.npy, offsets.npy, prompt_lens.npy, meta.json.

    Reused while the files, tokenizer and seq_len are unchanged; written to a temporary folder
    and renamed, so a crash never leaves half a cache."""
    tok_file = Path(tokenizer_dir) / "tokenizer.json"
    folder = Path(cache_root) / cache_key(files, tok_file, seq_len)
    if (folder / "meta.json").is_file():
        return folder
    tok = load_tokenizer(tokenizer_dir)
    ids, offsets, prompt_lens, meta, too_long = [], [0], [], [], 0
    for row in read_examples(files):
        context = json.loads(row["context"]) if row.get("context") else ()
        tokens, n_prompt = encode_example(tok, row["prompt"], row["response"], row.get("system"), context)
        if len(tokens) > seq_len + 1:
            too_long += 1
            continue
        ids.append(np.asarray(tokens, dtype=np.uint32))
        offsets.append(offsets[-1] + len(tokens))
        prompt_lens.append(n_prompt)
        meta.append([row.get("family") or "user", row.get("difficulty") or "basic"])
    if not meta:
        raise ValueError(f"no SFT example fits data.seq_len={seq_len} (of {too_long} too long) in {[str(f) for f in files]}")
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "tokens.npy", np.concatenate(ids), allow_pickle=False)
    np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64), allow_pickle=False)
    np.save(tmp / "prompt_lens.npy", np.asarray(prompt_lens, dtype=np.int64), allow_pickle=False)
    (tmp / "meta.json").write_text(json.dumps({"examples": meta, "too_long": too_long,
                                               "pad_id": tok.token_to_id(PAD)}))
    if folder.exists():
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, folder)
    return folder


class ExamplePool:
    """The sequences of one (family, difficulty): packed rows of example indices, or single examples."""

    def __init__(self, family: str, difficulty: str, rows: list[list[int]], targets: list[int]):
        self.domain, self.difficulty, self.rows = family, difficulty, rows  # `domain`: the sampler's group
        self.targets = targets  # loss tokens per sequence
        self.n = len(rows)

    @property
    def name(self) -> str:
        return f"{self.domain}/{self.difficulty}"


def pack_first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Example indices in rows of at most `capacity` tokens, first-fit in decreasing length;
    deterministic (ties by index)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


class SftCorpus:
    """Tokenized examples grouped into pools; batches with the prompt masked out of the loss."""

    def __init__(self, cache: Path, seq_len: int, packing: bool):
        cache = Path(cache)
        self.seq_len, self.packing = seq_len, packing
        self.tokens = np.load(cache / "tokens.npy", mmap_mode="r")
        self.offsets = np.load(cache / "offsets.npy")
        self.prompt_lens = np.load(cache / "prompt_lens.npy")
        meta = json.loads((cache / "meta.json").read_text())
        self.pad_id, self.too_long = meta["pad_id"], meta["too_long"]
        self.lengths = (np.diff(self.offsets) - 1).tolist()  # inputs per example: tokens - 1
        groups: dict[tuple[str, str], list[int]] = {}
        for i, (family, level) in enumerate(meta["examples"]):
            groups.setdefault((family, level), []).append(i)
        self.train = []
        for (family, level), members in sorted(groups.items()):
            rows = self._rows(members)
            self.train.append(ExamplePool(family, level, rows, [sum(map(self._n_targets, r)) for r in rows]))

    def _rows(self, members: list[int]) -> list[list[int]]:
        if not self.packing:
            return [[i] for i in members]
        packed = pack_first_fit([self.lengths[i] for i in members], self.seq_len)
        return [[members[j] for j in row] for row in packed]

    def _n_targets(self, i: int) -> int:
        return int(self.lengths[i] + 1 - self.prompt_lens[i])

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of one example: targets are -100 over the prompt."""
        ids = np.asarray(self.tokens[self.offsets[i]:self.offsets[i + 1]], dtype=np.int64)
        x, y = ids[:-1], ids[1:].copy()
        y[: self.prompt_lens[i] - 1] = IGNORE
        return x, y

    def n_targets(self, pools: list[ExamplePool], ids: list[tuple[int, int]]) -> int:
        return int(sum(pools[p].targets[s] for p, s in ids))

    def n_tokens(self, pools: list[ExamplePool], ids: list[tuple[int, int]]) -> int:
        return int(sum(self.lengths[i] for p, s in ids for i in pools[p].rows[s]))

    def batch(self, pools: list[ExamplePool], ids: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        rows = [pools[p].rows[s] for p, s in ids]
        return self._packed(rows) if self.packing else self._padded([r[0] for r in rows])

    def _packed(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        B, T = len(rows), self.seq_len
        x = np.full((B, T), self.pad_id, np.int64)
        y = np.full((B, T), IGNORE, np.int64)
        pos = np.zeros((B, T), np.int64)
        doc = np.full((B, T), -1, np.int64)  # padding: a document of its own
        for b, row in enumerate(rows):
            at = 0
            for slot, i in enumerate(row):
                xi, yi = self.example(i)
                n = len(xi)
                x[b, at:at + n], y[b, at:at + n] = xi, yi
                pos[b, at:at + n], doc[b, at:at + n] = np.arange(n), slot
                at += n
        return {"x": torch.from_numpy(x), "y": torch.from_numpy(y), "positions": torch.from_numpy(pos),
                "doc": torch.from_numpy(doc), "real": torch.from_numpy(doc >= 0)}

    def _padded(self, examples: list[int]) -> dict[str, torch.Tensor]:
        width = min(-(-max(self.lengths[i] for i in examples) // 8) * 8, self.seq_len)
        x = np.full((len(examples), width), self.pad_id, np.int64)
        y = np.full((len(examples), width), IGNORE, np.int64)
        real = np.zeros((len(examples), width), bool)
        for b, i in enumerate(examples):
            xi, yi = self.example(i)
            x[b, :len(xi)], y[b, :len(yi)], real[b, :len(xi)] = xi, yi, True
        return {"x": torch.from_numpy(x), "y": torch.from_numpy(y), "real": torch.from_numpy(real)}

    def micro_batches(self, ids: list[tuple[int, int]], micro: int) -> list[dict[str, torch.Tensor]]:
        return [self.batch(self.train, ids[i:i + micro]) for i in range(0, len(ids), micro)]


def val_examples(files: list[Path], tokenizer_dir: Path, seq_len: int, limit: int) -> list[tuple[list[int], int, str]]:
    """Up to `limit` held-out (token ids, prompt length, family) for the validation loss, evenly
    across families (round robin over the rows in file order)."""
    tok = load_tokenizer(tokenizer_dir)
    by_family: dict[str, list[dict]] = {}
    for row in read_examples(files):
        by_family.setdefault(row.get("family") or "user", []).append(row)
    out, queues = [], [list(v) for _, v in sorted(by_family.items())]
    while len(out) < limit and any(queues):
        for q in queues:
            if q and len(out) < limit:
                row = q.pop(0)
                context = json.loads(row["context"]) if row.get("context") else ()
                ids, n_prompt = encode_example(tok, row["prompt"], row["response"], row.get("system"), context)
                if len(ids) <= seq_len + 1:
                    out.append((ids, n_prompt, row.get("family") or "user"))
    return out
