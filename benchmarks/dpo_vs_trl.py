"""Our `dpo` step against TRL's `DPOTrainer` (trl 1.16): step time, and the same loss at step 1.

Both sides train the demo's SFT model on the same preference pairs in the same order: ours reads
runs/demo/sft/model, TRL reads its `r1pipe export` (transformers loads it as Qwen2-MoE) with the
exported tokenizer's chat template, which renders and tokenizes exactly as training/template.py
does (TRL gets the pairs in conversational form: the prompt as messages, system and earlier turns
included, chosen/rejected as assistant messages). The pairs are the first N of the pairs stage's
train split whose both sequences fit the max length (so TRL truncates nothing and ours leaves none
out), N = batch x steps run; our curriculum sampler's batch order (recipe seed, replayed here) is
fed to TRL as its dataset order with a sequential sampler, so every step sees the same 8 pairs.

Same on both sides: batch 8 pairs per optimizer step, no gradient accumulation (our micro_batch =
global_batch = 8), sigmoid DPO with the recipe's beta, max length 512, fp32 (TRL's defaults bf16=True
and gradient_checkpointing=True are turned off), grad clip, the recipe's lr/warmup, no eval and no
checkpoint inside the measured window (ours: eval_every and checkpoint.every past the last step,
val_max_pairs 0; TRL: eval and save off, a log line each step), one torch thread
(OMP_NUM_THREADS=MKL_NUM_THREADS=1 and torch.set_num_threads(1)), each run in a fresh process.
With --trl-optimizer same (the default) TRL gets the very AdamW and warmup-cosine schedule our
engine builds (torch.optim.AdamW, decay on matrices, betas, eps, min-lr floor) through
`optimizers=`; with --trl-optimizer trl it builds its own from DPOConfig fields set to the same
values (transformers' default fused AdamW, cosine_with_min_lr).

Two pairings, each like with like:
  online       ours `reference: online` (a frozen copy scores each batch) vs TRL's default (a
               reference model forward per step);
  precomputed  ours `reference: precomputed` vs TRL `precompute_ref_log_probs=True`; the pass over
               all pairs happens before step 1 on both sides and is reported apart (precompute_s;
               ours includes building the frozen reference engine, reported as ref_build_s).

Step time: wall seconds between consecutive steps' end (ours: the loop's on_metrics hook; TRL: a
TrainerCallback's on_step_end), so data batching, the optimizer and the logging are in; the first
--warmup steps and the last step (ours evaluates, checkpoints and saves there) are run but not
timed: each run has warmup + steps + 1 optimizer steps and yields `steps` deltas. Per run the
median delta; per side the median over the --repeat runs; runs alternate ours/TRL (the order flips
each rep). ratio = ours / TRL of those medians; goal <= 0.8. The same deltas by the process's CPU
time (cpu, ratio_cpu) move less when other jobs load a shared machine. "inner" is the step without
the data loader/logging (ours: engine.train_step; TRL: on_step_begin -> on_step_end), for reference.

Step 1 (policy = reference) must agree: dpo loss ln 2 on both, and the same logps/chosen and
logps/rejected (the batch means of the summed response log-probs), which only holds when the two
sides score the same tokens with the same weights. The total loss also carries each side's MoE
balance loss (ours: switch loss x aux_loss_coef, summed over MoE layers; TRL: transformers'
load_balancing_loss_func x router_aux_loss_coef), which are not the same function; dpo_loss
excludes it (TRL: loss - router_aux_loss_coef x aux_loss).

Set up the benchmark-only venv (never the project's) and run:

    .venv/bin/r1pipe export runs/demo/sft /tmp/trlbench/hf
    python3 -m venv /tmp/trl-venv
    /tmp/trl-venv/bin/pip install -c constraints-cpu.txt torch==2.13.0 trl==1.16.0
    .venv/bin/python benchmarks/dpo_vs_trl.py --trl-python /tmp/trl-venv/bin/python \\
        --hf /tmp/trlbench/hf --steps 60 --repeat 3

(trl 1.16.0 pulls transformers, accelerate and datasets; this machine's pip finds the CPU torch
wheel through its configured find-links, elsewhere add --index-url https://download.pytorch.org/whl/cpu
for torch.) The export is made if --hf holds none. Quick check: --steps 6 --repeat 1.
Writes benchmarks/out/dpo_vs_trl.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAIRINGS = ("online", "precomputed")
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
              "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
STEP1_KEYS = ("loss", "dpo_loss", "aux_loss", "logps/chosen", "logps/rejected", "rewards/chosen",
              "rewards/rejected", "rewards/margins", "grad_norm", "lr")


def lr_at(step: int, lr: float, warmup: int, min_ratio: float, total: int) -> float:
    """training/engine.py's lr_at, for the TRL venv (which cannot import the project)."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _scalars(d: dict) -> dict:
    return {k: (float(v) if not isinstance(v, (bool, int)) else v) for k, v in d.items()
            if isinstance(v, (int, float, bool)) and not isinstance(v, str)}


