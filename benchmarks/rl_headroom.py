"""How much greedy accuracy RL could gain by sharpening what a model already samples: greedy
decoding and k samples (temperature 1, as the RL rollouts) of the same development tasks.

    .venv/bin/python benchmarks/rl_headroom.py runs/reasoning/dpo/model --k 8 --every 2

The development tasks are those of benchmarks/rl_dev_split.py (runs/dev1's held-out split minus every
prompt of runs/reasoning's train and held-out splits); --every 2 takes every second one. Prints greedy
accuracy, pass@k, majority-vote accuracy over the k samples, and the tasks greedy gets wrong that a
sample gets right, by how many of the k samples are right: the tasks RL can flip by sharpening.
"""
import argparse
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_engine.generators.tasks import extract_answer  # noqa: E402
from cluster.eval import evaluate_on_ray, sample_on_ray  # noqa: E402
from cluster.session import RaySettings, connect  # noqa: E402
from rl.config import EvalConfig  # noqa: E402
from rl_dev_split import dev_tasks  # noqa: E402 (this folder)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=1.0)
    args = ap.parse_args()
    connect(RaySettings(num_cpus=2))
    dev = dev_tasks(REPO / "runs")[::args.every]
    cfg = EvalConfig(max_new_tokens=384, pass_at_k={"tasks": 0, "temperature": args.temperature, "top_p": 1.0})
    fig, greedy = evaluate_on_ray(args.model, dev, cfg, seed=0)
    sampled = sample_on_ray(args.model, dev, cfg, k=args.k, seed=0)
    right = {r["id"]: bool(r["correct"]) for r in greedy if r["samples"] == 1}
    flips, majority = Counter(), 0
    for r in sampled:
        r.setdefault("correct_each", [False] * args.k)  # a prompt too long to answer
        r.setdefault("texts", [""] * args.k)
        c = sum(r["correct_each"])
        if not right[r["id"]] and c:
            flips[c] += 1
        # majority vote over the samples' final answers (ties: the first-seen answer)
        answers = [extract_answer(t) for t in r["texts"]]
        votes = Counter(a for a in answers if a is not None)
        if votes:
            majority += r["correct_each"][answers.index(votes.most_common(1)[0][0])]
    n = len(dev)
    out = {"model": args.model, "tasks": n, "k": args.k, "temperature": args.temperature,
           "greedy": fig["eval/accuracy"],
           "sampled_accuracy": sum(sum(r["correct_each"]) for r in sampled) / (n * args.k),
           f"pass@{args.k}": sum(any(r["correct_each"]) for r in sampled) / n,
           f"maj@{args.k}": majority / n,
           "greedy_wrong_sample_right": sum(flips.values()) / n,
           "of_which_by_right_samples": {c: flips[c] for c in sorted(flips)}}
    print("RESULT", json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
