"""`r1pipe export`: a training stage's model to a transformers folder, published atomically."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from training.export import WEIGHTS, export_folder


def find_model_dir(stage_folder: Path) -> Path:
    for candidate in (stage_folder / "model", stage_folder):
        if (candidate / WEIGHTS).is_file():
            return candidate
    raise FileNotFoundError(f"{stage_folder}: no {WEIGHTS} here or in model/ (is the stage done?)")


def find_tokenizer(stage_folder: Path, model_dir: Path) -> Path | None:
    """The model folder's own tokenizer, else the run's tokenizer stage."""
    for candidate in (model_dir, stage_folder, stage_folder.parent / "tokenizer"):
        if (candidate / "tokenizer.json").is_file():
            return candidate
    return None


def export_stage(stage_folder: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    stage_folder, out = Path(stage_folder), Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    model_dir = find_model_dir(stage_folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        export_folder(model_dir, tmp, find_tokenizer(stage_folder, model_dir))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
