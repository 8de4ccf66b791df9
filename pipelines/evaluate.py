"""`r1pipe eval`: the held-out evaluation of any model folder, the same figures a stage records.

    r1pipe eval runs/demo/sft                      # a stage folder: its run's held-out tasks
    r1pipe eval out/hf --tasks runs/demo/tasks/eval --json
    r1pipe eval out/hf --seed 7 --n 260            # freshly generated tasks (the generator's default mix)

MODEL_DIR is a training stage's folder, its model/ folder, or a transformers export of one.
Tasks: --tasks (the tasks stage's eval split, a Parquet file or folder, or a JSONL of tasks);
else, for a model inside a run, that run's tasks/eval; else --n generated tasks from --seed,
which may overlap what the model trained on (the command says so).
"""
from __future__ import annotations

from pathlib import Path

from rl.config import EvalConfig
from rl.eval import EvalTask, load_tasks
from training.export import CONFIG, WEIGHTS, refuse_reward_model


def model_folder(path: str | Path) -> Path:
    """The folder holding the weights: the path itself or its model/."""
    path = Path(path)
    for candidate in (path / "model", path):
        refuse_reward_model(candidate)
        if (candidate / WEIGHTS).is_file() and (candidate / CONFIG).is_file():
            if not (candidate / "tokenizer.json").is_file():
                raise ValueError(f"{candidate}: no tokenizer.json beside the weights")
            return candidate
    raise ValueError(f"{path}: no {WEIGHTS} + {CONFIG} here or in model/ (a stage folder, a model folder or an export)")


def run_tasks(path: Path) -> Path | None:
    """The held-out split of the run a stage or model folder belongs to, if it has one."""
    for folder in (path, *path.parents[:2]):
        split = folder.parent / "tasks" / "eval"
        if (folder / "manifest.json").is_file() and split.is_dir():
            return split
    return None


def choose_tasks(model_path: Path, tasks: str | None, seed: int, n: int) -> tuple[list[EvalTask], str]:
    """(tasks, where they came from)."""
    if tasks:
        return load_tasks(tasks), str(tasks)
    split = run_tasks(Path(model_path).resolve())
    if split is not None:
        return load_tasks(split), str(split)
    from data_engine.generators.tasks import generate_tasks
    generated = [EvalTask(t.id, t.family, t.difficulty, t.prompt, t.answer) for t in generate_tasks(n, seed)]
    return generated, f"generated (seed {seed}, n {n}; not checked against the model's training data)"


def evaluate_folder(path: str, *, tasks: str | None, seed: int, n: int, cfg: EvalConfig) -> dict:
    from cluster.eval import evaluate_on_ray
    from cluster.session import RaySettings, connect
    folder = model_folder(path)
    chosen, source = choose_tasks(Path(path), tasks, seed, n)
    connect(RaySettings())
    figures, _ = evaluate_on_ray(folder, chosen, cfg, seed=seed)
    return {"model": str(folder), "tasks": source, **figures}
