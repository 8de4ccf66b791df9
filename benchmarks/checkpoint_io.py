"""Checkpoint save and load time against model size (DeepSpeed ZeRO-2, fp32, one process).

A save is what the pretrain loop does every `checkpoint.every` steps: DeepSpeed's
save_checkpoint, the RNG file, a sha256 of every file and the atomic publish. A load is
choose_checkpoint's verification (hashing every file again) plus DeepSpeed's
load_checkpoint. The universal conversion (only on a world-size change) is timed too.

    .venv/bin/python benchmarks/checkpoint_io.py            # ~2 min on 2 cores
Writes benchmarks/out/checkpoint_io.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training import checkpoint as ckpt  # noqa: E402
from training.config import EngineConfig  # noqa: E402
from training.engine import Engine, to_universal  # noqa: E402
from training.model import ModelConfig, Transformer  # noqa: E402

SIZES = {  # name -> ModelConfig overrides of the tiny preset
    "tiny (demo)": dict(vocab_size=4096),
    "tiny, vocab 8192": dict(vocab_size=8192),
    "d256 x 6 layers": dict(vocab_size=8192, d_model=256, n_layers=6, dense_hidden=1024, expert_hidden=512),
    "small preset": None,
}


def build(name: str) -> Transformer:
    torch.manual_seed(0)
    over = SIZES[name]
    cfg = ModelConfig.from_preset("small") if over is None else ModelConfig.from_preset("tiny", **over)
    return Transformer(cfg)


def one_size(name: str, root: Path) -> dict:
    model = build(name)
    engine = Engine(model, EngineConfig(zero_stage=2), micro_batch=1, global_batch=1, total_steps=10)
    x = torch.randint(0, model.cfg.vocab_size, (1, 32))
    engine.train_step([(x, x)])  # Adam states exist, as in a real checkpoint
    staging = ckpt.staging_path(root, 1)
    staging.mkdir(parents=True)
    t0 = time.perf_counter()
    engine.save(staging)
    ckpt.write_rng(staging, 0)
    t1 = time.perf_counter()
    files = ckpt.digest(staging, ckpt.files_of(staging))
    folder = ckpt.publish(staging, {"step": 1}, files, keep=1)
    t2 = time.perf_counter()
    assert not ckpt.problems(folder)
    t3 = time.perf_counter()
    engine.load(folder)
    t4 = time.perf_counter()
    to_universal(folder, zero_stage=2)
    t5 = time.perf_counter()
    return {"params": model.param_counts()["total"], "bytes": sum(f["bytes"] for f in files.values()),
            "save_s": t1 - t0, "hash_publish_s": t2 - t1, "verify_s": t3 - t2, "load_s": t4 - t3,
            "universal_s": t5 - t4}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/checkpoint_io.json"))
    ap.add_argument("--sizes", nargs="*", default=list(SIZES))
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = {}
    for name in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = one_size(name, Path(tmp))
        print(name, json.dumps(results[name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