# ----------------------------------------------------------------------------- ours (project venv)


def ours_worker(spec: dict) -> dict:
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO))
    from rl import dpo as dpo_mod
    from rl.config import DpoConfig
    from training.engine import FrozenModel
    from training.loop import Hooks

    timing: dict[str, float] = {}

    # the precompute pass per split (it builds the frozen reference on first use), and that build
    precompute = dpo_mod.ReferenceLogps._precompute

    def timed_precompute(self, model_digest, split, *a, **kw):
        start = time.perf_counter()
        try:
            return precompute(self, model_digest, split, *a, **kw)
        finally:
            timing[f"precompute_{split}_s"] = timing.get(f"precompute_{split}_s", 0.0) + time.perf_counter() - start
    dpo_mod.ReferenceLogps._precompute = timed_precompute
    build = FrozenModel.from_folder.__func__

    def from_folder(cls, *a, **kw):
        start = time.perf_counter()
        try:
            return build(cls, *a, **kw)
        finally:
            timing["ref_build_s"] = timing.get("ref_build_s", 0.0) + time.perf_counter() - start
    FrozenModel.from_folder = classmethod(from_folder)

    rows, begins = [], {}
    hooks = Hooks(on_metrics=lambda m, step: rows.append({**_scalars(m), "t_end": time.perf_counter(),
                                                          "c_end": time.process_time()}),
                  on_step=lambda step, model: begins.setdefault(step + 1, time.perf_counter()))
    cfg = DpoConfig.model_validate(spec["our_config"])
    work = Path(spec["work"])
    paths = dpo_mod.DpoPaths([Path(f) for f in spec["train_files"]], [Path(f) for f in spec["val_files"]],
                             Path(spec["model"]), work / "ref", work / "checkpoints", work / "out")
    start = time.perf_counter()
    summary = dpo_mod.dpo(cfg, paths, seed=spec["seed"], hooks=hooks)
    for r in rows:
        r["t_begin"] = begins.get(r["step"])
    return {"side": "ours", "rows": rows, "timing": {**timing, "first_step_at_s": begins[1] - start},
            "summary": _scalars(summary), "torch_threads": torch.get_num_threads(),
            "widths": spec["widths_ours"]}


# ----------------------------------------------------------------------------- TRL (benchmark venv)


