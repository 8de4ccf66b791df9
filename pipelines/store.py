"""The run store: ``<runs_dir>/<run_id>/<stage>/`` with a manifest per stage.

A stage is *done* only when its ``manifest.json`` says ``done``. That file is
always replaced atomically, and it is written last, after every output has
been moved into place. While a stage runs its manifest says ``running``, so a
crash at any point leaves a stage that is not done and will run again.

Layout of a stage folder:
    manifest.json   status, fingerprint, inputs, outputs (+sha256), metrics, times
    .staging/       outputs being written; moved into place at publish
    .work/          resumable partial work (finished shards), kept across crashes until
                    the done manifest is written; a run that is not a resume starts without it
    checkpoints/    training stages: kept across crashes for resume
    <outputs>       data/, rejected/, model/, ... once published

On object storage (``runs_dir: s3://bucket/runs``) the stages work in a local mirror of the run
(cluster/storage.py) and the store keeps the remote copy the source of truth: it reads
manifests from there, uploads a stage's outputs at publish and its ``done`` manifest after them
(the commit record: there is no rename), and on begin fills the mirror with the partial work
and checkpoints that made it there (finished shards and checkpoints are uploaded as they
complete, so a killed driver loses only what was in flight).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster import storage
from training.hashing import sha256_file

RUNNING, DONE, FAILED = "running", "done", "failed"
_KEEP_ACROSS_RUNS = {".work", "checkpoints", "manifest.json"}


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: corrupt JSON: {err}") from err


def code_version() -> str:
    """Package version plus the git commit when the code runs from a checkout."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        ver = version("r1pipe")
    except PackageNotFoundError:
        ver = "0+unknown"
    here = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{ver}+g{commit[:12]}" if commit else ver


