"""What `r1pipe run` shows while a stage runs: progress read from the stage's files, and the
process's other output kept in the run's log."""
import io
import json
import os
import subprocess
import sys

from rich.console import Console

from pipelines.progress import LiveProgress, describe, quiet_output, stage_progress
from pipelines.store import write_json_atomic


def test_shard_progress_counts_markers_of_the_latest_pass(tmp_path):
    work = tmp_path / ".work"
    assert stage_progress(tmp_path) is None
    write_json_atomic(work / "scoring" / "plan.json", {"total": 4})
    for i in range(4):
        write_json_atomic(work / "scoring" / "done" / f"part-{i:05d}.json", {})
    os.utime(work / "scoring" / "plan.json", (1, 1))  # started long ago
    write_json_atomic(work / "grading" / "plan.json", {"total": 3})
    write_json_atomic(work / "grading" / "done" / "part-00001.json", {})
    assert stage_progress(tmp_path) == {"unit": "shards", "done": 1, "total": 3, "pass": "grading"}
    assert describe(stage_progress(tmp_path)) == "shards (grading)"
    assert describe({"unit": "shards", "done": 0, "total": 4, "pass": "shards"}) == "shards"


def test_training_progress_wins_and_shows_the_loss(tmp_path):
    write_json_atomic(tmp_path / ".work" / "shards" / "plan.json", {"total": 2})
    write_json_atomic(tmp_path / ".work" / "progress.json",
                      {"unit": "iterations", "done": 3, "total": 10, "loss": 0.123456})
    p = stage_progress(tmp_path)
    assert (p["done"], p["total"]) == (3, 10)
    assert describe(p) == "iterations, loss 0.1235"
    assert describe({"unit": "tasks", "phase": "held-out evaluation, 8 tasks"}) == "held-out evaluation, 8 tasks"


def test_live_progress_draws_one_line_then_leaves_none(tmp_path):
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    view = LiveProgress(console)
    write_json_atomic(tmp_path / ".work" / "progress.json", {"unit": "steps", "done": 5, "total": 20, "loss": 2.5})
    view.start("sft", tmp_path)
    view.poll()
    view.bar.refresh()
    view.stop()
    drawn = out.getvalue()
    assert "sft" in drawn and "5/20" in drawn and "steps, loss 2.5" in drawn
    assert view.bar.tasks == []  # transient: the runner's done line replaces it


def test_quiet_output_sends_prints_and_raw_fds_to_the_log(tmp_path, capfd):
    log = tmp_path / "logs" / "run.log"
    with quiet_output(log) as (out, err):
        print("python print")
        os.write(1, b"raw fd 1\n")
        os.write(2, b"raw fd 2\n")
        subprocess.run([sys.executable, "-c", "import sys; print('child'); print('child err', file=sys.stderr)"],
                       check=True)
        out.write("for the terminal\n")
        out.flush()
    print("after")
    text = log.read_text()
    for line in ("python print", "raw fd 1", "raw fd 2", "child", "child err"):
        assert line in text
    assert "for the terminal" not in text and "after" not in text
    captured = capfd.readouterr()
    assert "for the terminal" in captured.out and "after" in captured.out
    assert "python print" not in captured.out + captured.err and "raw fd" not in captured.out + captured.err
