"""Held-out evaluation: the model answers verifiable tasks with the KV cache, the task's checker scores.

    tasks = load_tasks("runs/demo/tasks/eval")                       # or a JSONL of tasks
    figures, records = evaluate(model, tokenizer, tasks, EvalConfig(), seed=0)
    figures["eval/accuracy"], figures["eval/format_rate"], figures["eval/pass@8"]

Every training stage calls this at its end (on Ray, prompts spread over workers: cluster/eval.py)
and ``r1pipe eval`` calls it on any model folder. The prompt is the one chat template's
(training/template.py); decoding is greedy for accuracy, format and length, and at a temperature
for pass@k on a subset, scored with the unbiased estimator 1 - C(n-c, k) / C(n, k).

Batches are planned from the tasks alone (sorted by prompt length, fixed size) and the sampling
seed of a batch is (seed, batch number), so the figures do not depend on how many workers
share the batches. Completions are read as text by the checkers (data_engine.generators.tasks.CHECKERS);
nothing a model writes is ever executed.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from data_engine.generators.tasks import check, format_ok
from rl.config import EvalConfig

MAX_SAVED_CHARS = 2000  # of each completion kept in the records


@dataclass(frozen=True)
class EvalTask:
    id: str
    family: str
    difficulty: str
    prompt: str
    answer: str
    checker: str = "answer"
    system: str | None = None
    context: tuple = field(default_factory=tuple)  # earlier messages, as (role, content) pairs


# ----------------------------------------------------------------------------- tasks


def load_tasks(path: str | Path) -> list[EvalTask]:
    """Held-out tasks from the tasks stage's eval split (a folder or file of Parquet) or from a JSONL
    of task rows (data_engine.generators.tasks.Task fields, or the same columns); errors name the file and row."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.parquet")) or sorted(path.glob("*.jsonl"))
        if not files:
            raise ValueError(f"{path}: no .parquet or .jsonl task files")
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"tasks {str(path)!r}: no such file or folder")
    tasks = []
    for f in files:
        for where, row in _rows(f):
            tasks.append(task_from_row(row, where))
    if not tasks:
        raise ValueError(f"{path}: no tasks")
    return tasks


def _rows(path: Path):
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {i + 1}", row
        return
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield f"{path}:{line_no}", json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not JSON ({err})") from None


def task_from_row(row: dict, where: str) -> EvalTask:
    for key in ("id", "prompt", "answer"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise ValueError(f"{where}: field {key!r} missing or empty; an eval task needs id, prompt and answer")
    context = json.loads(row["context"]) if row.get("context") else []
    return EvalTask(row["id"], row.get("family") or "user", row.get("difficulty") or "-", row["prompt"],
                    row["answer"], row.get("checker") or "answer", row.get("system"),
                    tuple((m["role"], m["content"]) for m in context))


def spread(tasks: list[EvalTask], limit: int | None) -> list[EvalTask]:
    """At most `limit` tasks, taken round robin over the (family, difficulty) cells, each cell in
    its given order: a subset covers every family and difficulty as evenly as it can."""
    if limit is None or limit >= len(tasks):
        return list(tasks)
    queues: dict[tuple[str, str], list[EvalTask]] = defaultdict(list)
    for t in tasks:
        queues[(t.family, t.difficulty)].append(t)
    out: list[EvalTask] = []
    while len(out) < limit:
        for cell in sorted(queues):
            if queues[cell] and len(out) < limit:
                out.append(queues[cell].pop(0))
    return out


def plan_batches(tasks: list[EvalTask], cfg: EvalConfig) -> list[dict]:
    """Work items: {"index", "tasks": [...], "samples": n}. Greedy batches of similar prompt length,
    then the pass@k subset's batches, each of its tasks repeated n times."""
    order = sorted(range(len(tasks)), key=lambda i: (len(tasks[i].prompt), i))
    items = [{"tasks": [tasks[i] for i in order[s:s + cfg.batch_size]], "samples": 1}
             for s in range(0, len(order), cfg.batch_size)]
    pk = cfg.pass_at_k
    subset = spread(tasks, pk.tasks) if pk.tasks else []
    per_batch = max(1, cfg.batch_size // pk.n)
    items += [{"tasks": subset[s:s + per_batch], "samples": pk.n} for s in range(0, len(subset), per_batch)]
    return [dict(item, index=i) for i, item in enumerate(items)]


# ----------------------------------------------------------------------------- decoding and scoring


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021)."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def run_item(model, tok, item: dict, cfg: EvalConfig, seed: int) -> list[dict]:
    """Decode one work item and score it: a record per task (samples > 1: counts of correct ones)."""
    import torch
    from training.generate import generate
    from training.template import encode_prompt
    from training.tokenizer import EOS, PAD, special_token_ids
    ids = special_token_ids(tok)
    n = item["samples"]
    encoded = [(t, encode_prompt(tok, t.prompt, t.system, [{"role": r, "content": c} for r, c in t.context]))
               for t in item["tasks"]]
    # a prompt that leaves no room to answer is scored as a failure, never a crash of the stage
    too_long = [_unanswered(t, n) for t, p in encoded if len(p) >= model.cfg.max_seq_len]
    encoded = [(t, p) for t, p in encoded if len(p) < model.cfg.max_seq_len]
    if not encoded:
        return too_long
    tasks, prompts = [t for t, _ in encoded], [p for _, p in encoded]
    room = model.cfg.max_seq_len - max(len(p) for p in prompts)
    device = next(model.parameters()).device  # sampling on a GPU needs a generator there
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + item["index"])
    out = generate(model, [p for p in prompts for _ in range(n)], max_new_tokens=min(cfg.max_new_tokens, room),
                   stop_ids=[ids[EOS], ids["</answer>"]], pad_id=ids[PAD],
                   temperature=0.0 if n == 1 else cfg.pass_at_k.temperature,
                   top_p=None if n == 1 else cfg.pass_at_k.top_p, generator=gen)
    texts = [completion_text(tok, row[:length].tolist()) for row, length in zip(out.tokens, out.lengths)]
    records = []
    for j, task in enumerate(tasks):
        mine = texts[j * n:(j + 1) * n]
        correct = [check(task.checker, task.answer, t) for t in mine]
        rec = {"id": task.id, "family": task.family, "difficulty": task.difficulty, "samples": n}
        if n == 1:
            rec.update(correct=correct[0], format_ok=format_ok(mine[0]), length=int(out.lengths[j]),
                       completion=mine[0][:MAX_SAVED_CHARS])
        else:
            rec.update(n=n, c=sum(correct))
        if item.get("keep_texts"):  # on-policy pairs: every sample with its scores
            rec.update(texts=mine, correct_each=correct,
                       format_each=[format_ok(t) for t in mine])
        records.append(rec)
    return records + too_long


