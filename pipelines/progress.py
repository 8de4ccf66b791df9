"""What `r1pipe run` shows while a stage runs: one live line, read from files the stage writes.

Stages never talk to the terminal (they run as Ray tasks, often on another node). Their
helpers already leave files that say how far they are, and the driver polls them twice a
second through the runner's ``Watcher``:

- a data stage's shard pass (``cluster.sharded.run_sharded``): ``.work/<pass>/plan.json`` holds the
  number of shards, ``.work/<pass>/done/part-*.json`` one marker per finished shard;
- a training stage (``TrainLog``): ``.work/progress.json`` holds the step (an RL stage: the
  iteration), the total and the loss.

So any new stage built on those helpers gets a progress line with no change here; a stage with
neither shows a spinner and its elapsed time.

``quiet_output`` sends everything else the driver process prints (Ray's forwarded worker logs,
DeepSpeed's, C++ log lines written straight to the file descriptors) to a log file of the run.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TextIO

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from pipelines.store import read_json

PROGRESS_FILE = "progress.json"  # in a stage's .work/, written by TrainLog
PLAN_FILE = "plan.json"          # in a shard pass's folder, written by run_sharded


def stage_progress(root: Path) -> dict | None:
    """How far a running stage is: {"unit": "steps"|"iterations"|"shards", "done", "total", ...}, or None
    when it left no sign yet. A training stage's own file wins over the shard passes; of
    several shard passes (dedup, difficulty) the one started last is shown."""
    work = root / ".work"
    try:
        train = read_json(work / PROGRESS_FILE)
    except ValueError:
        train = None  # never half-written (atomic), but a reader must not crash the run
    if train:
        return train
    plans = [p for pattern in (f"*/{PLAN_FILE}", f"*/*/{PLAN_FILE}") for p in work.glob(pattern)]
    if not plans:
        return None
    plan_path = max(plans, key=_mtime)
    try:
        plan = read_json(plan_path) or {}
    except ValueError:
        return None
    done = sum(1 for _ in (plan_path.parent / "done").glob("part-*.json"))
    return {"unit": "shards", "done": done, "total": plan.get("total"),
            "pass": plan_path.parent.relative_to(work).as_posix()}


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def describe(progress: dict | None) -> str:
    """The text after the bar: the loss of a training stage, the pass of a data stage."""
    if not progress:
        return ""
    if progress.get("phase"):
        return progress["phase"]
    unit = progress.get("unit", "")
    if unit != "shards":
        loss = progress.get("loss")
        return f"{unit}, loss {loss:.4g}" if isinstance(loss, (int, float)) else unit
    named = progress.get("pass") not in (None, "shards")  # a stage with several passes names them
    return f"shards ({progress['pass']})" if named else "shards"


class LiveProgress:
    """A Watcher (pipelines.runner) that draws one rich progress line per running stage."""

    def __init__(self, console: Console):
        self.console = console
        self.bar = Progress(SpinnerColumn(), TextColumn("[bold]{task.description:<12}"), BarColumn(),
                            MofNCompleteColumn(), TextColumn("{task.fields[what]}"),
                            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                            console=console, transient=True, disable=not console.is_terminal,
                            # the process's own stdout is the run's log (quiet_output), not the bar
                            redirect_stdout=False, redirect_stderr=False)
        self.root: Path | None = None
        self.task = None

    def start(self, stage: str, root: Path) -> None:
        self.root = root
        self.task = self.bar.add_task(stage, total=None, what="")
        self.bar.start()

    def poll(self) -> None:
        if self.task is None or self.root is None:
            return
        progress = stage_progress(self.root)
        if progress:  # no total (a phase such as the evaluation): an indeterminate bar
            self.bar.update(self.task, total=progress.get("total"), completed=progress.get("done", 0),
                            what=describe(progress))

    def stop(self) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
            self.task = None
        self.bar.stop()


@contextmanager
def quiet_output(log_path: Path) -> Iterator[tuple[TextIO, TextIO]]:
    """Send this process's stdout and stderr, Python's and the file descriptors' alike, to
    ``log_path``; yield (stdout, stderr) streams that still reach the terminal."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    term_out, term_err = sys.stdout, sys.stderr
    saved = {}
    for fd, stream in ((1, term_out), (2, term_err)):
        stream.flush()
        saved[fd] = os.dup(fd)
    # Where the streams are the process's own descriptors, the terminal is reached through a copy
    # of them; under a test runner's captured streams, the streams themselves stay as they are.
    out = os.fdopen(os.dup(saved[1]), "w", buffering=1) if _on_fd(term_out, 1) else term_out
    err = os.fdopen(os.dup(saved[2]), "w", buffering=1) if _on_fd(term_err, 2) else term_err
    log = open(log_path, "a", buffering=1, encoding="utf-8")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    try:
        yield out, err
    finally:
        log.flush()
        sys.stdout, sys.stderr = term_out, term_err
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        log.close()
        for stream in (out, err):
            if stream not in (term_out, term_err):
                stream.close()


def _on_fd(stream: TextIO, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        return False
