"""RL tuning on a development split, never the held-out one: the RL job from the reasoning recipe's DPO
model on a 2-worker gang, then greedy accuracy on development tasks.

The development tasks are runs/dev1's held-out split (the reasoning recipe's tasks stage run with
`--set tasks.generator.seed=101`) minus every prompt that also occurs in runs/reasoning's train or
held-out split. The RL settings start from the reasoning recipe's prl section and take a JSON of
changes (nested keys merge; `rewards` replaces):

    .venv/bin/python benchmarks/rl_dev_split.py base '{"iterations": 0}'            # the start model
    .venv/bin/python benchmarks/rl_dev_split.py lr3e-4 '{"iterations": 60, "engine": {"optimizer": {"lr": 3e-4}}}'
    .venv/bin/python benchmarks/rl_dev_split.py from-sft '{"_init": "sft", "iterations": 120}'   # from SFT's model
    .venv/bin/python benchmarks/rl_dev_split.py fit64 '{"_train_tasks": 64, "iterations": 80}'  # a fixed set of 64 train prompts

`_train_tasks: N` trains on a fixed sample of N train tasks (seed 0) instead of the whole split: can
the policy fit prompts it sees again and again? Prints the sampled reward every 10 iterations and `RESULT name changes rl <seconds> dev n=<tasks>
acc <accuracy>`; the per-iteration metrics go to /tmp/rl_dev/<name>/log.jsonl.
"""
import json
import random
import shutil
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cluster.eval import evaluate_on_ray  # noqa: E402
from cluster.gang import GangConfig  # noqa: E402
from cluster.session import RaySettings, connect  # noqa: E402
from cluster.train import run_gang  # noqa: E402
from rl import ppo  # noqa: E402
from rl.config import EvalConfig, RlConfig, deep_merge  # noqa: E402
from rl.eval import load_tasks  # noqa: E402

BASE = {"algorithm": "grpo", "minibatch": 64, "micro_batch": 16, "checkpoint_every": 50,
        "rollout": {"prompts": 8, "group_size": 8, "max_new_tokens": 256, "temperature": 1.0},
        "rewards": {"accuracy": 1.0, "format": 0.1},
        "engine": {"zero_stage": 1, "optimizer": {"lr": 1e-4, "warmup_steps": 5, "weight_decay": 0.0}}}


def dev_tasks(runs: Path) -> list:
    """runs/dev1's held-out tasks minus every prompt of runs/reasoning's train and held-out splits."""
    seen = {r["prompt"] for split in ("train", "eval") for f in (runs / "reasoning" / "tasks" / split).glob("*.parquet")
            for r in pq.read_table(f, columns=["prompt"]).to_pylist()}
    return [t for t in load_tasks(runs / "dev1" / "tasks" / "eval") if t.prompt not in seen]


def main() -> None:
    name, changes = sys.argv[1], json.loads(sys.argv[2])
    runs = REPO / "runs"
    root = Path("/tmp/rl_dev") / name
    shutil.rmtree(root, ignore_errors=True)
    connect(RaySettings(num_cpus=2))
    dev = dev_tasks(runs)
    start_stage = changes.pop("_init", "dpo")  # the start model: the reasoning run's dpo (default) or sft
    model = (runs / "reasoning" / start_stage / "model").resolve()
    train = sorted((runs / "reasoning" / "tasks" / "train").resolve().glob("*.parquet"))
    subset = changes.pop("_train_tasks", None)
    if subset:
        table = pa.concat_tables([pq.read_table(f) for f in train])
        picked = random.Random(0).sample(range(table.num_rows), subset)
        (root / "subset").mkdir(parents=True)
        train = [root / "subset" / "part-00000.parquet"]
        pq.write_table(table.take(picked), train[0])
    start = time.time()
    if changes.get("iterations", 1) > 0:
        cfg = RlConfig.model_validate(deep_merge(BASE, changes, whole=("rewards",)))
        payload = {"config": cfg.model_dump(mode="json"), "seed": 0,
                   "paths": {"train_tasks": [str(f) for f in train],
                             "init_model": str(model), "work": str(root / "work"), "checkpoints": str(root / "ckpt"),
                             "out": str(root / "out")}}
        rows = []

        def on_metrics(m):
            rows.append(m)
            if "reward/mean" in m and m["iteration"] % 10 == 0:
                print(f"it {m['iteration']} t={time.time() - start:.0f}s reward {m['reward/mean']:.3f} "
                      f"acc {m['reward/accuracy/mean']:.3f} len {m['response_length/mean']:.0f} "
                      f"zero-variance groups {m['zero_variance_groups']:.2f}", flush=True)
        run_gang(ppo.worker, payload, GangConfig(num_workers=2), checkpoints=root / "ckpt", work=root / "work",
                 on_metrics=on_metrics, name="prl")
        (root / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        model = root / "out" / "model"
    rl_seconds = time.time() - start
    fig, _ = evaluate_on_ray(model, dev, EvalConfig(max_new_tokens=384, pass_at_k={"tasks": 0}), seed=0)
    print("RESULT", name, json.dumps(changes), f"rl {rl_seconds:.0f}s dev n={fig['eval/n']} acc {fig['eval/accuracy']:.4f} "
          f"format {fig['eval/format_rate']:.3f} length {fig['eval/mean_length']:.0f}", flush=True)


if __name__ == "__main__":
    main()
