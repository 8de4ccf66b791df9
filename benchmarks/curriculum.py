"""Curriculum against shuffled order at equal tokens: the held-out loss at the end of pretraining.

The demo recipe's pretrain config, run in this process (DeepSpeed, a gloo group of one),
once with the curriculum (basic -> + advanced -> + expert at 20%/60% of the steps) and
once with `curriculum.enabled: false` (every pool from step 0, same domain mixture), for
several seeds. Same steps x global batch, so the same number of tokens.

    .venv/bin/python benchmarks/curriculum.py --run runs/demo --recipe recipes/demo.yaml --seeds 0 1 2
Writes benchmarks/out/curriculum.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.config import load_config  # noqa: E402
from training.config import PretrainConfig  # noqa: E402
from training.pretrain import Hooks, Paths, pretrain  # noqa: E402

KEYS = ("val/loss", "val/difficulty/basic", "val/difficulty/advanced", "val/difficulty/expert")


def config(recipe: Path, curriculum: bool, steps: int | None) -> PretrainConfig:
    cfg = load_config(recipe).section("pretrain").model_dump(exclude={"gang"})
    cfg["data"]["curriculum"]["enabled"] = curriculum
    if steps:
        cfg["steps"] = steps
    cfg["checkpoint"]["every"] = cfg["steps"]  # only the final one
    return PretrainConfig.model_validate(cfg)


def one_run(cfg: PretrainConfig, run: Path, work: Path, seed: int) -> dict:
    files = sorted((run / "difficulty" / "data").glob("*.parquet"))
    curve = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = Paths(files, run / "tokenizer", work, Path(tmp) / "ckpt", Path(tmp) / "out")
        summary = pretrain(cfg, paths, seed=seed,
                           hooks=Hooks(on_metrics=lambda m, s: curve.append((s, m.get("val/loss")))))
    return {**{k: summary[k] for k in KEYS}, "curve": [(s, v) for s, v in curve if v is not None]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, default=Path("runs/demo"))
    ap.add_argument("--recipe", type=Path, default=Path("recipes/demo.yaml"))
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/curriculum.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = {"curriculum": {}, "shuffled": {}}
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:  # interleaved, so a change in the box's load hits both alike
            for name, on in (("curriculum", True), ("shuffled", False)):
                results[name][seed] = one_run(config(args.recipe, on, args.steps), args.run, Path(work), seed)
                print(name, seed, {k: round(results[name][seed][k], 4) for k in KEYS}, flush=True)
    results["mean"] = {name: {k: statistics.mean(r[k] for r in results[name].values()) for k in KEYS}
                       for name in ("curriculum", "shuffled")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results["mean"], indent=1))


if __name__ == "__main__":
    main()
