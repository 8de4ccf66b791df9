"""The stage graph: every stage's name, inputs, resources and run function.

A stage's run function takes a ``StageContext`` and returns its metrics. It
writes outputs under ``ctx.out`` (published atomically by the runner) and may
keep resumable partial work under ``ctx.work``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from pydantic import BaseModel

if TYPE_CHECKING:  # pipelines.config imports the stage registry
    from pipelines.config import PipelineConfig


# Stages whose outputs several other stages read: one home for their names.
CORPUS_STAGE = "difficulty"  # the graded corpus: the tokenizer and pretraining read its data/
TASKS_STAGE = "tasks"        # verifiable tasks: SFT data, RL prompts, every held-out evaluation
PAIRS_STAGE = "pairs"        # preference pairs: DPO and the reward model


class Sink(Protocol):
    """Where a stage's metrics go (pipelines.tracking.WandbSink: one W&B run per stage execution).
    Stages call log/table/bar/figure; the runner adds the summary and finishes it."""

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None: ...
    def table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None: ...
    def bar(self, key: str, label: str, value: str, rows: list[list[Any]], title: str) -> None: ...
    def figure(self, key: str, fig: Any) -> None: ...
    def summary(self, metrics: dict[str, Any]) -> None: ...
    def finish(self, exit_code: int = 0) -> None: ...


@dataclass
class StageContext:
    name: str
    run_id: str
    config: PipelineConfig      # the whole recipe, resolved
    section: BaseModel          # this stage's config section (PipelineConfig.section(name))
    root: Path                  # <run>/<stage>
    out: Path                   # staging folder; becomes the stage folder's outputs
    work: Path                  # resumable partial work of this fingerprint
    inputs: dict[str, Path]     # upstream stage name -> its folder (optional inputs only when in the recipe)
    sink: Sink                  # the stage's metrics, tables and charts (its W&B run)
    data_concurrency: int | None = None
    fault: str | None = None    # fault injection for tests (cluster.sharded.maybe_fault)
    resumed: bool = False       # this run continues a crashed run of the same fingerprint

    def log(self, message: str) -> None:
        print(f"[{self.name}] {message}", flush=True)


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]
    run: Callable[[StageContext], dict]
    # Resources of the stage's own driver task; its Ray Data / Ray Train workers ask for theirs.
    resources: dict = field(default_factory=lambda: {"num_cpus": 0})
    # Inputs used when the recipe has them (pretrain evaluates on `tasks` if there is one)
    optional: tuple[str, ...] = ()
    # input -> a metric of its manifest that stands for it in this stage's fingerprint, when the
    # stage reads only part of that input (pretrain: tasks' eval_digest)
    views: dict = field(default_factory=dict)
    # false: the stage makes new rows from its inputs' rows (pairs from tasks), so its rows_in is
    # its own count, not the rows its inputs kept
    reads_input_rows: bool = True

    def deps(self, order: list[str]) -> tuple[str, ...]:
        """The stages this one reads in a recipe whose stages are `order`."""
        return self.inputs + tuple(d for d in self.optional if d in order)


STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    if stage.name in STAGES:
        raise RuntimeError(f"stage {stage.name!r} registered twice")
    STAGES[stage.name] = stage
    return stage


def check_order(order: list[str]) -> None:
    """Every stage's inputs must come before it in the recipe's stage list."""
    seen: set[str] = set()
    for name in order:
        for dep in STAGES[name].deps(order):
            if dep not in order:
                raise ValueError(f"stage {name!r} needs {dep!r}, which the recipe's `stages` lacks")
            if dep not in seen:
                raise ValueError(f"stage {name!r} is listed before its input {dep!r}")
        seen.add(name)


def _load_stages() -> None:
    # Registering by import keeps each stage's wiring in its own small module.
    from pipelines.stages import ingest  # noqa: F401
    from pipelines.stages import dedup, quality, domains, difficulty  # noqa: F401
    from pipelines.stages import tokenizer, tasks, pretrain, sft, pairs, dpo, reward_model, prl  # noqa: F401


_load_stages()
