"""One tiny trained model for the tests that need a model which answers: trained once per session.

The tasks are an easy family made for tests: "Repeat the number 37." answered in the reasoning
format, which a 2-layer model learns in a few hundred steps on CPU; the held-out tasks use
numbers it never saw, so its accuracy is well above 0 and below 1 and both kinds of outcome
are exercised.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data_engine.task_data import TASK_SCHEMA

TINY = dict(d_model=48, n_layers=2, n_heads=2, n_kv_heads=1, dense_hidden=96, expert_hidden=48, max_seq_len=96)


@dataclass
class Reasoner:
    root: Path
    model: Path      # a model folder with its tokenizer (what a stage writes under model/)
    eval_dir: Path   # held-out tasks, as the tasks stage writes them
    train_dir: Path


def echo_row(i: int, n: int, split: str) -> dict:
    solution = f"<think>\nThe number is {n}.\n</think>\n<answer>{n}</answer>"
    return {"id": f"{split}-{i}", "split": split, "source": "test", "family": "echo" if n % 2 else "echo_even",
            "domain": "math", "difficulty": "basic" if n < 500 else "advanced", "prompt": f"Repeat the number {n}.",
            "system": None, "context": None, "response": solution, "answer": str(n), "checker": "answer"}


def write_echo_tasks(root: Path, n_train: int = 600, n_eval: int = 40) -> tuple[Path, Path]:
    rng = random.Random(0)
    numbers = rng.sample(range(10, 1000), n_train + n_eval)
    for split, chunk in (("train", numbers[:n_train]), ("eval", numbers[n_train:])):
        (root / split).mkdir(parents=True, exist_ok=True)
        rows = [echo_row(i, n, split) for i, n in enumerate(chunk)]
        pq.write_table(pa.Table.from_pylist(rows, schema=TASK_SCHEMA), root / split / "part-00000.parquet")
    return root / "train", root / "eval"


def train_reasoner(root: Path) -> Reasoner:
    from training.config import SftConfig
    from training.export import save_model
    from training.model import ModelConfig, Transformer
    from training.sft import SftPaths, sft
    from training.tokenizer import TokenizerConfig, save_tokenizer, train_tokenizer
    train_dir, eval_dir = write_echo_tasks(root / "tasks")
    texts = [r["prompt"] + r["response"] for r in pq.read_table(train_dir).to_pylist()]
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=300, split_digits=True))
    torch.manual_seed(0)
    init = save_model(Transformer(ModelConfig.from_preset("tiny", vocab_size=320, **TINY)), root / "init")
    save_tokenizer(tok, init)
    cfg = SftConfig.model_validate({"steps": 400, "eval_every": 400, "checkpoint": {"every": 400, "keep": 1},
                                    "engine": {"zero_stage": 0, "optimizer": {"lr": 5e-3, "warmup_steps": 20}},
                                    "data": {"seq_len": 64, "micro_batch": 16, "global_batch": 16,
                                             "val_max_examples": 0}})
    paths = SftPaths(sorted(train_dir.glob("*.parquet")), sorted(eval_dir.glob("*.parquet")), init,
                     root / "work", root / "checkpoints", root / "sft")
    sft(cfg, paths, seed=0)
    return Reasoner(root, root / "sft" / "model", eval_dir, train_dir)
