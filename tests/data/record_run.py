"""Copy what `r1pipe report` reads of a run (no data shards, no weights) into a test fixture.

    .venv/bin/python tests/data/record_run.py runs/demo tests/data/demo_run

tests/data/demo_run was recorded this way from a real `r1pipe run recipes/demo.yaml`.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

KEEP = ["pipeline.json", "events.jsonl", "*/manifest.json", "*/train_log.jsonl", "*/model/lineage.json"]


def record(src: Path, dst: Path) -> list[Path]:
    if dst.exists():
        shutil.rmtree(dst)
    copied = []
    for pattern in KEEP:
        for path in sorted(src.glob(pattern)):
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            copied.append(target)
    if not (dst / "pipeline.json").is_file():
        raise ValueError(f"{src}: not a run folder (no pipeline.json)")
    return copied


if __name__ == "__main__":
    files = record(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"{len(files)} files, {sum(f.stat().st_size for f in files) / 1e6:.2f} MB")
