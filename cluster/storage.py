"""Run folders on object storage: ``s3://bucket/runs`` (or any pyarrow.fs / fsspec URI).

Stages keep working on local paths. A run whose ``runs_dir`` is a URI has a local mirror,
``<cache>/<scheme>/<bucket>/<path>/<run id>`` on the node (the cache is ``$R1PIPE_CACHE_DIR``,
default ``~/.cache/r1pipe/runs``), and its root holds a ``.r1pipe-remote`` file naming the
run's URI. Whoever writes a file worth keeping under that mirror calls ``push(path)``: the
file is uploaded to the same place under the URI, and nothing happens for a local run. That
is how a finished shard (data, rejected, then its marker) and a checkpoint (its files, then
trainer.json) reach object storage the moment they are complete, from whichever worker
wrote them.

A cluster need not share the cache folder between its nodes. The work a stage sends to other
nodes (shards, map and reduce tasks, gang workers, actor groups, evaluation tasks) carries the
mirrors its process knows (``carried()``), and the receiving process ``adopt``s them (their
markers, so that ``push`` works there too); it reads a mirror's file or folder through
``localize(path)``, which fetches it from the object store when this node does not have it. The
stage's own task runs on the driver's node, where the run store keeps the mirror.

Object stores have no rename, so every commit is "upload the parts, then the record": a
shard's marker after its files, a checkpoint's trainer.json after its files, a stage's
``done`` manifest after its outputs. Readers only believe a record.

Credentials and endpoints come from the environment only (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, ... for S3), never from a
recipe, so they never land in pipeline.json, a manifest or a log.
"""
from __future__ import annotations

import os
import shutil
import uuid
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

MARKER = ".r1pipe-remote"
_CHUNK = 8 << 20


def is_uri(path: str | Path) -> bool:
    """True for an object-store (or any non-local) URI; plain paths and file:// are local."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts if p)])


@lru_cache(maxsize=None)
def _filesystem(scheme_netloc: str) -> pafs.FileSystem:
    uri = scheme_netloc + "/"
    try:
        return pafs.FileSystem.from_uri(uri)[0]
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as err:
        try:  # gs://, az://, hf:// ... whatever fsspec knows, through pyarrow's adapter
            import fsspec
            fs, _ = fsspec.core.url_to_fs(uri)
        except (ImportError, ValueError) as err2:
            raise ValueError(f"runs_dir {uri!r}: no filesystem for this URI ({err}; fsspec: {err2})") from err
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(the filesystem, the path inside it) for a URI such as s3://bucket/runs/demo."""
    parts = urlsplit(uri)
    if not parts.scheme or not parts.netloc:
        raise ValueError(f"runs_dir {uri!r}: not a URI of the form scheme://bucket/path")
    fs = _filesystem(f"{parts.scheme}://{parts.netloc}")
    return fs, f"{parts.netloc}{parts.path}".rstrip("/")


def check_reachable(uri: str) -> None:
    """A ValueError naming the URI when its bucket is missing or its endpoint cannot be reached,
    before a run writes anything."""
    fs, path = resolve(uri)
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as err:
        raise ValueError(f"runs_dir {uri!r}: cannot reach the object store ({_one_line(err)}); "
                         f"check AWS_ENDPOINT_URL and the credentials in the environment") from err
    if info.type == pafs.FileType.NotFound:
        raise ValueError(f"runs_dir {uri!r}: bucket {bucket!r} does not exist")


def _one_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


# ----------------------------------------------------------------------------- the local mirror


def cache_root() -> Path:
    return Path(os.environ.get("R1PIPE_CACHE_DIR") or Path.home() / ".cache" / "r1pipe" / "runs")


_KNOWN: dict[str, str] = {}  # the mirror roots this process made or adopted -> their URIs


def mirror(uri: str, cache: str | Path | None = None) -> Path:
    """The local folder that mirrors ``uri`` on this node (under ``cache``, default
    cache_root()), created with its marker."""
    parts = urlsplit(uri)
    local = Path(cache or cache_root()).expanduser().absolute() / parts.scheme / parts.netloc / parts.path.strip("/")
    _mark(local, uri)
    return local


def _mark(local: Path, uri: str) -> None:
    local.mkdir(parents=True, exist_ok=True)
    marker = local / MARKER
    if not marker.is_file() or marker.read_text() != uri:
        tmp = local / f".{MARKER}.{os.getpid()}.tmp"
        tmp.write_text(uri)
        os.replace(tmp, marker)
        _remote_of_dir.cache_clear()  # a folder looked up before its marker came
    _KNOWN[str(local)] = uri


