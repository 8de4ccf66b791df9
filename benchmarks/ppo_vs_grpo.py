"""PPO (GAE, a separate critic) against GRPO at equal generated tokens, on a task the model half solves.

The model is the test suite's tiny reasoner (tests/reasoner.py: a 2-layer MoE trained by SFT to
repeat a number in the reasoning format, trained here in ~15 s). Sampling at temperature 2 it is
right about a fifth of the time, so RL has room to move the sampled reward; both algorithms get
the same prompts (the same sampler seed), the same rollout (8 prompts x 4 completions, 24 new
tokens at most), the same reward (accuracy), lr and optimizer, one update per 16 completions; only
the advantage estimator, the critic and the loss aggregation differ (rl/config.py's presets).
Per algorithm: the reward curve (mean over blocks of iterations), the generated tokens, the
seconds, and the greedy and sampled (temperature 2) accuracy on the held-out numbers after training.

    .venv/bin/python benchmarks/ppo_vs_grpo.py --iterations 30

Writes benchmarks/out/ppo_vs_grpo.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def run(algorithm: str, reasoner, root: Path, iterations: int, lr: float) -> dict:
    from rl.config import EvalConfig, RlConfig
    from rl.eval import evaluate, load_tasks
    from rl.ppo import RlPaths, rl
    from training.export import load_model
    from training.loop import Hooks
    from training.tokenizer import load_tokenizer
    cfg = RlConfig.model_validate({
        "algorithm": algorithm, "iterations": iterations, "minibatch": 16, "micro_batch": 8,
        "checkpoint_every": iterations, "rewards": {"accuracy": 1.0},
        "rollout": {"prompts": 8, "group_size": 4, "max_new_tokens": 24, "temperature": 2.0},
        "engine": {"zero_stage": 0, "optimizer": {"lr": lr, "warmup_steps": 0}}})
    rows = []
    start = time.perf_counter()
    rl(cfg, RlPaths([reasoner.train_dir / "part-00000.parquet"], reasoner.model, root / "w", root / "c", root / "o"),
       seed=0, hooks=Hooks(on_metrics=lambda m, s: rows.append(m)))
    seconds = time.perf_counter() - start
    it = [r for r in rows if "reward/mean" in r]
    tokens = sum(r["response_length/mean"] * cfg.rollout.prompts * cfg.rollout.group_size for r in it)
    block = max(1, iterations // 5)
    curve = [round(statistics.mean(r["reward/mean"] for r in it[i:i + block]), 3) for i in range(0, len(it), block)]
    model, tok = load_model(root / "o" / "model"), load_tokenizer(root / "o" / "model")
    tasks = load_tasks(reasoner.eval_dir)
    greedy, _ = evaluate(model, tok, tasks, EvalConfig(max_new_tokens=24, pass_at_k={"tasks": 0}), seed=0)
    sampled, _ = evaluate(model, tok, tasks, EvalConfig(max_new_tokens=24, pass_at_k={"k": 1, "samples": 4,
                                                                                      "tasks": len(tasks),
                                                                                      "temperature": 2.0,
                                                                                      "top_p": 1.0}), seed=0)
    return {"algorithm": algorithm, "estimator": cfg.estimator, "critic": cfg.critic_kind,
            "aggregation": cfg.aggregation, "iterations": iterations, "generated_tokens": round(tokens),
            "seconds": round(seconds, 1), "reward_curve": curve,
            "held_out_greedy_accuracy": greedy["eval/accuracy"],
            "held_out_sampled_accuracy_t2": sampled["eval/pass@1_sampled"],
            "explained_variance_last": it[-1].get("explained_variance")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    from tests.reasoner import train_reasoner
    work = Path(tempfile.mkdtemp(prefix="ppo_vs_grpo_"))
    reasoner = train_reasoner(work / "reasoner")
    from rl.config import EvalConfig
    from rl.eval import evaluate, load_tasks
    from training.export import load_model
    from training.tokenizer import load_tokenizer
    start_model = load_model(reasoner.model)
    tasks = load_tasks(reasoner.eval_dir)
    start, _ = evaluate(start_model, load_tokenizer(reasoner.model), tasks,
                        EvalConfig(max_new_tokens=24, pass_at_k={"k": 1, "samples": 4, "tasks": len(tasks),
                                                                 "temperature": 2.0, "top_p": 1.0}), seed=0)
    report = {"args": vars(args), "start": {"held_out_greedy_accuracy": start["eval/accuracy"],
                                            "held_out_sampled_accuracy_t2": start["eval/pass@1_sampled"]},
              "runs": [run(a, reasoner, work / a, args.iterations, args.lr) for a in ("grpo", "ppo")]}
    out = REPO / "benchmarks" / "out" / "ppo_vs_grpo.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