def trl_worker(spec: dict) -> dict:
    import dataclasses

    import torch
    torch.set_num_threads(1)
    import datasets
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    datasets.disable_progress_bars()
    opt = spec["optimizer"]
    timing: dict[str, float] = {}

    class Bench(DPOTrainer):
        widths: list = []

        def _get_train_sampler(self, train_dataset=None):
            # the dataset is already in our sampler's order: step k's pairs are rows 8(k-1)..8k-1
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            start = time.perf_counter()
            try:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            finally:
                timing[f"precompute_{name}_s"] = timing.get(f"precompute_{name}_s", 0.0) + time.perf_counter() - start

        def training_step(self, model, inputs, *a, **kw):
            Bench.widths.append(int(inputs["input_ids"].shape[1]))
            return super().training_step(model, inputs, *a, **kw)

    class Clock(TrainerCallback):
        def __init__(self):
            self.begin, self.end, self.cpu, self.logs = {}, {}, {}, {}

        def on_step_begin(self, args, state, control, **kw):
            self.begin[state.global_step + 1] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.end[state.global_step] = time.perf_counter()
            self.cpu[state.global_step] = time.process_time()

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.setdefault(state.global_step, {}).update(_scalars(logs or {}))

    start = time.perf_counter()
    rows = [json.loads(line) for line in Path(spec["trl_pairs"]).read_text().splitlines()]
    train = datasets.Dataset.from_list(rows)
    tok = AutoTokenizer.from_pretrained(spec["hf"])
    model = AutoModelForCausalLM.from_pretrained(spec["hf"], dtype=torch.float32)
    kw = dict(output_dir=str(Path(spec["work"]) / "trl_out"), use_cpu=True, report_to="none",
              max_steps=spec["total_steps"], per_device_train_batch_size=spec["batch"],
              gradient_accumulation_steps=1, max_length=spec["max_length"], bf16=False, fp16=False,
              beta=spec["beta"], loss_type=["sigmoid"],
              label_smoothing=spec["label_smoothing"], precompute_ref_log_probs=spec["reference"] == "precomputed",
              eval_strategy="no", save_strategy="no", logging_strategy="steps", logging_steps=1,
              disable_tqdm=True, dataloader_num_workers=0, seed=spec["seed"], max_grad_norm=spec["grad_clip"],
              learning_rate=opt["lr"], warmup_steps=opt["warmup_steps"])
    # TRL defaults to gradient checkpointing; transformers 5 calls it activation_checkpointing
    fields = {f.name for f in dataclasses.fields(DPOConfig)}
    kw["activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"] = False
    optimizers = (None, None)
    if spec["trl_optimizer"] == "same":
        decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
        optim = torch.optim.AdamW([{"params": decay, "weight_decay": opt["weight_decay"]},
                                   {"params": rest, "weight_decay": 0.0}],
                                  lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"])
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: lr_at(
            s, opt["lr"], opt["warmup_steps"], opt["min_lr_ratio"], spec["total_steps"]) / opt["lr"])
        optimizers = (optim, sched)
    else:  # TRL builds its optimizer (transformers' default AdamW) from the same hyperparameters
        kw.update(weight_decay=opt["weight_decay"], adam_beta1=opt["betas"][0], adam_beta2=opt["betas"][1],
                  adam_epsilon=opt["eps"], lr_scheduler_type="cosine_with_min_lr",
                  lr_scheduler_kwargs={"min_lr_rate": opt["min_lr_ratio"]})
    clock = Clock()
    trainer = Bench(model=model, args=DPOConfig(**kw), train_dataset=train, processing_class=tok,
                    callbacks=[clock], optimizers=optimizers)
    setup_s = time.perf_counter() - start
    trainer.train()
    coef = float(trainer.router_aux_loss_coef) if trainer.aux_loss_enabled else 0.0
    out_rows = []
    for step in sorted(clock.end):
        logs = clock.logs.get(step, {})
        row = {"step": step, "t_end": clock.end[step], "c_end": clock.cpu[step], "t_begin": clock.begin.get(step),
               **logs}
        if "loss" in logs:
            row["dpo_loss"] = logs["loss"] - coef * logs.get("aux_loss", 0.0)
            row["aux_loss"] = coef * logs.get("aux_loss", 0.0)  # times its coefficient, as ours reports it
        if "learning_rate" in logs:
            row["lr"] = logs["learning_rate"]
        out_rows.append(row)
    tokens = [r.get("num_tokens") for r in out_rows]
    for r, prev in zip(out_rows, [0.0] + tokens[:-1]):
        if r.get("num_tokens") is not None and prev is not None:
            r["tokens_this_step"] = r["num_tokens"] - prev
    import trl
    import transformers
    inner_opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    return {"side": "trl", "rows": out_rows, "timing": {**timing, "setup_s": setup_s},
            "torch_threads": torch.get_num_threads(), "widths": Bench.widths, "router_aux_loss_coef": coef,
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                         "torch": torch.__version__, "datasets": datasets.__version__},
            "attn_implementation": model.config._attn_implementation,
            "activation_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
            "optimizer": type(inner_opt).__name__,
            "optimizer_defaults": {k: v for k, v in inner_opt.defaults.items()
                                   if isinstance(v, (int, float, bool, str, type(None)))}}


