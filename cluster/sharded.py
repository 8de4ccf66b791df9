"""Running data steps on Ray, one shard at a time, resumably; map and reduce on Ray tasks.

A *shard step* is a class whose instances are called with the tables of one
work item (a dict) and return a ``data_engine.schema.ShardResult`` (kept and
rejected rows, integer counters); it does no I/O. ``run_sharded`` reads each
item's input (``read_shard``: the Parquet file under each of the item's input
keys, ``path`` by default; ingest passes its own reader of raw files), calls
the step on it, and writes per shard:

    <out>/data/part-NNNNN.parquet       kept rows
    <out>/rejected/part-NNNNN.parquet   rejected rows
    <out>/done/part-NNNNN.json          completion marker with the counters

Ray Data runs the items on an actor pool by default, so a step that loads a model
loads it once per worker; cheap steps run as plain Ray tasks (``actors=False``). The marker is written last, atomically, with the
work item. A rerun after a crash skips shards whose marker names the same item,
so finished work is never redone; a marker for another item (the plan changed)
is dropped with its files.
"""
from __future__ import annotations

import json
import logging
import os
import time
import traceback
import warnings
import zlib
from pathlib import Path
from functools import partial
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from cluster import storage


def configure(progress_bars: bool = False) -> None:
    """Ray Data settings for this process (each stage task builds its own datasets). No stage
    shuffles through Ray Data (dedup's and the duplicate-id check's shuffles are map_reduce)."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress_bars
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(path, columns=columns)


def read_shard(item: dict, keys: tuple[str, ...] = ("path",)) -> tuple[pa.Table, ...]:
    """A shard step's arguments: the Parquet file under each of ``keys`` of its work item
    (fetched from the object store first where this node's mirror lacks it)."""
    return tuple(read_parquet(storage.localize(item[key])) for key in keys)


def shard_reader(*keys: str) -> Callable[[dict], tuple[pa.Table, ...]]:
    """read_shard over other input keys, e.g. ``shard_reader("path", "removals")``."""
    return partial(read_shard, keys=keys)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    _replace_synced(tmp, path)


def _write_text_atomic(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    _replace_synced(tmp, path)


def _replace_synced(tmp: Path, path: Path) -> None:
    """fsync, then rename into place (as pipelines.store does): after a power loss a shard or
    marker is either absent or whole, never a renamed empty file."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def maybe_fault(point: str, fault: str | None) -> None:
    """Fault injection for tests. ``fault`` is ``POINT`` (the process exits there)
    or ``POINT=hang`` (it stops there until killed). The driver reads it from
    the R1PIPE_FAULT environment variable and hands it down explicitly, because
    Ray workers started earlier do not see later changes to the environment."""
    if not fault:
        return
    target, _, mode = fault.partition("=")
    if target != point:
        return
    if mode == "hang":
        while True:
            time.sleep(1)
    os._exit(137)


class _ShardWorker:
    def __init__(self, step_cls, step_kwargs: dict, out_dir: str, fault_prefix: str,
                 fault: str | None, read: Callable[[dict], tuple] = read_shard,
                 mirrors: dict[str, str] | None = None):
        storage.adopt(mirrors or {})
        storage.localize_all(step_kwargs)  # files a step loads (difficulty's KenLM models)
        self.step = step_cls(**step_kwargs)
        self.read = read
        self.out = Path(out_dir)
        self.fault_prefix, self.fault = fault_prefix, fault

    def __call__(self, row: dict) -> dict:
        item = json.loads(row["item"])
        name = shard_name(item["index"])
        try:
            result = self.step(*self.read(item))
        except Exception as err:  # noqa: BLE001 - a broken shard is reported, not fatal
            return {"result": json.dumps({"index": item["index"], "error": f"{type(err).__name__}: {err}",
                                          "trace": traceback.format_exc(limit=3), "item": item})}
        write_parquet_atomic(result.kept, self.out / "data" / f"{name}.parquet")
        write_parquet_atomic(result.rejected, self.out / "rejected" / f"{name}.parquet")
        maybe_fault(f"{self.fault_prefix}:after_write:{item['index']}", self.fault)
        stats = {"index": item["index"], "kept": result.kept.num_rows,
                 "rejected": result.rejected.num_rows, "counters": result.counters, "item": item,
                 **({"lines": result.lines} if hasattr(result, "lines") else {})}  # ingest's IngestResult
        _write_text_atomic(json.dumps(stats), self.out / "done" / f"{name}.json")
        push_shard(self.out, name)
        return {"result": json.dumps(stats)}


def push_shard(out_dir: Path, name: str) -> None:
    """A run on object storage: the finished shard goes up at once, its marker last (the commit
    record; cluster/storage.py), so a killed driver loses only the shards in flight."""
    for path in (out_dir / "data" / f"{name}.parquet", out_dir / "rejected" / f"{name}.parquet",
                 out_dir / "done" / f"{name}.json"):
        storage.push(path)


def _shard_task(row: dict, worker_kwargs: dict) -> dict:
    return _ShardWorker(**worker_kwargs)(row)


def finished_shards(out_dir: Path) -> dict[int, dict]:
    done = {}
    for marker in sorted((out_dir / "done").glob("part-*.json")):
        stats = json.loads(marker.read_text())
        done[stats["index"]] = stats
    return done


def run_sharded(step_cls, step_kwargs: dict, items: list[dict], out_dir: Path, *,
                concurrency: int | None = None, num_cpus: float = 1, num_gpus: float = 0,
                fault_prefix: str = "shard", fault: str | None = None,
                actors: bool = True, read: Callable[[dict], tuple] = read_shard
                ) -> tuple[list[dict], list[dict]]:
    """Run a shard step over ``items`` (each with a unique ``index``): per item,
    ``step(*read(item))`` -> ShardResult, written as the item's shard.

    ``actors=False`` builds the step per shard in plain Ray tasks instead: for steps
    that are cheap to build, it saves starting (and importing into) fresh actor
    processes, a few CPU-seconds each, and Ray Data's start-up (the first data stage of a
    run, ingest of 18k short documents: 4.6 s on Ray Data's task pool, 1.8 s on tasks).

    Returns (stats of every finished shard, each with ``reused``: finished by an earlier
    attempt; errors of shards that failed).
    """
    out_dir = Path(out_dir)
    # how many shards this pass has, for the progress line (pipelines/progress.py)
    _write_text_atomic(json.dumps({"total": len(items)}), out_dir / "plan.json")
    done = _current_shards(out_dir, items)
    reused = set(done)
    todo = [it for it in items if it["index"] not in done]
    errors = []
    if todo:
        n = concurrency or max(1, min(len(todo), int(ray.available_resources().get("CPU", 1))))
        rows = [{"item": json.dumps(it)} for it in todo]
        worker_kwargs = {"step_cls": step_cls, "step_kwargs": step_kwargs, "out_dir": str(out_dir),
                         "fault_prefix": fault_prefix, "fault": fault, "read": read,
                         "mirrors": storage.carried()}
        size = min(n, len(todo))
        # A dead worker or task fails the stage instead of being restarted and retried: the
        # shard may be poisoned, and a rerun resumes from the finished shards.
        if actors:
            with warnings.catch_warnings():
                # Ray 2.60 has no named parameters for retries and restarts and warns on **kwargs.
                warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
                results = ray.data.from_items(rows, override_num_blocks=len(rows)).map(
                    _ShardWorker, fn_constructor_kwargs=worker_kwargs,
                    compute=ray.data.ActorPoolStrategy(size=size), max_restarts=0,
                    max_task_retries=0, num_cpus=num_cpus, num_gpus=num_gpus).take_all()
        else:
            task = _remote(_shard_task).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)
            results = gather(_bounded(task, [(row, worker_kwargs) for row in rows], size,
                                      stop_on_error=True))
        for r in results:
            stats = json.loads(r["result"])
            (errors if "error" in stats else []).append(stats)
        for kind in ("data", "rejected", "done"):  # shards other nodes wrote, markers last
            storage.localize(out_dir / kind)
        done = finished_shards(out_dir)
    return [dict(done[i], reused=i in reused) for i in sorted(done)], errors


def _current_shards(out_dir: Path, items: list[dict]) -> dict[int, dict]:
    """The finished shards whose marker names the same work item as now.

    A marker from an earlier attempt whose item differs (the inputs changed between a crash
    and the resume, so the plan did too), or whose index is no longer planned, is stale: its
    shard files go first, then the marker, and the shard is redone.
    """
    wanted = {it["index"]: json.loads(json.dumps(it)) for it in items}
    done = finished_shards(out_dir)
    for index, stats in list(done.items()):
        if wanted.get(index) != stats.get("item"):
            storage.discard(out_dir / "done" / f"{shard_name(index)}.json")  # the record goes first
            for kind in ("data", "rejected"):
                (out_dir / kind / f"{shard_name(index)}.parquet").unlink(missing_ok=True)
            (out_dir / "done" / f"{shard_name(index)}.json").unlink()
            del done[index]
    for kind in ("data", "rejected"):  # files a crash left before their marker, beyond the plan
        for path in (out_dir / kind).glob("part-*.parquet"):
            if int(path.stem.split("-")[1]) not in wanted:
                path.unlink()
    return done


def duplicate_values(paths: list[str], column: str, *, parts: int | None = None,
                     workers: int | None = None) -> set[Any]:
    """Values of ``column`` that occur more than once across Parquet files: per file its
    values split by a hash into ``parts`` (one per ROWS_PER_PART rows by default), per part
    the values counted (map_reduce)."""
    if not paths:
        return set()
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    parts = parts or max(1, -(-rows // ROWS_PER_PART))
    workers = workers or max(1, int(ray.available_resources().get("CPU", 1)))
    found = map_reduce(_values_by_part, [(p, column, parts) for p in paths], _repeated,
                       [()] * parts, parts, workers)
    return {v for t in found for v in t.column(column).to_pylist()}


ROWS_PER_PART = 5_000_000  # ids per counting task of duplicate_values


def _values_by_part(path: str, column: str, parts: int) -> tuple | pa.Table:
    values = read_parquet(storage.localize(path), columns=[column]).column(column)
    part = np.fromiter((zlib.crc32(str(v).encode()) % parts for v in values.to_pylist()),
                       np.int64, len(values)) if parts > 1 else np.zeros(len(values), np.int64)
    return map_output([pa.table({column: values.filter(pa.array(part == p))}) for p in range(parts)])


def _repeated(*tables: pa.Table) -> pa.Table:
    values = pa.concat_tables(tables).column(0)
    counts = pc.value_counts(values)
    return pa.table({tables[0].column_names[0]: counts.field("values").filter(
        pc.greater(counts.field("counts"), 1))})


def map_files(fn, paths: list[str], columns: list[str], *, num_cpus: float = 1) -> pa.Table:
    """fn(table) -> Table over the given columns of each Parquet file, one Ray task per file,
    results concatenated in file order. For a read-only pass whose output is small (the tasks
    stage's scan of the corpus for held-out prompts); fn is shipped once to the object store."""
    fn_ref, mirrors = ray.put(fn), storage.carried()

    @ray.remote(num_cpus=num_cpus, max_retries=0)
    def one(path: str, f) -> pa.Table:
        storage.adopt(mirrors)
        return f(read_parquet(storage.localize(path), columns=columns))

    tables = ray.get([one.remote(p, fn_ref) for p in paths])
    return pa.concat_tables(tables) if tables else pa.table({})


# --- map and reduce on plain Ray tasks ----------------------------------------------------
# For a shuffle into a few large groups (dedup's parts, duplicate ids): the map side returns
# one object per part, the reduce side takes one part's objects from every map task, as Ray's
# docs describe. Ray Data's groupby does the same with a sort shuffle that samples and
# range-partitions first, over a second per pass on small inputs. A task is retried when its
# worker dies, so map functions must be idempotent (dedup's signature files are atomic).

_REMOTE: dict = {}


def _remote(fn):
    """fn as a Ray remote function, made once per process: each ray.remote() exports the
    function to the cluster again."""
    if fn not in _REMOTE:
        _REMOTE[fn] = ray.remote(fn)
    return _REMOTE[fn]


def map_output(parts: list[pa.Table]) -> tuple | pa.Table:
    """What a map function of map_reduce returns for its tables, one per part: Ray takes
    ``num_returns`` values as a tuple, and one value (not a 1-tuple) when there is one part."""
    return tuple(parts) if len(parts) > 1 else parts[0]


def map_reduce(map_fn, map_args: list[tuple], reduce_fn, reduce_args: list[tuple], parts: int,
               workers: int) -> list:
    """[reduce_fn(*reduce_args[p], *(part p of every map_fn(*a))) for each part p]: map_fn
    returns map_output of its ``parts`` tables; at most ``workers`` map
    tasks, then reduce tasks, run at once."""
    mirrors = storage.carried()  # where a map function reads or writes the run's files
    map_remote = _remote(_in_run).options(num_returns=parts)
    mapped = [r if parts > 1 else [r] for r in _bounded(map_remote, [(map_fn, mirrors, *a) for a in map_args],
                                                        workers)]
    reduced = _bounded(_remote(_in_run), [(reduce_fn, mirrors, *reduce_args[p], *[m[p] for m in mapped])
                                          for p in range(parts)], workers)
    return ray.get(reduced)


def _in_run(fn, mirrors: dict[str, str], *args):
    """fn(*args) in a Ray task that knows the run's mirrors (cluster/storage.py)."""
    storage.adopt(mirrors)
    return fn(*args)


def _bounded(remote, args: list[tuple], limit: int, *, stop_on_error: bool = False) -> list:
    """remote.remote(*a) for each a, keeping at most ``limit`` running; their refs, in order.
    ``stop_on_error``: fetch each finished task's (small) result as it ends, so the first one
    that failed raises here and no further task starts (run_sharded: a crashed shard must
    not be followed by more work before the stage fails)."""
    refs, running = [], []
    for a in args:
        if len(running) >= limit:
            ready, running = ray.wait(running, num_returns=1, fetch_local=stop_on_error)
            if stop_on_error:
                _get_or_cancel(ready, running)
        ref = remote.remote(*a)
        refs.append(ref)
        running.append(ref[0] if isinstance(ref, list) else ref)
    return refs


def gather(refs: list) -> list:
    """ray.get of every ref as they finish; the first failure cancels the tasks still running
    (a crashed shard fails the stage, and nothing keeps its CPUs after) and raises."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        _get_or_cancel(ready, pending)
    return ray.get(refs)


def _get_or_cancel(ready: list, running: list) -> None:
    try:
        ray.get(ready)
    except Exception:
        for ref in running:
            ray.cancel(ref, force=True)
        raise
