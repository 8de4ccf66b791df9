"""The sha256 of a file, read in blocks: checkpoint digests (training/checkpoint.py), the run
store's output digests (pipelines/store.py) and the start model RL checkpoints record (rl/ppo.py).

No torch at import, so the run store and the CLI that reads it stay quick to start.

    sha256_file(Path("runs/r1/pretrain/model/model.safetensors"))   # 64 hex digits
"""
from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