# ----------------------------------------------------------------------------- the driver


def prepare(args, work: Path) -> dict:
    """The pairs (ours: a parquet of the first N that fit; TRL: JSONL in our batch order) and the spec."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    sys.path.insert(0, str(REPO))
    from pipelines.config import load_config
    from rl.config import DpoConfig
    from rl.dpo import PairPools, encode_pairs, read_pairs
    from training.pretrain_data import CurriculumSampler
    from training.tokenizer import load_tokenizer

    recipe = load_config(args.recipe)
    section = recipe.section("dpo").model_dump(mode="json", exclude={"gang", "eval", "init_model"})
    total = args.warmup + args.steps + 1
    section.update(steps=total, eval_every=total + 1,
                   checkpoint={**section["checkpoint"], "every": total + 1, "keep": 1})
    section["data"].update(seq_len=args.max_length, micro_batch=args.batch, global_batch=args.batch,
                           val_max_pairs=0, curriculum={**section["data"]["curriculum"]})
    seed = recipe.seed  # the stage passes the recipe seed to dpo()
    cfg = DpoConfig.model_validate(section)
    if cfg.loss.name != "sigmoid":
        raise SystemExit(f"the recipe's dpo loss is {cfg.loss.name}; this benchmark compares sigmoid DPO")

    model_dir = args.run / "sft" / "model"
    tok = load_tokenizer(model_dir)
    files = sorted((args.run / "pairs" / "train").glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])  # read_pairs' order: sorted files
    rows = read_pairs(files)
    n = args.pairs or args.batch * total
    keep, encoded = [], []
    for i, row in enumerate(rows):
        pairs, _ = encode_pairs([row], tok, args.max_length)
        if pairs and max(len(pairs[0].chosen), len(pairs[0].rejected)) <= args.max_length:
            keep.append(i)
            encoded.append(pairs[0])
            if len(keep) == n:
                break
    if len(keep) < n:
        print(f"only {len(keep)} pairs fit max_length={args.max_length}; using them", flush=True)
    (work / "pairs").mkdir(parents=True, exist_ok=True)
    train_file = work / "pairs" / "train.parquet"
    pq.write_table(table.take(keep), train_file)
    subset = [rows[i] for i in keep]

    # replay our sampler (rl/dpo.py DpoJob: the dpo() seed, curriculum as the recipe says)
    pools = PairPools(encoded)
    sampler = CurriculumSampler(pools, cfg.data, cfg.steps, seed, weights={}, weights_key="data.family_weights")
    order = []
    for _ in range(total):
        order.append([pools.train[p].rows[s][0] for p, s in sampler.next_batch()])

    def messages(row: dict) -> list[dict]:
        context = json.loads(row["context"]) if row.get("context") else []
        head = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return head + list(context) + [{"role": "user", "content": row["prompt"]}]

    trl_file = work / "pairs" / "trl.jsonl"
    with open(trl_file, "w") as f:
        for step in order:
            for i in step:
                r = subset[i]
                f.write(json.dumps({"prompt": messages(r), "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                    "rejected": [{"role": "assistant", "content": r["rejected"]}]}) + "\n")
    seqs = [[encoded[i].chosen for i in step] + [encoded[i].rejected for i in step] for step in order]
    tokens = [sum(map(len, s)) for s in seqs]
    widths_trl = [max(map(len, s)) for s in seqs]
    widths_ours = [-(-w // 8) * 8 for w in widths_trl]
    o = cfg.engine.optimizer
    return {"our_config": cfg.model_dump(mode="json"), "seed": seed, "total_steps": total, "batch": args.batch,
            "max_length": args.max_length, "beta": cfg.loss.beta, "label_smoothing": cfg.loss.label_smoothing,
            "grad_clip": cfg.engine.grad_clip, "precision": cfg.engine.precision, "zero_stage": cfg.engine.zero_stage,
            "optimizer": {"lr": o.lr, "warmup_steps": o.warmup_steps, "min_lr_ratio": o.min_lr_ratio,
                          "weight_decay": o.weight_decay, "betas": list(o.betas), "eps": o.eps},
            "trl_optimizer": args.trl_optimizer, "model": str(model_dir), "hf": str(args.hf),
            "train_files": [str(train_file)],
            "val_files": [str(f) for f in sorted((args.run / "pairs" / "eval").glob("*.parquet"))],
            "trl_pairs": str(trl_file), "pairs": len(keep), "order": order,
            "tokens_per_step": tokens, "widths_trl": widths_trl, "widths_ours": widths_ours}


def run_side(side: str, reference: str, spec: dict, python: str, work: Path, timeout: int) -> dict:
    run_dir = work / f"{side}-{reference}-{time.time_ns()}"
    run_dir.mkdir(parents=True)
    spec = {**spec, "reference": reference, "work": str(run_dir)}
    spec["our_config"] = {**spec["our_config"], "reference": reference}
    (run_dir / "spec.json").write_text(json.dumps(spec))
    out = run_dir / "result.json"
    cmd = [python, str(Path(__file__).resolve()), "--worker", side, "--spec", str(run_dir / "spec.json"),
           "--result", str(out)]
    env = {**os.environ, **THREAD_ENV}
    env.pop("RAY_ADDRESS", None)
    started = time.time()
    with open(run_dir / "log.txt", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0 or not out.is_file():
        tail = (run_dir / "log.txt").read_text()[-4000:]
        raise RuntimeError(f"{side}/{reference} failed (exit {proc.returncode}); log {run_dir}/log.txt:\n{tail}")
    result = json.loads(out.read_text())
    result["wall_s"] = time.time() - started
    return result


def step_deltas(rows: list[dict], warmup: int, steps: int, begin: bool = False, clock: str = "t") -> list[float]:
    """Seconds of steps warmup+1 .. warmup+steps: end-to-end deltas (clock t: wall, c: this process's
    CPU time), or (begin) each step's own wall span."""
    by = {r["step"]: r for r in rows}
    if begin:
        return [by[s]["t_end"] - by[s]["t_begin"] for s in range(warmup + 1, warmup + steps + 1)
                if by.get(s, {}).get("t_begin") is not None]
    return [by[s][f"{clock}_end"] - by[s - 1][f"{clock}_end"] for s in range(warmup + 1, warmup + steps + 1)]


