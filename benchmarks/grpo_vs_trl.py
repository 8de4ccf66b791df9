"""Our GRPO step against TRL's `GRPOTrainer` (trl 1.16): step time, generation and update apart,
generated tokens/s.

Both sides train the demo's SFT model (ours: runs/demo/sft/model; TRL: its `r1pipe export`, which
transformers loads as Qwen2-MoE, with the exported chat template that renders as
training/template.py does) on the same train prompts in the same order (our prompt sampler's
order, replayed here; TRL's dataset in that order with shuffle_dataset=False), with the same
reward: `answer_reward` below, 1 when the text of the completion's last <answer> equals the task's
answer, else 0 (both sides call this very function; ours by import path as a custom reward term).

Same on both sides: 8 completions per optimizer step (2 prompts x group size 4; ours:
rollout.prompts=2, minibatch=micro_batch=8; TRL: per_device_train_batch_size=8, num_generations=4,
one generation per step), one update per generation, max new tokens 128 stopping at </s> or
</answer>, temperature 1, no KL (TRL beta=0; ours kl_coef=0: no reference model on either side),
group-normalised advantages with the per-response token mean (ours grpo + seq-mean-token-mean;
TRL loss_type="grpo", scale_rewards="group"), clip 0.2, constant lr, fp32, grad clip 1, one torch
thread, each run in a fresh process, no checkpoint or eval inside the measured window.

Step time: wall seconds between consecutive steps' end; the first --warmup steps and the last one
(ours saves there) are run but not timed. Per run the median; per side the median over --repeat
runs; runs alternate ours/TRL (the order flips each rep). ratio = ours / TRL; goal <= 0.8.
Generation: ours the rollout's generate phase; TRL `_generate_single_turn`. Update: ours the
engine's optimizer step (forward, backward, step); TRL the step minus `_generate_and_score_completions`.
Generated tokens/s: completion tokens of the step / generation seconds.

    .venv/bin/python benchmarks/grpo_vs_trl.py --trl-python /tmp/trl-venv/bin/python --hf /tmp/grpobench/hf \\
        --steps 12 --repeat 3

(The venv as in benchmarks/dpo_vs_trl.py; the export is made if --hf holds none.)
Writes benchmarks/out/grpo_vs_trl.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
              "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def _matches(text: str, answer: str) -> float:
    found = _ANSWER.findall(text)
    return float(bool(found) and found[-1].strip() == answer.strip())


def answer_reward(samples, **_) -> list[float]:
    """Ours: a custom reward term (rl/rewards.py's batch signature)."""
    return [_matches(s.completion, s.answer) for s in samples]


def trl_answer_reward(prompts, completions, answer, **_) -> list[float]:
    """TRL's reward-function signature; conversational completions are lists of messages."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [_matches(t, a) for t, a in zip(texts, answer)]


# ----------------------------------------------------------------------------- ours (project venv)


def ours_worker(spec: dict) -> dict:
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO))
    from rl.config import RlConfig
    from rl.ppo import RlPaths, rl
    from training.loop import Hooks
    rows = []
    hooks = Hooks(on_metrics=lambda m, step: rows.append({k: v for k, v in m.items() if isinstance(v, (int, float))}
                                                         | {"t_end": time.perf_counter()}))
    cfg = RlConfig.model_validate(spec["our_config"])
    work = Path(spec["work"])
    rl(cfg, RlPaths([Path(spec["train_file"])], Path(spec["model"]), work / "w", work / "ckpt", work / "out"),
       seed=spec["seed"], hooks=hooks)
    steps = [{"t_end": r["t_end"], "generate_s": r["time/generate"], "update_s": r["step_seconds"],
              "completion_tokens": r["response_length/mean"] * spec["batch"]} for r in rows]
    return {"side": "ours", "steps": steps, "first_rewards": [r["reward/mean"] for r in rows[:3]]}


# ----------------------------------------------------------------------------- TRL (benchmark venv)


def trl_worker(spec: dict) -> dict:
    import torch
    torch.set_num_threads(1)
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    datasets.disable_progress_bars()
    timing = {"generate": [], "generate_and_score": []}

    class Bench(GRPOTrainer):
        def _generate_single_turn(self, *a, **kw):
            start = time.perf_counter()
            out = super()._generate_single_turn(*a, **kw)
            timing["generate"].append((time.perf_counter() - start, sum(len(c) for c in out[0])))
            return out

        def _generate_and_score_completions(self, *a, **kw):
            start = time.perf_counter()
            out = super()._generate_and_score_completions(*a, **kw)
            timing["generate_and_score"].append(time.perf_counter() - start)
            return out

    class Clock(TrainerCallback):
        def __init__(self):
            self.end, self.rewards = {}, {}

        def on_step_end(self, args, state, control, **kw):
            self.end[state.global_step] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                self.rewards[state.global_step] = logs["reward"]

    rows = [json.loads(line) for line in Path(spec["trl_prompts"]).read_text().splitlines()]
    train = datasets.Dataset.from_list(rows)
    tok = AutoTokenizer.from_pretrained(spec["hf"])
    model = AutoModelForCausalLM.from_pretrained(spec["hf"], dtype=torch.float32)
    stop = [tok.convert_tokens_to_ids(t) for t in ("</s>", "</answer>")]
    args = GRPOConfig(output_dir=str(Path(spec["work"]) / "trl_out"), use_cpu=True, report_to="none",
                      max_steps=spec["total_steps"], per_device_train_batch_size=spec["batch"],
                      num_generations=spec["group"], max_completion_length=spec["max_new"], temperature=1.0,
                      top_p=1.0, beta=0.0, loss_type="grpo", scale_rewards="group", epsilon=0.2,
                      learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                      max_grad_norm=1.0, bf16=False, gradient_checkpointing=False, shuffle_dataset=False,
                      logging_steps=1, save_strategy="no", eval_strategy="no", seed=spec["seed"],
                      dataloader_num_workers=0, disable_dropout=True,
                      generation_kwargs={"eos_token_id": stop, "pad_token_id": tok.pad_token_id})
    clock = Clock()
    trainer = Bench(model=model, reward_funcs=trl_answer_reward, args=args, train_dataset=train,
                    processing_class=tok, callbacks=[clock])
    trainer.train()
    steps = []
    for k in sorted(clock.end):
        i = k - 1
        gen_s, tokens = timing["generate"][i]
        steps.append({"t_end": clock.end[k], "generate_s": gen_s, "completion_tokens": tokens,
                      "update_s": None})
        steps[-1]["score_s"] = timing["generate_and_score"][i]
    return {"side": "trl", "steps": steps, "first_rewards": [clock.rewards.get(k) for k in (1, 2, 3)]}


# ----------------------------------------------------------------------------- the driver


def prepare(args, work: Path) -> dict:
    sys.path.insert(0, str(REPO))
    from rl.eval import load_tasks
    from rl.sampling import PromptSampler
    from training.template import prompt_messages
    model = REPO / "runs" / "demo" / "sft" / "model"
    hf = Path(args.hf)
    if not (hf / "config.json").is_file():
        subprocess.run([str(REPO / ".venv" / "bin" / "r1pipe"), "export", str(model.parent), str(hf)], check=True)
    train_file = sorted((REPO / "runs" / "demo" / "tasks" / "train").glob("*.parquet"))[0]
    tasks = load_tasks(train_file)
    per_step = args.batch // args.group
    total = args.warmup + args.steps + 1
    order = PromptSampler(len(tasks), args.seed).take(per_step * total)
    trl_prompts = work / "prompts.jsonl"
    trl_prompts.write_text("".join(json.dumps({"prompt": prompt_messages(tasks[i].prompt, tasks[i].system),
                                               "answer": tasks[i].answer}) + "\n" for i in order))
    our_config = {"algorithm": "grpo", "iterations": total, "minibatch": args.batch, "micro_batch": args.batch,
                  "checkpoint_every": total + 1,
                  "rollout": {"prompts": per_step, "group_size": args.group, "max_new_tokens": args.max_new,
                              "temperature": 1.0, "batch_size": args.batch},
                  "rewards": {"benchmarks.grpo_vs_trl:answer_reward": 1.0},
                  "loss": {"eps_low": 0.2, "kl_coef": 0.0, "entropy_coef": 0.0},
                  "engine": {"zero_stage": 0, "precision": "fp32", "grad_clip": 1.0,
                             "optimizer": {"lr": args.lr, "warmup_steps": 0, "min_lr_ratio": 1.0,
                                           "weight_decay": 0.0}}}
    return {"model": str(model), "hf": str(hf), "train_file": str(train_file), "trl_prompts": str(trl_prompts),
            "our_config": our_config, "total_steps": total, "batch": args.batch, "group": args.group,
            "max_new": args.max_new, "lr": args.lr, "seed": args.seed}


def run_side(side: str, spec: dict, python: str, work: Path) -> dict:
    spec = {**spec, "work": str(work)}
    spec_file = work / "spec.json"
    work.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(spec))
    out = work / "result.json"
    code = (f"import json,sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks.grpo_vs_trl import {side}_worker; "
            f"r = {side}_worker(json.load(open({str(spec_file)!r}))); json.dump(r, open({str(out)!r}, 'w'))")
    proc = subprocess.run([python, "-c", code], cwd=REPO, env={**os.environ, **THREAD_ENV},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def summarise(result: dict, warmup: int) -> dict:
    steps = result["steps"]
    timed = range(warmup + 1, len(steps) - 1)  # deltas after the warmup, without the last (saving) step
    deltas = [steps[i]["t_end"] - steps[i - 1]["t_end"] for i in timed]
    gen = [steps[i]["generate_s"] for i in timed]
    tokens = [steps[i]["completion_tokens"] for i in timed]
    if result["side"] == "trl":
        update = [deltas[j] - steps[i]["score_s"] for j, i in enumerate(timed)]
    else:
        update = [steps[i]["update_s"] for i in timed]
    return {"step_s": statistics.median(deltas), "generate_s": statistics.median(gen),
            "update_s": statistics.median(update), "generated_tokens_per_s": sum(tokens) / sum(gen),
            "completion_tokens_per_step": statistics.mean(tokens), "first_rewards": result["first_rewards"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trl-python", required=True)
    ap.add_argument("--hf", default="/tmp/grpobench/hf")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="grpo_vs_trl_"))
    spec = prepare(args, work)
    runs = {"ours": [], "trl": []}
    for rep in range(args.repeat):
        order = ("ours", "trl") if rep % 2 == 0 else ("trl", "ours")
        for side in order:
            python = sys.executable if side == "ours" else args.trl_python
            result = run_side(side, spec, python, work / f"{side}-{rep}")
            runs[side].append(summarise(result, args.warmup))
            print(side, rep, json.dumps(runs[side][-1]), flush=True)
    med = {side: {k: statistics.median(r[k] for r in rs) for k in ("step_s", "generate_s", "update_s",
                                                                       "generated_tokens_per_s")}
           for side, rs in runs.items()}
    report = {"args": vars(args), "median": med, "runs": runs,
              "ratio_step": med["ours"]["step_s"] / med["trl"]["step_s"],
              "ratio_generate": med["ours"]["generate_s"] / med["trl"]["generate_s"],
              "ratio_update": med["ours"]["update_s"] / med["trl"]["update_s"]}
    out = REPO / "benchmarks" / "out" / "grpo_vs_trl.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
