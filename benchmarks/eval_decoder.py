"""The evaluation's decoder: batched KV-cache generation against one prompt at a time.

Both decode the same held-out prompts greedily with the same model and the KV cache; the
batched run left-pads a batch of prompts of similar length (rl/eval.py's plan), the other
decodes each prompt alone. Generated tokens/s counts the tokens of the completions (up to and
including each one's stop token), by wall clock and process CPU time, as medians over
alternating reps. Their completions are compared too: batching must not change an answer.
One torch thread, the way one evaluation worker with one CPU runs.

    .venv/bin/python benchmarks/eval_decoder.py --run runs/demo --stage sft
Writes benchmarks/out/eval_decoder.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rl.config import EvalConfig  # noqa: E402
from rl.eval import load_tasks, plan_batches, run_item, spread  # noqa: E402
from training.export import load_model  # noqa: E402
from training.tokenizer import load_tokenizer  # noqa: E402


def decode(model, tok, tasks, batch_size: int, max_new_tokens: int) -> tuple[list[dict], float, float]:
    cfg = EvalConfig(batch_size=batch_size, max_new_tokens=max_new_tokens, pass_at_k={"tasks": 0})
    wall, cpu = time.perf_counter(), time.process_time()
    records = [r for item in plan_batches(tasks, cfg) for r in run_item(model, tok, item, cfg, seed=0)]
    return records, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, default=Path("runs/demo"))
    ap.add_argument("--stage", default="sft")
    ap.add_argument("--tasks", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/eval_decoder.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    folder = args.run / args.stage / "model"
    model, tok = load_model(folder).eval(), load_tokenizer(folder)
    tasks = spread(load_tasks(args.run / "tasks" / "eval"), args.tasks)
    result: dict = {"model": str(folder), "tasks": len(tasks), "batch_size": args.batch_size, "reps": []}
    for rep in range(args.reps):
        sizes = (args.batch_size, 1) if rep % 2 == 0 else (1, args.batch_size)
        runs = {size: decode(model, tok, tasks, size, args.max_new_tokens) for size in sizes}
        tokens = sum(r["length"] for r in runs[1][0])
        same = [a["completion"] == b["completion"] for a, b in zip(runs[1][0], runs[args.batch_size][0])]
        row = {"generated_tokens": tokens, "same_completions": sum(same) / len(same)}
        for size, (_, wall, cpu) in runs.items():
            row[f"batch{size}"] = {"tokens_per_s_wall": tokens / wall, "tokens_per_s_cpu": tokens / cpu}
        result["reps"].append(row)
        print(json.dumps(row), flush=True)
    for clock in ("wall", "cpu"):
        result[f"batched_over_single_{clock}"] = statistics.median(
            r[f"batch{args.batch_size}"][f"tokens_per_s_{clock}"] / r["batch1"][f"tokens_per_s_{clock}"]
            for r in result["reps"])
    result["same_completions"] = min(r["same_completions"] for r in result["reps"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "reps"}, indent=1))


if __name__ == "__main__":
    main()