def _unanswered(task: EvalTask, n: int) -> dict:
    rec = {"id": task.id, "family": task.family, "difficulty": task.difficulty, "samples": n, "prompt_too_long": True}
    return rec | ({"correct": False, "format_ok": False, "length": 0, "completion": ""} if n == 1 else {"n": n, "c": 0})


def completion_text(tok, token_ids: list[int]) -> str:
    """The decoded completion without padding and the end-of-sequence token (kept: </answer>)."""
    from training.tokenizer import EOS, PAD
    text = tok.decode(token_ids, skip_special_tokens=False)
    return text.replace(PAD, "").removesuffix(EOS)


def aggregate(records: list[dict], cfg: EvalConfig) -> dict:
    """Figures: accuracy (overall first), format rate, mean length, by family and difficulty, pass@k."""
    greedy = [r for r in records if r["samples"] == 1]
    if not greedy:
        return {}
    out = {"eval/accuracy": _mean(r["correct"] for r in greedy), "eval/format_rate": _mean(r["format_ok"] for r in greedy),
           "eval/mean_length": _mean(r["length"] for r in greedy), "eval/n": len(greedy),
           "eval/prompts_too_long": sum(bool(r.get("prompt_too_long")) for r in greedy)}
    for key, name in (("family", "eval/accuracy/{}"), ("difficulty", "eval/difficulty/{}/accuracy")):
        groups = defaultdict(list)
        for r in greedy:
            groups[r[key]].append(r["correct"])
        out.update({name.format(g): _mean(v) for g, v in sorted(groups.items())})
    sampled = [r for r in records if r["samples"] > 1]
    if sampled:
        k = cfg.pass_at_k.k
        out[f"eval/pass@{k}"] = _mean(pass_at_k(r["n"], r["c"], k) for r in sampled)
        out["eval/pass@1_sampled"] = _mean(r["c"] / r["n"] for r in sampled)
        out["eval/pass_at_k_tasks"] = len(sampled)
    out["tables"] = {"eval by family and difficulty": cell_table(greedy)}
    return out


def cell_table(greedy: list[dict]) -> dict:
    cells = defaultdict(list)
    for r in greedy:
        cells[(r["family"], r["difficulty"])].append(r)
    rows = [[f, d, len(rs), _mean(r["correct"] for r in rs), _mean(r["format_ok"] for r in rs),
             _mean(r["length"] for r in rs)] for (f, d), rs in sorted(cells.items())]
    return {"columns": ["family", "difficulty", "n", "accuracy", "format_rate", "mean_length"], "rows": rows}


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else 0.0


def evaluate(model, tok, tasks: list[EvalTask], cfg: EvalConfig, seed: int) -> tuple[dict, list[dict]]:
    """In process: every work item on this model, then the figures (cluster/eval.py spreads the items)."""
    records = [r for item in plan_batches(spread(tasks, cfg.max_tasks), cfg) for r in run_item(model, tok, item, cfg, seed)]
    return aggregate(records, cfg), records
