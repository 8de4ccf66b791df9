"""SFT batches: packed rows (block-diagonal mask) against padded batches, as the stage makes them.

Both train the same model from the same weights with the same AdamW, one pass over random
examples of the train split in random order, with the recipe's micro-batch size: packed, a
micro-batch is that many rows of whole examples; padded, it is that many examples, after each
rank's share of a global batch (global_batch / 2 workers) was sorted by length, as the stage
does. Reported: the share of non-padding tokens in what the model computes on, and real
tokens/s (padding excluded), by wall clock and by process CPU time, as medians over
alternating reps. One torch thread, the way one Ray worker with one CPU runs.

Needs a run whose `tasks` and `pretrain` stages are done, e.g. the demo:
    r1pipe run recipes/demo.yaml --stages ingest,dedup,quality,domains,difficulty,tokenizer,tasks,pretrain
    .venv/bin/python benchmarks/sft_packing.py --run runs/demo --recipe recipes/demo.yaml
Writes benchmarks/out/sft_packing.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.config import load_config  # noqa: E402
from training.config import SftConfig  # noqa: E402
from training.export import load_model  # noqa: E402
from training.sft import sft_loss  # noqa: E402
from training.sft_data import SftCorpus, build_sft_cache  # noqa: E402


def sample_ids(corpus: SftCorpus, n_examples: int, seed: int = 0) -> list[tuple[int, int]]:
    """Every sequence of the corpus holding one of n_examples examples drawn at random, in random
    order: the mixture of lengths a training step sees (pool order would group similar lengths)."""
    import random
    rng = random.Random(seed)
    chosen = set(rng.sample(range(len(corpus.lengths)), n_examples))
    ids = [(p, s) for p, pool in enumerate(corpus.train) for s, row in enumerate(pool.rows) if chosen & set(row)]
    rng.shuffle(ids)
    return ids


def stage_order(corpus: SftCorpus, ids: list[tuple[int, int]], share: int) -> list[tuple[int, int]]:
    """Padded mode: each rank's share of a global batch sorted by length (training/sft.py)."""
    out = []
    for i in range(0, len(ids), share):
        out += sorted(ids[i:i + share], key=lambda ps: corpus.n_tokens(corpus.train, [ps]))
    return out


def run(corpus: SftCorpus, ids: list[tuple[int, int]], model_dir: Path, cfg: SftConfig, micro: int) -> dict:
    torch.manual_seed(0)
    model = load_model(model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.engine.optimizer.lr)
    real = computed = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(ids), micro):
        batch = corpus.batch(corpus.train, ids[i:i + micro])
        batch["scale"] = 1.0 / max(1, int((batch["y"] != -100).sum()))
        loss, _ = sft_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        real += corpus.n_tokens(corpus.train, ids[i:i + micro])
        computed += batch["x"].numel()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"real_tokens": real, "computed_tokens": computed, "efficiency": real / computed,
            "tokens_per_s_wall": real / wall, "tokens_per_s_cpu": real / cpu, "micro_batches": -(-len(ids) // micro)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, default=Path("runs/demo"))
    ap.add_argument("--recipe", type=Path, default=Path("recipes/demo.yaml"))
    ap.add_argument("--examples", type=int, default=600)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/sft_packing.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    section = load_config(args.recipe).section("sft")
    cfg = SftConfig.model_validate(section.model_dump(exclude={"gang", "eval", "init_model"}))
    model_dir = args.run / "pretrain" / "model"
    files = sorted((args.run / "tasks" / "train").glob("*.parquet"))
    result: dict = {"seq_len": cfg.data.seq_len, "micro_batch": cfg.data.micro_batch, "reps": []}
    with tempfile.TemporaryDirectory() as tmp:
        cache = build_sft_cache(files, model_dir, Path(tmp), seq_len=cfg.data.seq_len)
        corpora = {"packed": SftCorpus(cache, cfg.data.seq_len, True), "padded": SftCorpus(cache, cfg.data.seq_len, False)}
        ids = {k: sample_ids(c, args.examples) for k, c in corpora.items()}
        ids["padded"] = stage_order(corpora["padded"], ids["padded"], cfg.data.global_batch // 2)
        per_row = sum(len(corpora["packed"].train[p].rows[s]) for p, s in ids["packed"]) / len(ids["packed"])
        micro = {"packed": cfg.data.micro_batch, "padded": cfg.data.micro_batch}
        result["examples_per_packed_row"] = per_row
        for rep in range(args.reps):
            order = ("packed", "padded") if rep % 2 == 0 else ("padded", "packed")
            out = {k: run(corpora[k], ids[k], model_dir, cfg, micro[k]) for k in order}
            result["reps"].append(out)
            print(json.dumps(out), flush=True)
    for key in ("efficiency", "tokens_per_s_wall", "tokens_per_s_cpu"):
        for kind in ("packed", "padded"):
            result[f"{kind}_{key}"] = statistics.median(r[kind][key] for r in result["reps"])
    for key in ("tokens_per_s_wall", "tokens_per_s_cpu"):
        result[f"packed_over_padded_{key}"] = statistics.median(
            r["packed"][key] / r["padded"][key] for r in result["reps"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "reps"}, indent=1))


if __name__ == "__main__":
    main()
