"""Lineage: what a stage (and the model it published) was made from, read from the run store.

    lineage = build_lineage(RunStore("runs", "demo"), "prl_2")   # from the manifests
    lineage = find_lineage("runs/demo/prl_2/model")               # what `r1pipe lineage PATH` shows

The lineage of a stage is a JSON-serialisable dict, the same for the same store:
    format        1
    run_id        the run's id; recipe: the recipe's `name` (pipeline.json)
    stage         the stage; fingerprint: its fingerprint
    stages        the stage and every stage upstream of it (transitively, through the manifests'
                  `inputs`), in the run's stage order, the stage itself last; each with
        name, fingerprint       from its manifest (None when its folder has no manifest)
        code_version            the code it ran with: its done manifest's `lineage.code_version`;
                                else (the stage itself while it runs, or a stage published before
                                manifests recorded it) the run's pipeline.json, which holds the code
                                of the latest `r1pipe run` of the run
        finished                its done manifest's finish time (None while it runs: a model's
                                lineage.json is written just before its stage publishes)
        inputs                  its direct inputs as its manifest recorded them (dep -> fingerprint,
                                or `<metric>:<digest>` where it reads only part of an input)
        input_files             the files its direct inputs published: every output their done
                                manifests list (path relative to the run, bytes, and the sha256
                                recorded at publish, not re-hashed) except removed rows (`rejected/`)
                                and records no stage reads (NOT_READ: training logs, held-out
                                completions, lineage files). Stages read nothing else of the run, so
                                this holds every file a stage read from it, and may hold more
                                (pretrain reads only tasks' eval split and corpus_excluded.json).
                                Checkpoints are never outputs.
        config_files            {config key: sha256} of the files outside the run that its config
                                names as paths (an init_model, a blocklist, tasks' and pairs' user
                                files; a folder's is a digest of its files), as its fingerprint
                                hashed them; {} when none. Ingest's inputs are globs its fingerprint
                                does not hash, so a run's data lineage starts at ingest's shards.
    warnings      inputs that changed since they were read (a stage's recorded input fingerprint
                  is not the one its folder holds now), inputs not done, folders without a manifest

The runner writes a stage's lineage as ``model/lineage.json`` before publish when the stage staged
a model/ folder (every training stage; difficulty, for its KenLM models), so the done manifest lists
its sha256; and every stage's done manifest gets the compact form under ``lineage``:
``{"code_version": ..., "upstream": {stage: fingerprint}}``. `r1pipe export` copies lineage.json.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipelines.store import DONE, RunStore, read_json, write_json_atomic

FORMAT = 1
LINEAGE_FILE = "lineage.json"
NOT_READ = {"train_log.jsonl", "eval_completions.jsonl", LINEAGE_FILE}
_SHOWN_FILES = 8  # per stage in the table; --json lists them all


def build_lineage(store: RunStore, stage: str) -> dict:
    """The lineage of ``stage`` in ``store`` (see the module docstring for every field)."""
    pipeline = store.pipeline()
    if pipeline is None:
        raise ValueError(f"{store.root}: no pipeline.json, so not a run folder")
    manifests = _upstream_manifests(store, stage)
    order = pipeline.get("stages", [])
    names = sorted(manifests, key=lambda s: (order.index(s) if s in order else len(order), s))
    names.remove(stage)
    names.append(stage)  # the stage itself last, even if the recipe's order changed since
    own = manifests[stage] or {}
    return {"format": FORMAT, "run_id": store.run_id, "recipe": pipeline.get("config", {}).get("name"),
            "stage": stage, "fingerprint": own.get("fingerprint"),
            "stages": [_entry(name, manifests, pipeline.get("code_version")) for name in names],
            "warnings": [w for name in names for w in _warnings(name, manifests)]}


def _upstream_manifests(store: RunStore, stage: str) -> dict[str, dict | None]:
    """The manifests of the stage and of everything upstream of it; None for a missing one."""
    manifests: dict[str, dict | None] = {}
    todo = [stage]
    while todo:
        name = todo.pop()
        if name in manifests:
            continue
        manifests[name] = store.stage(name).manifest()
        todo.extend((manifests[name] or {}).get("inputs", {}))
    if manifests[stage] is None:
        raise ValueError(f"{store.stage(stage).root}: no manifest.json, so stage {stage!r} never ran")
    return manifests


def _entry(name: str, manifests: dict[str, dict | None], run_code: str | None) -> dict:
    m = manifests[name] or {}
    inputs = m.get("inputs", {})
    return {"name": name, "fingerprint": m.get("fingerprint"),
            "code_version": (m.get("lineage") or {}).get("code_version") or run_code,
            "finished": m.get("finished") if m.get("status") == DONE else None,
            "inputs": dict(inputs),
            "input_files": [f for dep in sorted(inputs) for f in _published(dep, manifests.get(dep))],
            "config_files": dict((m.get("config") or {}).get("files", {}))}


def _published(dep: str, manifest: dict | None) -> list[dict]:
    """The outputs of an input stage that a stage downstream may read (paths relative to the run)."""
    if not manifest or manifest.get("status") != DONE:
        return []
    return [{"path": f"{dep}/{o['path']}", "bytes": o["bytes"], "sha256": o["sha256"]}
            for o in manifest.get("outputs", [])
            if not o["path"].startswith("rejected/") and Path(o["path"]).name not in NOT_READ]


def _warnings(name: str, manifests: dict[str, dict | None]) -> list[str]:
    if manifests[name] is None:
        return [f"{name}: no manifest in the run (its folder was removed?)"]
    out = []
    for dep, recorded in sorted(manifests[name].get("inputs", {}).items()):
        m = manifests.get(dep)
        if m is None:
            continue  # said once, under the dep's own name
        if m.get("status") != DONE:
            out.append(f"{name} read {dep}, which is {m.get('status')!r} now")
        elif recorded != _as_recorded(recorded, m):
            out.append(f"{name} read {dep} at {recorded[:24]}, but {dep}'s folder now holds "
                       f"{_as_recorded(recorded, m)[:24]} (it ran again since)")
    return out


def _as_recorded(recorded: str, manifest: dict) -> str:
    """What an input's folder holds now, in the form the consumer recorded it: its fingerprint,
    or `<metric>:<digest>` for an input read in part (fingerprints are hex, never with a colon)."""
    if ":" in recorded:
        key = recorded.split(":", 1)[0]
        return f"{key}:{(manifest.get('metrics') or {}).get(key)}"
    return manifest.get("fingerprint") or ""


# --- the runner's hook ----------------------------------------------------------------------------

def record_lineage(store: RunStore, stage: str, manifest: dict) -> dict:
    """Before publish: write ``model/lineage.json`` into the stage's staged model folder when it
    has one, and return the manifest with the compact lineage (code version, upstream stage ->
    fingerprint) to publish."""
    lineage = build_lineage(store, stage)
    model = store.stage(stage).staging / "model"
    if model.is_dir():
        write_json_atomic(model / LINEAGE_FILE, lineage)
    own = lineage["stages"][-1]
    return dict(manifest, lineage={"code_version": own["code_version"],
                                   "upstream": {s["name"]: s["fingerprint"] for s in lineage["stages"][:-1]},
                                   "warnings": lineage["warnings"]})


# --- finding and showing it ---------------------------------------------------------------------

def find_lineage(path: str | Path) -> dict | None:
    """The lineage of a stage folder (or any folder in it: model/, a checkpoint) or of an exported
    model: the recorded lineage.json when there is one, else built from the run store (a data
    stage, or a model published before stages wrote it). None when the path has none. A URI
    (s3://bucket/runs/demo/prl_2/model) is read from the object store, nothing downloaded."""
    from cluster.storage import is_uri
    if is_uri(str(path)):
        return _find_remote(str(path).rstrip("/"))
    path = Path(path).resolve()
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    stage = stage_folder(path)
    candidates = [path / LINEAGE_FILE] + ([stage / "model" / LINEAGE_FILE] if stage else [])
    recorded = next((p for p in candidates if p.is_file()), None)
    if recorded is not None:
        return _with_own_finish(read_json(recorded), read_json(stage / "manifest.json") if stage else None)
    if stage is not None:
        return build_lineage(RunStore(stage.parent.parent, stage.parent.name), stage.name)
    return None


def stage_folder(path: Path) -> Path | None:
    """The stage folder that holds ``path`` (or is it): the nearest folder with a manifest.json
    whose parent is a run (has pipeline.json)."""
    for folder in (path, *path.parents):
        if (folder / "manifest.json").is_file() and (folder.parent / "pipeline.json").is_file():
            return folder
    return None


def _find_remote(uri: str) -> dict | None:
    """find_lineage for a URI: the same search, by reading objects."""
    from cluster.storage import join, list_files, read_bytes

    def read(*parts: str) -> dict | None:
        data = read_bytes(join(*parts))
        return json.loads(data) if data is not None else None
    scheme, _, rest = uri.partition("://")
    parts = rest.split("/")
    folders = [f"{scheme}://{'/'.join(parts[:n])}" for n in range(len(parts), 1, -1)]  # uri, parents, not the bucket
    manifest, stage = None, None
    for folder, parent in zip(folders, folders[1:]):
        manifest = read(folder, "manifest.json")
        if manifest is not None and read_bytes(join(parent, "pipeline.json")) is not None:
            stage = folder
            break
    if stage is None and not list_files(uri):
        raise ValueError(f"{uri}: no such file or folder in the object store")
    recorded = read(uri, LINEAGE_FILE) or (read(stage, "model", LINEAGE_FILE) if stage else None)
    if recorded is not None:
        return _with_own_finish(recorded, manifest if stage else None)
    if stage is not None:
        root, run_id, name = stage.rsplit("/", 2)
        return build_lineage(RunStore(root, run_id), name)
    return None


def _with_own_finish(lineage: dict, manifest: dict | None) -> dict:
    """A recorded lineage was written before its stage finished: take the finish time from the
    stage's done manifest, when it is the same execution (same fingerprint)."""
    manifest = manifest or {}
    own = lineage["stages"][-1]
    if manifest.get("status") == DONE and manifest.get("fingerprint") == own["fingerprint"]:
        own = dict(own, finished=manifest.get("finished"))
        lineage = dict(lineage, stages=lineage["stages"][:-1] + [own])
    return lineage


def render(lineage: dict, console: Console) -> None:
    table = Table(title=f"lineage of {lineage['stage']} ({(lineage['fingerprint'] or '')[:12]}), "
                        f"run {lineage['run_id']}, recipe {lineage['recipe']}")
    for col in ("stage", "fingerprint", "finished", "code", "input files (sha256)"):
        table.add_column(col)
    for s in lineage["stages"]:
        finished = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["finished"])) if s["finished"] else "-"
        table.add_row(s["name"], (s["fingerprint"] or "-")[:12], finished, s["code_version"] or "-",
                      "\n".join(_file_lines(s)) or "-")
    console.print(table)
    for warning in lineage.get("warnings", []):
        console.print(f"[yellow]warning:[/] {warning}")


def _file_lines(entry: dict) -> list[str]:
    lines = [f"{key} {sha[:12]}" for key, sha in sorted(entry["config_files"].items())]
    lines += [f"{f['path']} {f['sha256'][:12]}" for f in entry["input_files"]]
    if len(lines) > _SHOWN_FILES:
        lines = lines[:_SHOWN_FILES] + [f"... {len(lines) - _SHOWN_FILES} more (--json lists all)"]
    return lines
