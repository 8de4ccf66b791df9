"""Shared fixtures. Tests run real Ray (embedded, loopback), real W&B (offline)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session", autouse=True)
def _ray_shutdown():
    yield
    if "ray" in sys.modules:  # a session that never imported Ray (CUDA tests on a GPU box) has none
        from cluster.session import shutdown
        shutdown()


def write_jsonl_with_malformed(path: Path, n: int = 100) -> dict[int, str]:
    """n rows; 5 of them malformed in 5 different ways. Returns line -> reason."""
    bad = {11: "bad_json", 21: "missing_text", 31: "empty_text", 41: "wrong_type", 51: "not_utf8"}
    with open(path, "wb") as f:
        for line in range(1, n + 1):
            rid = f"r{line:03d}"
            if bad.get(line) == "bad_json":
                f.write(b'{"id": "broken", "text": \n')
            elif bad.get(line) == "missing_text":
                f.write(json.dumps({"id": rid}).encode() + b"\n")
            elif bad.get(line) == "empty_text":
                f.write(json.dumps({"id": rid, "text": "   "}).encode() + b"\n")
            elif bad.get(line) == "wrong_type":
                f.write(json.dumps({"id": rid, "text": 42}).encode() + b"\n")
            elif bad.get(line) == "not_utf8":
                f.write(b'{"id": "' + rid.encode() + b'", "text": "caf\xe9 au lait"}\n')
            else:
                f.write(json.dumps({"id": rid, "text": f"document {line}: some words here",
                                    "lang": "en"}).encode() + b"\n")
    return bad


def write_recipe(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def reasoner_recipe(path: Path, body: str, reasoner, runs: Path, **fields) -> Path:
    """A recipe whose `tasks` stage reads the session reasoner's train and held-out splits as user
    files: body has `{tasks}` where that section goes, and {runs}, {init} (the reasoner's model)
    and the other `fields` where it needs them."""
    tasks = ("tasks:\n  generator: {enabled: false}\n  files:\n"
             f"    - {{path: {reasoner.train_dir / 'part-00000.parquet'}}}\n"
             f"    - {{path: {reasoner.eval_dir / 'part-00000.parquet'}, split: eval}}")
    return write_recipe(path, body.format(tasks=tasks, runs=runs, init=reasoner.model, **fields))


def wait_for(path: Path, proc, timeout: float = 400) -> None:
    import time
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"{path} never appeared (exit code {proc.poll()})")
        time.sleep(0.2)


def kill_pipeline_when(marker: Path, recipe: Path, run_id: str, stage: str, fault: str) -> None:
    """Run `r1pipe run --stages STAGE` in its own process group with a fault that hangs a worker,
    and kill the whole group (driver, embedded Ray, gang) once the fault's marker file appears."""
    import signal
    import subprocess
    env = dict(os.environ, R1PIPE_FAULT=fault, WANDB_MODE="disabled")
    proc = subprocess.Popen([str(VENV_BIN / "r1pipe"), "run", str(recipe), "--run-id", run_id, "--stages", stage],
                            cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(marker, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def reasoner(tmp_path_factory):
    """A tiny model trained once per session on an easy task family (tests/reasoner.py)."""
    from tests.reasoner import train_reasoner
    return train_reasoner(tmp_path_factory.mktemp("reasoner"))