def fingerprint(stage: str, config: Any, inputs: dict[str, str], code: str) -> str:
    blob = json.dumps({"stage": stage, "config": config, "inputs": inputs, "code": code},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class StageDir:
    root: Path
    name: str
    remote: str | None = None   # the stage's URI when the run lives on object storage

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def staging(self) -> Path:
        return self.root / ".staging"

    @property
    def work(self) -> Path:
        return self.root / ".work"

    def manifest(self) -> dict | None:
        if self.remote:
            return _read_remote_json(storage.join(self.remote, "manifest.json"))
        return read_json(self.manifest_path)

    def _write_manifest(self, manifest: dict) -> None:
        write_json_atomic(self.manifest_path, manifest)
        if self.remote:
            storage.upload(self.manifest_path, storage.join(self.remote, "manifest.json"))

    def is_done(self, fingerprint: str | None = None) -> bool:
        m = self.manifest()
        return bool(m) and m.get("status") == DONE and (fingerprint is None or m.get("fingerprint") == fingerprint)

    def begin(self, fingerprint: str, inputs: dict[str, str], config: Any) -> dict:
        """Mark running. Partial work of the same fingerprint is kept for resume."""
        old = self.manifest()
        if old and old.get("fingerprint") != fingerprint:
            self.clear()  # a different config: nothing of the old run may be reused
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir()
        resumed = bool(old) and old.get("fingerprint") == fingerprint and old.get("status") != DONE
        if not resumed:  # a forced rerun starts clean, even after a crash while .work was dropped
            shutil.rmtree(self.work, ignore_errors=True)
        if self.remote:
            self._mirror_kept(resumed)
        manifest = {"stage": self.name, "status": RUNNING, "fingerprint": fingerprint, "inputs": inputs,
                    "config": config, "outputs": [], "metrics": {}, "started": time.time(),
                    "finished": None, "error": None, "resumed": resumed,
                    "attempts": (old or {}).get("attempts", 0) + 1 if resumed else 1}
        self._write_manifest(manifest)
        return manifest

    def _mirror_kept(self, resumed: bool) -> None:
        """Object storage: the local mirror's partial work and checkpoints become exactly what
        was committed remotely (finished shards with their markers; checkpoints whose
        trainer.json made it), whatever an earlier driver on this node left locally."""
        for kept in (".work", "checkpoints"):
            shutil.rmtree(self.root / kept, ignore_errors=True)
        # what a gang's rank 0 on another node uploaded for an earlier attempt (cluster/train.py)
        storage.delete(storage.join(self.remote, ".staging"))
        if resumed:
            storage.download(storage.join(self.remote, ".work"), self.work)
        else:
            storage.delete(storage.join(self.remote, ".work"))
        storage.download_committed(storage.join(self.remote, "checkpoints"), self.root / "checkpoints",
                                   "trainer.json")

    def publish(self, manifest: dict, metrics: dict) -> dict:
        """Move staged outputs into place, write the done manifest, then drop .work.

        .work goes after the manifest: until the stage is done, a crash anywhere here resumes
        from its finished shards, which a half-deleted .work would no longer match."""
        for child in sorted(self.staging.iterdir()):
            target = self.root / child.name
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            os.replace(child, target)
        manifest = dict(manifest, status=DONE, metrics=metrics, finished=time.time(),
                        outputs=self.list_outputs())
        if self.remote:
            self._upload_outputs(manifest["outputs"])
        self._write_manifest(manifest)
        shutil.rmtree(self.staging, ignore_errors=True)
        shutil.rmtree(self.work, ignore_errors=True)
        if self.remote:
            for partial in (".work", ".staging"):
                storage.delete(storage.join(self.remote, partial))
        return manifest

    def _upload_outputs(self, outputs: list[dict]) -> None:
        """Object storage: remote outputs of an earlier execution go, then this one's go up;
        the caller writes the done manifest after them."""
        tops = {rel.split("/", 1)[0] for rel in storage.list_files(self.remote)}
        for top in sorted(tops):
            if top not in _KEEP_ACROSS_RUNS and not top.startswith("."):
                storage.delete(storage.join(self.remote, top))
        for out in outputs:
            storage.upload(self.root / out["path"], storage.join(self.remote, out["path"]))

    def fail(self, manifest: dict, error: str) -> None:
        self._write_manifest(dict(manifest, status=FAILED, error=error, finished=time.time()))

    def clear(self) -> None:
        if self.root.exists():
            shutil.rmtree(self.root)
        if self.remote:
            storage.delete(self.remote)

    def fetch(self, only: tuple[str, ...] | None = None) -> None:
        """Object storage: bring a stage's outputs (or those named in ``only``) and its manifest
        into the local mirror, for a stage or a report that reads them; a file already there
        with its recorded size is kept."""
        manifest = self.manifest() if self.remote else None
        if not manifest:
            return
        stale = [o["path"] for o in manifest.get("outputs", []) if only is None or o["path"] in only
                 if not (self.root / o["path"]).is_file() or (self.root / o["path"]).stat().st_size != o["bytes"]]
        storage.download(self.remote, self.root, stale)
        write_json_atomic(self.manifest_path, manifest)

    def list_outputs(self) -> list[dict]:
        out = []
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root)
            if path.is_file() and rel.parts[0] not in _KEEP_ACROSS_RUNS and not rel.parts[0].startswith("."):
                out.append({"path": str(rel), "bytes": path.stat().st_size, "sha256": sha256_file(path)})
        return out

    def changed_outputs(self) -> list[str]:
        """Outputs of a done manifest that are missing or changed on disk."""
        if self.remote:
            have = {rel: info.size for rel, info in storage.list_files(self.remote).items()}
            return [o["path"] for o in (self.manifest() or {}).get("outputs", [])
                    if have.get(o["path"]) != o["bytes"]]
        bad = []
        for o in (self.manifest() or {}).get("outputs", []):
            p = self.root / o["path"]
            if not p.exists() or p.stat().st_size != o["bytes"]:
                bad.append(o["path"])
        return bad


