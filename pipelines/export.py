"""`r1pipe export`: a training stage's model to a transformers folder, published atomically,
with the model's lineage.json (pipelines/lineage.py) beside the weights."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from pipelines.lineage import LINEAGE_FILE, find_lineage
from pipelines.store import write_json_atomic
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
        copy_lineage(model_dir, tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def copy_lineage(model_dir: Path, out: Path) -> None:
    """The model's lineage into OUT: its lineage.json (with its stage's finish time filled in), or,
    for a model published before stages wrote one, its lineage built from the run store; nothing
    for a model folder outside a run."""
    lineage = find_lineage(model_dir)
    if lineage is not None:
        write_json_atomic(out / LINEAGE_FILE, lineage)
