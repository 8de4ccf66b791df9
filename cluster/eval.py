"""Evaluation on Ray: the work items of rl/eval.py spread over Ray tasks, each loading the model once.

One machine:  evaluate_on_ray("runs/demo/sft/model", tasks, EvalConfig(), seed=0)   # one task per CPU
A cluster:    the same with EvalConfig(use_gpu=True, workers=8): one GPU per task, thousands of prompts

The items (and their sampling seeds) are planned on the driver from the tasks alone, so the
figures are the same whatever the number of workers; records come back in task order.
"""
from __future__ import annotations

from pathlib import Path

import ray

from cluster import storage
from rl.config import EvalConfig
from rl.eval import EvalTask, aggregate, plan_batches, spread


def _run_items(model_dir: str, items: list[dict], cfg_json: dict, seed: int, threads: int, use_gpu: bool,
               mirrors: dict[str, str]) -> list[dict]:
    import torch
    storage.adopt(mirrors)
    storage.localize(model_dir)
    from rl.eval import run_item
    from training.export import load_any
    from training.tokenizer import load_tokenizer
    torch.set_num_threads(max(1, threads))
    cfg = EvalConfig.model_validate(cfg_json)
    model = load_any(model_dir).eval()
    if use_gpu:
        model = model.to("cuda")
    tok = load_tokenizer(model_dir)
    return [rec | {"item": item["index"]} for item in items for rec in run_item(model, tok, item, cfg, seed)]


def evaluate_on_ray(model_dir: str | Path, tasks: list[EvalTask], cfg: EvalConfig, *, seed: int) -> tuple[dict, list[dict]]:
    """Figures and per-task records of a model folder (ours or a transformers export, with its
    tokenizer.json) on held-out tasks."""
    records = run_items_on_ray(model_dir, plan_batches(spread(tasks, cfg.max_tasks), cfg), cfg, seed=seed)
    order = {t.id: i for i, t in enumerate(tasks)}
    records.sort(key=lambda r: (r["samples"] > 1, order.get(r["id"], 0)))
    return aggregate(records, cfg), records


def sample_on_ray(model_dir: str | Path, tasks: list[EvalTask], cfg: EvalConfig, *, k: int, seed: int) -> list[dict]:
    """k sampled completions of every task (temperature and top_p of cfg.pass_at_k), each with
    its scores: records with texts, correct_each and format_each, in task order."""
    per_item = max(1, cfg.batch_size // k)
    items = [{"index": i, "tasks": tasks[s:s + per_item], "samples": k, "keep_texts": True}
             for i, s in enumerate(range(0, len(tasks), per_item))]
    records = run_items_on_ray(model_dir, items, cfg, seed=seed)
    order = {t.id: i for i, t in enumerate(tasks)}
    return sorted(records, key=lambda r: order[r["id"]])


def run_items_on_ray(model_dir: str | Path, items: list[dict], cfg: EvalConfig, *, seed: int) -> list[dict]:
    """rl/eval.py's work items over Ray tasks (one per CPU, or per GPU with cfg.use_gpu)."""
    resource = "GPU" if cfg.use_gpu else "CPU"
    available = int(ray.cluster_resources().get(resource, 0))
    if available < 1:
        raise ValueError(f"eval: the Ray cluster has no {resource} for evaluation workers (eval.use_gpu={cfg.use_gpu})")
    workers = max(1, min(cfg.workers or available, len(items)))
    threads = 1 if cfg.use_gpu else max(1, int(ray.cluster_resources().get("CPU", 1)) // workers)
    remote = ray.remote(_run_items).options(num_cpus=0 if cfg.use_gpu else threads,
                                            num_gpus=1 if cfg.use_gpu else 0, max_retries=1)
    # greedy items first in each worker's share, largest work (pass@k) spread evenly
    shares = [items[w::workers] for w in range(workers)]
    uri = storage.remote_of(Path(model_dir))
    if uri is not None and sum(n["Alive"] for n in ray.nodes()) > 1:
        storage.sync_up(Path(model_dir), uri)  # for workers on nodes without the folder; once per model
    refs = [remote.remote(str(model_dir), share, cfg.model_dump(mode="json"), seed, threads, cfg.use_gpu,
                          storage.carried()) for share in shares if share]
    return [r for part in ray.get(refs) for r in part]