def digest(result: dict, args, spec: dict) -> dict:
    rows = result["rows"]
    deltas = step_deltas(rows, args.warmup, args.steps)
    cpu = step_deltas(rows, args.warmup, args.steps, clock="c")
    inner = ([r["step_seconds"] for r in rows if args.warmup < r["step"] <= args.warmup + args.steps]
             if result["side"] == "ours" else step_deltas(rows, args.warmup, args.steps, begin=True))
    first = next(r for r in rows if r["step"] == 1)
    window = slice(args.warmup, args.warmup + args.steps)  # steps warmup+1.. (0-based)
    widths = result.get("widths") or []
    return {"median_step_s": statistics.median(deltas), "mean_step_s": statistics.fmean(deltas),
            "median_step_cpu_s": statistics.median(cpu),
            "median_inner_step_s": statistics.median(inner) if inner else None,
            "step_s": deltas, "step1": {k: first.get(k) for k in STEP1_KEYS},
            "dpo_loss_by_step": [r.get("dpo_loss") for r in rows],
            # real tokens of the step's 2B sequences (prompts + responses, no padding): the same on both sides
            "tokens_per_step": statistics.median(spec["tokens_per_step"][window]),
            "padded_width_median": statistics.median(widths[window]) if widths[window] else None,
            "timing": result["timing"], "torch_threads": result["torch_threads"], "wall_s": result["wall_s"]}


