"""Overhead of the sft stage: tokens/s on one Ray Train worker against a bare torch loop.

Both train the same model from the same weights on the same batches (the stage's sampler and
batching: padded micro-batches sorted by length, or packed rows), with the same AdamW, LR
schedule, clipping, accumulation and response-token loss; the bare loop has no Ray, no
DeepSpeed, no metrics and no checkpoints. Throughput is real (non-padding) tokens over the
step-to-step deltas after a warm-up, by wall clock and by process CPU time, as the median
step; runs alternate bare / stage and the ratios are medians over the reps.

Needs a run whose `tasks` and `pretrain` stages are done, e.g. the demo:
    r1pipe run recipes/demo.yaml --stages ingest,dedup,quality,domains,difficulty,tokenizer,tasks,pretrain
    .venv/bin/python benchmarks/sft_overhead.py --run runs/demo --recipe recipes/demo.yaml
Writes benchmarks/out/sft_overhead.json.
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
from benchmarks.pretrain_overhead import bare_optimizer  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from training import sft  # noqa: E402
from training.config import SftConfig  # noqa: E402
from training.export import load_model  # noqa: E402
from training.pretrain_data import CurriculumSampler  # noqa: E402
from training.sft_data import SftCorpus, build_sft_cache  # noqa: E402


def bench_config(recipe: Path, steps: int, packing: bool | None) -> SftConfig:
    section = load_config(recipe).section("sft")
    cfg = SftConfig.model_validate(section.model_dump(exclude={"gang", "eval", "init_model"}))
    data = cfg.data if packing is None else cfg.data.model_copy(update={"packing": packing})
    # one validation pass and one checkpoint, both after the measured window
    return cfg.model_copy(update={"steps": steps, "eval_every": steps, "data": data,
                                  "checkpoint": cfg.checkpoint.model_copy(update={"every": steps})})


def bare_loop(cfg: SftConfig, cache: Path, model_dir: Path, seed: int) -> list[dict]:
    """The same training, written as plainly as torch allows, in this process."""
    corpus = SftCorpus(cache, cfg.data.seq_len, cfg.data.packing)
    sampler = CurriculumSampler(corpus, cfg.data, cfg.steps, seed, weights=cfg.data.family_weights)
    torch.manual_seed(seed)
    model = load_model(model_dir)
    opt, sched = bare_optimizer(model, cfg.engine.optimizer, cfg.steps)
    gas = cfg.data.global_batch // cfg.data.micro_batch
    rows, tokens = [], 0
    for step in range(1, cfg.steps + 1):
        ids = sampler.next_batch()
        if not cfg.data.packing:
            ids = sorted(ids, key=lambda ps: corpus.n_tokens(corpus.train, [ps]))
        scale = gas / corpus.n_targets(corpus.train, ids)  # the engine's convention: it divides by gas
        total = 0.0
        for batch in corpus.micro_batches(ids, cfg.data.micro_batch):
            loss, _ = sft.sft_loss(model, {**batch, "scale": scale})
            (loss / gas).backward()
            total += loss.item() / gas
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.engine.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_bias()
        tokens += corpus.n_tokens(corpus.train, ids)
        rows.append({"step": step, "loss": total, "tokens": tokens, "time": time.time(), "cpu_time": time.process_time()})
    return rows


def stage_run(cfg: SftConfig, paths: sft.SftPaths, seed: int) -> tuple[list[dict], dict]:
    from cluster.gang import GangConfig
    from cluster.train import run_gang
    rows: list[dict] = []
    payload = {"config": cfg.model_dump(mode="json"), "seed": seed,
               "paths": {k: [str(f) for f in v] if isinstance(v, list) else str(v) for k, v in vars(paths).items()}}
    summary = run_gang(sft.worker, payload, GangConfig(num_workers=1, cpus_per_worker=1), checkpoints=paths.checkpoints,
                       work=paths.work, on_metrics=rows.append, name="sft")
    return rows, summary


def throughput(rows: list[dict], warmup: int, clock: str) -> float:
    """Median over steps of real tokens / seconds, after warm-up, without the last step (its eval)."""
    window = rows[warmup - 1:-1]
    return statistics.median((b["tokens"] - a["tokens"]) / (b[clock] - a[clock]) for a, b in zip(window, window[1:]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, default=Path("runs/demo"))
    ap.add_argument("--recipe", type=Path, default=Path("recipes/demo.yaml"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--packing", choices=["recipe", "on", "off"], default="recipe")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/sft_overhead.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # the stage's worker asks for one CPU, so Ray gives it one thread
    cfg = bench_config(args.recipe, args.steps, None if args.packing == "recipe" else args.packing == "on")
    args.run = args.run.resolve()  # the stage's worker runs in another directory
    model_dir = args.run / "pretrain" / "model"
    train = sorted((args.run / "tasks" / "train").glob("*.parquet"))
    val = sorted((args.run / "tasks" / "eval").glob("*.parquet"))
    from cluster.session import RaySettings, connect
    connect(RaySettings(num_cpus=1))
    result: dict = {"config": cfg.model_dump(mode="json"), "reps": []}
    for rep in range(args.reps):
        with tempfile.TemporaryDirectory() as tmp:
            paths = sft.SftPaths(train, val, model_dir, Path(tmp) / "work", Path(tmp) / "ckpt", Path(tmp) / "out")
            paths.out.mkdir()
            cache = build_sft_cache(train, model_dir, paths.work, seq_len=cfg.data.seq_len)
            runs = {}
            for kind in (("bare", "stage") if rep % 2 == 0 else ("stage", "bare")):
                runs[kind] = bare_loop(cfg, cache, model_dir, 0) if kind == "bare" else stage_run(cfg, paths, 0)[0]
        row = {clock: {k: throughput(v, args.warmup, clock) for k, v in runs.items()} for clock in ("time", "cpu_time")}
        # the same computation: equal losses at first, then float-order drift
        row["max_loss_diff_first_10"] = max(abs(a["loss"] - b["loss"]) for a, b in zip(runs["bare"][:10], runs["stage"]))
        result["reps"].append(row)
        print(json.dumps(row), flush=True)
    for clock in ("time", "cpu_time"):
        result[f"ratio_{clock}"] = statistics.median(r[clock]["stage"] / r[clock]["bare"] for r in result["reps"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k.startswith("ratio")}, indent=1))


if __name__ == "__main__":
    main()