def carried() -> dict[str, str]:
    """The mirrors this process knows ({local root: URI}), for the work it sends to other nodes."""
    return dict(_KNOWN)


def adopt(mirrors: dict[str, str]) -> None:
    """In a process that runs a stage's remote work: the run's mirror roots, with their markers,
    on this node (a node that does not share the driver's cache folder has none)."""
    for root, uri in mirrors.items():
        _mark(Path(root), uri)  # also where this process knew it: its marker may have gone since


def localize(path: str | Path, replace: bool = False) -> Path:
    """A file or folder of a mirror on this node, fetched from the object store where this node
    lacks it: the file, or the folder's files missing here. A file already here is kept (writers
    put whole files, and one being appended here is newer than its upload), unless ``replace``:
    then the object store's copy of every file wins (what another node wrote last). Nothing
    happens outside a mirror."""
    path = Path(path)
    remote = None if path.is_file() and not replace else remote_of(path)
    if remote is None:
        return path
    fs, where = resolve(remote)
    kind = fs.get_file_info(where).type
    if kind == pafs.FileType.File:
        download(remote.rsplit("/", 1)[0], path.parent, [path.name])
    elif kind == pafs.FileType.Directory:
        download(remote, path, [rel for rel in list_files(remote) if replace or not (path / rel).is_file()])
    return path


def localize_all(obj, skip: tuple[str, ...] = ()) -> None:
    """localize every path of a known mirror that ``obj`` names (strings or paths, in nested
    dicts, lists and tuples: a gang's payload, a step's arguments), except under ``skip``."""
    roots = tuple(root + os.sep for root in _KNOWN)

    def walk(each) -> None:
        if isinstance(each, dict):
            each = list(each.values())
        if isinstance(each, (list, tuple)):
            for item in each:
                walk(item)
        elif isinstance(each, (str, os.PathLike)):
            text = os.fspath(each)
            if text.startswith(roots) and not any(text == s or text.startswith(s + os.sep) for s in skip):
                localize(text)
    if roots:
        walk(obj)


def _differs(local: Path, size: int) -> bool:
    return not local.is_file() or local.stat().st_size != size


@lru_cache(maxsize=4096)
def _remote_of_dir(folder: str) -> str | None:
    path = Path(folder)
    for parent in (path, *path.parents):
        marker = parent / MARKER
        if marker.is_file():
            rel = path.relative_to(parent).as_posix()
            return join(marker.read_text().strip(), "" if rel == "." else rel)
    return None


def remote_of(local: Path) -> str | None:
    """The URI a file or folder of a local mirror stands for; None outside any mirror."""
    local = Path(os.path.abspath(local))
    base = _remote_of_dir(str(local.parent))
    return join(base, local.name) if base else None


def push(local: Path) -> None:
    """Upload one file (or a folder's files) of a mirror to its URI; nothing for a local run."""
    remote = remote_of(local)
    if remote is not None:
        upload(Path(local), remote)


def discard(local: Path) -> None:
    """Delete the remote copy of a mirror's file or folder (a stale shard); nothing for a local run."""
    remote = remote_of(local)
    if remote is not None:
        delete(remote)


# ----------------------------------------------------------------------------- transfers


def upload(local: Path, uri: str, *, last: tuple[str, ...] = ()) -> None:
    """A file, or every file of a folder, to ``uri``; the files named in ``last`` (relative
    names) go after all others: they are the commit record of what came before."""
    local = Path(local)
    if local.is_file():
        _put(local, uri)
        return
    for rel in sorted(_files(local), key=lambda r: r in last):
        _put(local / rel, join(uri, rel))


def _files(folder: Path) -> list[str]:
    """The files under a local folder, by relative path, sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())


def _put(local: Path, uri: str) -> None:
    fs, path = resolve(uri)
    try:
        with open(local, "rb") as src, fs.open_output_stream(path) as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
    except OSError as err:
        raise OSError(f"uploading {local} to {uri}: {_one_line(err)}") from err


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    with fs.open_output_stream(path) as dst:
        dst.write(data)


def read_bytes(uri: str) -> bytes | None:
    """The object's bytes, None where there is none."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as src:
            return src.read()
    except FileNotFoundError:
        return None
    except OSError as err:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        raise OSError(f"reading {uri}: {_one_line(err)}") from err