def summarize(runs: list[dict], args, spec: dict) -> dict:
    out: dict = {}
    for ref in PAIRINGS:
        mine = [r for r in runs if r["reference"] == ref]
        if not mine:
            continue
        entry: dict = {}
        for side in ("ours", "trl"):
            ds = [r["digest"] for r in mine if r["side"] == side]
            entry[side] = {"median_step_s": statistics.median(d["median_step_s"] for d in ds),
                           "rep_median_step_s": [d["median_step_s"] for d in ds],
                           "median_step_cpu_s": statistics.median(d["median_step_cpu_s"] for d in ds),
                           "median_inner_step_s": statistics.median(d["median_inner_step_s"] for d in ds),
                           "tokens_per_step": ds[0]["tokens_per_step"],
                           "padded_width_median": ds[0]["padded_width_median"],
                           "step1": ds[0]["step1"],
                           "timing": {k: statistics.median(d["timing"][k] for d in ds if k in d["timing"])
                                      for k in ds[0]["timing"]},
                           "torch_threads": ds[0]["torch_threads"]}
        o, t = entry["ours"], entry["trl"]
        entry["ratio_ours_over_trl"] = o["median_step_s"] / t["median_step_s"]
        entry["ratio_cpu_ours_over_trl"] = o["median_step_cpu_s"] / t["median_step_cpu_s"]
        entry["tokens_per_s"] = {s: entry[s]["tokens_per_step"] / entry[s]["median_step_s"] for s in ("ours", "trl")}
        s1o, s1t = o["step1"], t["step1"]
        diffs = {k: abs(s1o[k] - s1t[k]) for k in ("dpo_loss", "logps/chosen", "logps/rejected")
                 if s1o.get(k) is not None and s1t.get(k) is not None}
        entry["step1_abs_diff"] = diffs
        tol = {"dpo_loss": 1e-5, "logps/chosen": 1e-3 * max(1.0, abs(s1o["logps/chosen"])),
               "logps/rejected": 1e-3 * max(1.0, abs(s1o["logps/rejected"]))}
        entry["step1_agree"] = (len(diffs) == 3 and all(diffs[k] <= tol[k] for k in diffs)
                                and abs(s1o["dpo_loss"] - math.log(2)) < 1e-5)
        pairs = [(a, b) for d_o, d_t in zip([r["digest"] for r in mine if r["side"] == "ours"],
                                            [r["digest"] for r in mine if r["side"] == "trl"])
                 for a, b in zip(d_o["dpo_loss_by_step"], d_t["dpo_loss_by_step"]) if a is not None and b is not None]
        entry["max_dpo_loss_diff_all_steps"] = max((abs(a - b) for a, b in pairs), default=None)
        out[ref] = entry
    return out


