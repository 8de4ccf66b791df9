"""Overhead of the pretrain stage: tokens/s on one Ray Train worker against a bare torch loop.

Both train the same model from the same seed on the same batches (the stage's sampler and
packing), with the same AdamW, LR schedule, clipping and accumulation; the bare loop has
no Ray, no DeepSpeed, no metrics and no checkpoints. Steady-state throughput comes from the
step-to-step deltas after a warm-up, by wall clock and by process CPU time (which a
neighbour on a shared box inflates less), as the window average, the median step and the
fastest step; runs alternate bare / stage and the ratios are medians over the reps.

Needs a run whose `difficulty` and `tokenizer` stages are done, e.g. the demo:
    r1pipe run recipes/demo.yaml --stages ingest,dedup,quality,domains,difficulty,tokenizer
    .venv/bin/python benchmarks/pretrain_overhead.py --run runs/demo --recipe recipes/demo.yaml
Writes benchmarks/out/pretrain_overhead.json.
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
from training.config import PretrainConfig  # noqa: E402
from training.engine import lr_at  # noqa: E402
from training.model import Transformer  # noqa: E402
from training.pretrain import Paths  # noqa: E402
from training.pretrain_data import CurriculumSampler, PackedCorpus, build_token_cache  # noqa: E402
from training.tokenizer import load_tokenizer  # noqa: E402


def bench_config(recipe: Path, steps: int, zero_stage: int | None = None) -> PretrainConfig:
    section = load_config(recipe).section("pretrain")
    cfg = PretrainConfig.model_validate(section.model_dump(exclude={"gang"}))
    if zero_stage is not None:
        cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"zero_stage": zero_stage})})
    # one eval and one checkpoint, both after the measured window
    return cfg.model_copy(update={"steps": steps, "eval_every": steps,
                                  "checkpoint": cfg.checkpoint.model_copy(update={"every": steps})})


def bare_optimizer(model: torch.nn.Module, o, steps: int):
    """The engine's AdamW (decay on matrices only) and warmup-cosine schedule, in plain torch."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=o.lr, betas=o.betas, eps=o.eps)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, o, steps) / o.lr)


def bare_loop(cfg: PretrainConfig, paths: Paths, seed: int) -> list[dict]:
    """The same training, written as plainly as torch allows, in this process."""
    cache = build_token_cache(paths.data_files, paths.tokenizer_dir / "tokenizer.json", paths.work,
                              val_fraction=cfg.data.val_fraction, text_column=cfg.data.text_column)
    corpus = PackedCorpus(cache, cfg.data.seq_len)
    sampler = CurriculumSampler(corpus, cfg.data, cfg.steps, seed)
    vocab = load_tokenizer(paths.tokenizer_dir).get_vocab_size()
    torch.manual_seed(seed)
    model = Transformer(cfg.model.build(vocab_size=(vocab + 63) // 64 * 64))
    opt, sched = bare_optimizer(model, cfg.engine.optimizer, cfg.steps)
    gas = cfg.data.global_batch // cfg.data.micro_batch
    rows = []
    for step in range(1, cfg.steps + 1):
        total = 0.0
        for x, y in corpus.micro_batches(sampler.next_batch(), cfg.data.micro_batch):
            out = model(x, y)
            loss = out.loss + out.aux_loss
            (loss / gas).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.engine.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_bias()
        rows.append({"step": step, "loss": total / gas, "time": time.time(), "cpu_time": time.process_time()})
    return rows


def stage_run(cfg: PretrainConfig, paths: Paths, seed: int) -> tuple[list[dict], dict, float]:
    from cluster.gang import GangConfig
    from cluster.train import run_pretrain
    rows: list[dict] = []
    start = time.time()
    summary = run_pretrain(cfg, GangConfig(num_workers=1, cpus_per_worker=1), paths, seed=seed,
                           on_metrics=rows.append)
    return rows, summary, time.time() - start


def throughput(rows: list[dict], warmup: int, tokens_per_step: int, clock: str) -> dict:
    """Tokens/s from the step-to-step deltas after warm-up, without the final step (its eval).

    "window" is the whole window's average; "median" and "best" use single steps, and
    "best" (the fastest step) is the least disturbed by neighbours on a shared box.
    """
    window = rows[warmup - 1:-1]
    deltas = [b[clock] - a[clock] for a, b in zip(window, window[1:])]
    return {"window": tokens_per_step * len(deltas) / sum(deltas),
            "median": tokens_per_step / statistics.median(deltas), "best": tokens_per_step / min(deltas)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, default=Path("runs/demo"))
    ap.add_argument("--recipe", type=Path, default=Path("recipes/demo.yaml"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--zero-stage", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/pretrain_overhead.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # the stage's worker asks for one CPU, so Ray gives it one thread
    cfg = bench_config(args.recipe, args.steps, args.zero_stage)
    files = sorted((args.run / "difficulty" / "data").glob("*.parquet"))
    tokens_per_step = cfg.data.global_batch * cfg.data.seq_len
    from cluster.session import RaySettings, connect
    connect(RaySettings(num_cpus=1))
    result: dict = {"config": cfg.model_dump(mode="json"), "reps": []}
    for rep in range(args.reps):
        with tempfile.TemporaryDirectory() as tmp:
            paths = Paths(files, args.run / "tokenizer", Path(tmp) / "work", Path(tmp) / "ckpt", Path(tmp) / "out")
            paths.out.mkdir()
            bare = bare_loop(cfg, paths, seed=0)
            rows, summary, wall = stage_run(cfg, paths, seed=0)
        rep_result = {clock: {"bare": throughput(bare, args.warmup, tokens_per_step, clock),
                              "stage": throughput(rows, args.warmup, tokens_per_step, clock)}
                      for clock in ("time", "cpu_time")}
        rep_result["stage_wall_s"] = wall
        rep_result["worker_threads"] = summary["torch_threads"]
        # the same computation: equal losses at first, then float-order drift
        rep_result["max_loss_diff_first_10"] = max(abs(a["loss"] - b["loss"]) for a, b in zip(bare[:10], rows))
        result["reps"].append(rep_result)
        print(json.dumps(rep_result), flush=True)
    for clock in ("time", "cpu_time"):
        for stat in ("window", "median", "best"):
            ratios = [r[clock]["stage"][stat] / r[clock]["bare"][stat] for r in result["reps"]]
            result[f"ratio_{clock}_{stat}"] = statistics.median(ratios)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k.startswith("ratio")}, indent=1))


if __name__ == "__main__":
    main()