class RunStore:
    """``runs_dir`` is a folder, or a URI (``s3://bucket/runs``): then ``root`` is the run's local
    mirror on this node (under ``cache_dir``; cluster/storage.py) and ``remote`` the run's URI."""

    def __init__(self, runs_dir: str | Path, run_id: str, cache_dir: str | Path | None = None):
        if not run_id or "/" in run_id or run_id.startswith("."):
            raise ValueError(f"run id {run_id!r}: must be a plain folder name")
        self.run_id = run_id
        self.remote: str | None = None
        if storage.is_uri(runs_dir):
            storage.check_reachable(str(runs_dir))
            self.remote = storage.join(str(runs_dir), run_id)
            self.root = storage.mirror(self.remote, cache_dir)
        else:
            self.root = Path(runs_dir) / run_id

    def stage(self, name: str) -> StageDir:
        return StageDir(self.root / name, name, self.remote and storage.join(self.remote, name))

    def write_pipeline(self, config: dict, stage_order: list[str]) -> None:
        write_json_atomic(self.root / "pipeline.json", {
            "run_id": self.run_id, "config": config, "code_version": code_version(),
            "stages": stage_order, "written": time.time()})
        if self.remote:
            storage.upload(self.root / "pipeline.json", storage.join(self.remote, "pipeline.json"))

    def pipeline(self) -> dict | None:
        if self.remote:
            return _read_remote_json(storage.join(self.remote, "pipeline.json"))
        return read_json(self.root / "pipeline.json")

    def event(self, stage: str, action: str, **fields: Any) -> None:
        """Append what an invocation did with a stage (run, resume, skip, done, fail) to
        events.jsonl: the run's history, which manifests (the latest state only) do not keep."""
        self.root.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"time": time.time(), "stage": stage, "action": action, **fields},
                          sort_keys=True, default=str)
        if self.remote:  # no appends on object storage: the driver rewrites the whole (small) file
            uri = storage.join(self.remote, "events.jsonl")
            text = (storage.read_bytes(uri) or b"").decode() + line + "\n"
            storage.write_bytes(uri, text.encode())
            (self.root / "events.jsonl").write_text(text, encoding="utf-8")
            return
        with open(self.root / "events.jsonl", "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def events(self) -> list[dict]:
        """The events so far; a line cut short by a crash mid-write is left out."""
        if self.remote:
            text = (storage.read_bytes(storage.join(self.remote, "events.jsonl")) or b"").decode()
        else:
            path = self.root / "events.jsonl"
            if not path.is_file():
                return []
            text = path.read_text(encoding="utf-8")
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out


def _read_remote_json(uri: str) -> dict | None:
    data = storage.read_bytes(uri)
    if data is None:
        return None
    try:
        return json.loads(data)
    except json.JSONDecodeError as err:
        raise ValueError(f"{uri}: corrupt JSON: {err}") from err


def open_run(runs_dir: str | Path, run_id: str | None) -> tuple[RunStore, dict]:
    """(the run's store, its pipeline.json) for a run id, or the newest run; a ValueError naming
    the folder when there is none."""
    where = str(runs_dir) if storage.is_uri(runs_dir) else Path(runs_dir).resolve()
    run_id = run_id or latest_run(runs_dir)
    if run_id is None:
        raise ValueError(f"no runs in {where}")
    store = RunStore(runs_dir, run_id)
    pipeline = store.pipeline()
    if pipeline is None:
        raise ValueError(f"no run {run_id!r} in {where}")
    return store, pipeline


def latest_run(runs_dir: str | Path) -> str | None:
    if storage.is_uri(runs_dir):
        storage.check_reachable(str(runs_dir))
        stamps = {name: storage.mtime(storage.join(str(runs_dir), name, "pipeline.json"))
                  for name in storage.list_dirs(str(runs_dir))}
        stamps = {name: t for name, t in stamps.items() if t is not None}
        return max(stamps, key=stamps.get) if stamps else None
    runs = [p for p in Path(runs_dir).glob("*/pipeline.json")]
    return max(runs, key=lambda p: p.stat().st_mtime).parent.name if runs else None