def print_table(summary: dict) -> None:
    head = (f"{'pairing':<12}{'side':<6}{'median step s':>14}{'cpu s':>8}{'inner s':>9}{'tok/step':>9}{'width':>7}"
            f"{'step1 dpo':>11}{'logps/chosen':>14}{'logps/rejected':>16}{'precompute s':>14}")
    print(head)
    for ref, e in summary.items():
        for side in ("ours", "trl"):
            s = e[side]
            pre = s["timing"].get("precompute_train_s")
            print(f"{ref:<12}{side:<6}{s['median_step_s']:>14.4f}{s['median_step_cpu_s']:>8.4f}"
                  f"{s['median_inner_step_s']:>9.4f}"
                  f"{s['tokens_per_step']:>9.0f}{s['padded_width_median'] or 0:>7.0f}{s['step1']['dpo_loss']:>11.6f}"
                  f"{s['step1']['logps/chosen']:>14.4f}{s['step1']['logps/rejected']:>16.4f}"
                  f"{'' if pre is None else f'{pre:.2f}':>14}")
        print(f"{ref:<12}ratio ours/TRL {e['ratio_ours_over_trl']:.3f} (goal <= 0.8; CPU time "
              f"{e['ratio_cpu_ours_over_trl']:.3f}); step 1 agrees: "
              f"{e['step1_agree']} (|diff| {', '.join(f'{k} {v:.2e}' for k, v in e['step1_abs_diff'].items())})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trl-python", default="/tmp/trl-venv/bin/python", help="python of the venv with trl==1.16.0")
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "demo", help="a run with sft and pairs done")
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "demo.yaml", help="its recipe (dpo section)")
    ap.add_argument("--hf", type=Path, default=Path("/tmp/trlbench/hf"), help="the export of run/sft (made if missing)")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    ap.add_argument("--repeat", type=int, default=3, help="reps; each runs both sides of each pairing, alternated")
    ap.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=0, help="first N pairs (0: batch x steps run)")
    ap.add_argument("--pairing", choices=[*PAIRINGS, "both"], default="both")
    ap.add_argument("--trl-optimizer", choices=["same", "trl"], default="same",
                    help="same: our engine's AdamW + warmup-cosine passed to TRL; trl: TRL builds its own")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir, removed)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "dpo_vs_trl.json")
    ap.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        spec = json.loads(args.spec.read_text())
        result = (ours_worker if args.worker == "ours" else trl_worker)(spec)
        args.result.write_text(json.dumps(result))
        return

    os.environ.update(THREAD_ENV)  # before torch loads here too
    args.run, args.hf = args.run.resolve(), args.hf.resolve()
    if not (args.hf / "config.json").is_file():
        sys.path.insert(0, str(REPO))
        from pipelines.export import export_stage
        print(f"exporting {args.run / 'sft'} -> {args.hf}", flush=True)
        export_stage(str(args.run / "sft"), str(args.hf), overwrite=True)
    keep_work = args.work is not None
    work = args.work.resolve() if keep_work else Path(tempfile.mkdtemp(prefix="dpo_vs_trl-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        spec = prepare(args, work)
        print(f"{spec['pairs']} pairs, {spec['total_steps']} steps per run ({args.warmup} warm-up, {args.steps} timed, "
              f"1 final), batch {args.batch}, max_length {args.max_length}, TRL optimizer: {args.trl_optimizer}",
              flush=True)
        pairings = PAIRINGS if args.pairing == "both" else (args.pairing,)
        runs = []
        for rep in range(args.repeat):
            sides = ("ours", "trl") if rep % 2 == 0 else ("trl", "ours")
            for ref in pairings:
                for side in sides:
                    python = sys.executable if side == "ours" else args.trl_python
                    result = run_side(side, ref, spec, python, work, args.timeout)
                    d = digest(result, args, spec)
                    runs.append({"rep": rep, "reference": ref, "side": side, "digest": d,
                                 "versions": result.get("versions"), "optimizer": result.get("optimizer"),
                                 "attn_implementation": result.get("attn_implementation"),
                                 "activation_checkpointing": result.get("activation_checkpointing")})
                    s1 = d["step1"]
                    print(f"rep {rep} {ref:<11} {side:<4} median step {d['median_step_s']:.4f}s "
                          f"(cpu {d['median_step_cpu_s']:.4f}s) "
                          f"(inner {d['median_inner_step_s']:.4f}s)  step1 dpo_loss {s1['dpo_loss']:.6f} "
                          f"logps/chosen {s1['logps/chosen']:.4f} logps/rejected {s1['logps/rejected']:.4f}  "
                          f"threads {d['torch_threads']}  run {d['wall_s']:.0f}s", flush=True)
        summary = summarize(runs, args, spec)
        trl_info = next((r for r in runs if r["side"] == "trl"), {})
        result = {"config": {k: spec[k] for k in ("our_config", "seed", "total_steps", "batch", "max_length", "beta",
                                                  "optimizer", "trl_optimizer", "pairs", "model", "hf")},
                  "warmup": args.warmup, "steps": args.steps, "repeat": args.repeat,
                  "trl": {"versions": trl_info.get("versions"), "optimizer": trl_info.get("optimizer"),
                          "attn_implementation": trl_info.get("attn_implementation"),
                          "activation_checkpointing": trl_info.get("activation_checkpointing")},
                  "summary": summary, "runs": runs, "machine": {"cpus": os.cpu_count()}}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print()
        print_table(summary)
        print(f"wrote {args.out}")
    finally:
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
