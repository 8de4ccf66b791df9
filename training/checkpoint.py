"""Checkpoint folders: layout, atomic publication, retention, verification, RNG states.

One checkpoint is one folder under the checkpoint root (the stage's ``checkpoints/``,
which is also Ray Train's experiment folder):

    step_00000040/
      ds/                     DeepSpeed's files: model states, ZeRO optimizer shards, scheduler
      rng/rank_00000.json     this rank's Python / NumPy / torch RNG states
      trainer.json            step, tokens seen, sampler position, world size, file digests
      universal/              only after a world-size change: ds_to_universal's output

Every rank writes into ``.tmp-step_00000040/``; once all have finished, rank 0 writes
trainer.json (with each file's size and sha256) and renames the folder into place (where
nodes keep the folder on their own disks, each node's first rank does so for its copy, with
rank 0's trainer.json: training.distributed.file_view). A
folder named ``step_*`` is therefore complete, and a damaged one is caught by its
digests, never by a crash half-way through loading.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from training.hashing import sha256_file

TRAINER = "trainer.json"
_STEP_RE = re.compile(r"^step_(\d{8})$")
log = logging.getLogger("r1pipe.checkpoint")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def staging_path(root: Path, step: int) -> Path:
    return Path(root) / f".tmp-{step_name(step)}"


def list_checkpoints(root: Path) -> list[Path]:
    """Published checkpoint folders, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def read_state(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / TRAINER).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{folder}/{TRAINER}: unreadable ({err})") from err


# ----------------------------------------------------------------------------- digests


def files_of(folder: Path) -> list[str]:
    """Every file of a staged checkpoint, relative, sorted: the same list on every rank."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def digest(folder: Path, names: list[str]) -> dict[str, dict]:
    return {n: {"bytes": (Path(folder) / n).stat().st_size, "sha256": sha256_file(Path(folder) / n)}
            for n in names}


def problems(folder: Path, names: list[str] | None = None) -> list[str]:
    """Files of a checkpoint that are missing or differ from the digests in trainer.json.

    ``names`` restricts the check to a subset, so ranks can split the hashing.
    """
    try:
        files = read_state(folder)["files"]
    except (ValueError, KeyError) as err:
        return [str(err)]
    bad = []
    for name in names if names is not None else sorted(files):
        want, path = files[name], Path(folder) / name
        if not path.is_file():
            bad.append(f"{name}: missing")
        elif path.stat().st_size != want["bytes"]:
            bad.append(f"{name}: {path.stat().st_size} bytes, expected {want['bytes']}")
        elif sha256_file(path) != want["sha256"]:
            bad.append(f"{name}: sha256 differs")
    return bad


def publish(staging: Path, state: dict, files: dict[str, dict], keep: int) -> Path:
    """Rank 0 (each copy's leader), after every rank has written: trainer.json, the atomic rename,
    retention."""
    staging = Path(staging)
    final = staging.with_name(staging.name.removeprefix(".tmp-"))
    tmp = staging / f".{TRAINER}.tmp"
    with open(tmp, "w") as f:
        json.dump({**state, "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, staging / TRAINER)
    if final.exists():  # the same step saved again after a restart: the new one wins
        shutil.rmtree(final)
    os.replace(staging, final)
    prune(final.parent, keep)
    return final


def prune(root: Path, keep: int) -> None:
    for old in list_checkpoints(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in Path(root).glob(".tmp-step_*"):  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)


# ----------------------------------------------------------------------------- RNG states


def rng_state() -> dict:
    """This process's RNG states as JSON-able data (never pickle)."""
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_bytes_tensor(s) for s in state["cuda"]])


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def write_rng(staging: Path, rank: int) -> None:
    path = Path(staging) / "rng" / f"rank_{rank:05d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rng_state()))


def read_rng(folder: Path, rank: int) -> dict | None:
    """This rank's saved RNG states; None when the checkpoint had fewer ranks."""
    path = Path(folder) / "rng" / f"rank_{rank:05d}.json"
    return json.loads(path.read_text()) if path.is_file() else None
