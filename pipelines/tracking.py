"""W&B runs: one per stage execution (group = run id, job_type = stage).

Library code never imports wandb; it gets a ``Sink``. Offline by
default: no key and no network needed; ``wandb sync <dir>`` uploads later.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import wandb


class WandbSink:
    """A Sink backed by one W&B run. Create it on the process that logs (rank 0)."""

    def __init__(self, *, mode: str, project: str, entity: str | None, run_id: str, stage: str,
                 config: dict, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project, entity=entity, group=run_id, job_type=stage,
            name=f"{run_id}/{stage}", config=config, dir=str(directory), mode=mode,
            reinit="finish_previous", settings=wandb.Settings(silent=True, console="off"))

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.run.log(_flat(metrics), step=step)

    def table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def bar(self, key: str, label: str, value: str, rows: list[list[Any]], title: str) -> None:
        table = wandb.Table(columns=[label, value], data=rows)
        self.run.log({key: wandb.plot.bar(table, label, value, title=title)})

    def figure(self, key: str, fig: Any) -> None:
        """A plotly figure, shown as an interactive chart in the W&B run."""
        self.run.log({key: wandb.Plotly(fig)})

    def summary(self, metrics: dict[str, Any]) -> None:
        self.run.summary.update(_flat(metrics))

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def make_sink(wandb_cfg, run_dir: Path, run_id: str, stage: str, config: dict) -> WandbSink:
    directory = Path(wandb_cfg.dir) if wandb_cfg.dir else run_dir / "wandb"
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbSink(mode=wandb_cfg.mode, project=wandb_cfg.project, entity=wandb_cfg.entity,
                     run_id=run_id, stage=stage, config=config, directory=directory)


def _flat(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become slash-separated keys: {"rejected": {"bad_json": 3}} -> rejected/bad_json."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out