def list_files(uri: str) -> dict[str, pafs.FileInfo]:
    """Every file under ``uri``, by path relative to it ({} where there is nothing)."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {i.path[len(path) + 1:]: i for i in infos if i.type == pafs.FileType.File}


def list_dirs(uri: str) -> list[str]:
    """The names of the folders right under ``uri``."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def download(uri: str, local: Path, files: list[str] | None = None) -> list[str]:
    """The files under ``uri`` (or only the relative ``files`` named) into ``local``; each
    lands whole (a temporary name, then a rename). Returns what was fetched."""
    fs, base = resolve(uri)
    names = sorted(list_files(uri)) if files is None else files
    for rel in names:
        target = Path(local) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")  # pids repeat across nodes
        with fs.open_input_stream(f"{base}/{rel}") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
        os.replace(tmp, target)
    return names


def delete(uri: str) -> None:
    """A file or a whole prefix; nothing where there is none."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        fs.delete_file(path)
    elif info.type == pafs.FileType.Directory:
        fs.delete_dir(path)


def mtime(uri: str) -> float | None:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return None
    return info.mtime.timestamp() if info.mtime else 0.0


def sync_up(local: Path, uri: str) -> None:
    """Upload the files of a local folder whose remote copy is missing or of another size
    (W&B offline folders, which only grow)."""
    if not Path(local).is_dir():
        return
    have = {rel: info.size for rel, info in list_files(uri).items()}
    for rel in _files(local):
        if have.get(rel) != (Path(local) / rel).stat().st_size:
            _put(Path(local) / rel, join(uri, rel))


def push_parts(folder: Path, record: str) -> None:
    """A published folder of a mirror (a checkpoint) going up, part one of three: the remote
    folder replaced by this node's files of it, without ``record`` (then other nodes add theirs
    with push_missing, and push_record commits)."""
    remote = remote_of(folder)
    if remote is None:
        return
    delete(remote)  # the same step saved again after a restart (or caught half-uploaded): the new one wins
    for rel in _files(folder):
        if rel != record:
            _put(Path(folder) / rel, join(remote, rel))


def push_missing(folder: Path, record: str) -> None:
    """This node's files of a folder that the object store lacks (a checkpoint's parts written by
    ranks on a node that does not share the folder; nothing where the nodes share it)."""
    remote = remote_of(folder)
    if remote is None:
        return
    have = list_files(remote)
    for rel in _files(folder):
        if rel != record and rel not in have:
            _put(Path(folder) / rel, join(remote, rel))


def push_record(folder: Path, record: str) -> None:
    """Part three: ``record`` (the commit), then the remote siblings of the same kind that are
    gone locally (retention pruned them) go."""
    remote = remote_of(folder)
    if remote is None:
        return
    folder = Path(folder)
    _put(folder / record, join(remote, record))
    parent = remote.rsplit("/", 1)[0]
    prefix = folder.name.split("_", 1)[0] + "_"
    for name in list_dirs(parent):
        if name.startswith(prefix) and not (folder.parent / name).is_dir():
            delete(join(parent, name))


def download_committed(uri: str, local: Path, record: str) -> list[str]:
    """The folders right under ``uri`` whose ``record`` file was uploaded (the last file of
    each), into ``local``; a folder caught half-uploaded has no record and is left out."""
    files = list_files(uri)
    done = _committed(files, record)
    download(uri, local, [rel for rel in files if rel.split("/", 1)[0] in done])
    return sorted(done)


def _committed(files: dict[str, pafs.FileInfo], record: str) -> set[str]:
    return {rel.split("/", 1)[0] for rel in files if rel.count("/") == 1 and rel.endswith("/" + record)}


def localize_committed(local: Path, record: str, prefix: str) -> None:
    """The ``prefix``-named folders under a mirror's ``local`` (a gang's checkpoints) made what
    the object store has committed, on this node: a folder without its remote record goes (its
    upload never finished: another node does not have it), committed files missing here or of
    another size are fetched. Nothing outside a mirror."""
    remote = remote_of(local)
    if remote is None:
        return
    files = list_files(remote)
    done = _committed(files, record)
    for folder in Path(local).glob(prefix + "*"):
        if folder.is_dir() and folder.name not in done:
            shutil.rmtree(folder, ignore_errors=True)
    download(remote, local, [rel for rel, info in files.items()
                             if rel.split("/", 1)[0] in done and _differs(Path(local) / rel, info.size)])
