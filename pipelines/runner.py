"""Run the stages of a recipe in order, skipping those already done.

    run_pipeline(load_config("recipes/demo.yaml"), run_id="demo")

A stage runs when it is selected and either ``force`` is set or its folder
lacks a ``done`` manifest with the same fingerprint. The fingerprint hashes
the stage's config section, the seed, its inputs' fingerprints and the code
version, so a changed config reruns that stage and everything downstream.
"""
from __future__ import annotations

import hashlib
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from cluster.session import RaySettings, connect, error_cause, run_task
from pipelines.config import ConfigError, PipelineConfig, input_files
from pipelines.graph import STAGES, StageContext, check_order
from pipelines.lineage import record_lineage
from pipelines.store import RunStore, code_version, fingerprint, sha256_file
from rl.config import PLACEMENT


class StageFailed(RuntimeError):
    """A stage raised: ``error`` is one line naming the cause, ``detail`` its whole trace."""

    def __init__(self, stage: str, error: str, detail: str = ""):
        super().__init__(f"stage {stage!r} failed: {error}")
        self.stage, self.error, self.detail = stage, error, detail


# Errors a user causes (a recipe, an input file, a gang the cluster cannot hold): their message
# alone says what to fix. Anything else is named with its type, which points at a bug.
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class Watcher(Protocol):
    """What the runner tells a progress display: a stage started, it is still running, it ended."""

    def start(self, stage: str, root: Path) -> None: ...
    def poll(self) -> None: ...
    def stop(self) -> None: ...


@dataclass
class StageResult:
    name: str
    action: str                 # "ran" | "skipped"
    fingerprint: str
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)


def select(cfg: PipelineConfig, stages: list[str] | None, from_stage: str | None) -> list[str]:
    order = cfg.stages
    check_order(order)
    if stages and from_stage:
        raise ConfigError("give --stages or --from, not both")
    for name in (stages or []) + ([from_stage] if from_stage else []):
        if name not in order:
            raise ConfigError(f"stage {name!r} is not in this recipe's stages {order}")
    if stages:
        return [s for s in order if s in stages]
    if from_stage:
        return order[order.index(from_stage):]
    return list(order)


def stage_config(cfg: PipelineConfig, name: str) -> dict:
    """What a stage's fingerprint covers: the seed, its section, and the contents of the files
    the section names (editing a blocklist reruns quality; the path alone would not)."""
    section = cfg.section(name)
    dump = section.model_dump(mode="json")
    files = {}
    for key, _, _, path in input_files(section):
        *parents, leaf = key.split(".")
        node = dump
        for part in parents:
            node = node[part]
        node[leaf] = "<file>"  # the contents count, not where the file lies (a moved checkout)
        files[f"{name}.{key}"] = _content_hash(path)
    for i, path in enumerate(getattr(section, "fingerprint_files", lambda: [])()):
        files[f"{name}.data[{i}]"] = _content_hash(path)  # data files a section reads (tasks' user files)
    out = {"seed": cfg.seed, name: dump}
    if files:
        out["files"] = files
    return out


# where a stage runs, not what it computes: the gang (workers, resources, placement, restarts) and
# an RL stage's actor groups (rl.config.PLACEMENT); True: the whole section, a set: those keys of it
PLACEMENT_KEYS: dict[str, bool | set[str]] = {"gang": True, **PLACEMENT}


def fingerprint_config(cfg: PipelineConfig, name: str) -> dict:
    """stage_config without where the stage runs (PLACEMENT_KEYS): what its fingerprint hashes, so
    moving a stage to other workers (fewer, after a node is lost for good) resumes a running stage
    from its checkpoint and leaves a finished one done. The manifest and W&B record the whole
    stage_config."""
    out = stage_config(cfg, name)
    section = out[name]
    for key, fields in PLACEMENT_KEYS.items():
        if fields is True:
            section.pop(key, None)
        elif isinstance(section.get(key), dict):
            section[key] = {k: v for k, v in section[key].items() if k not in fields}
    return out


def _content_hash(path: Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents)."""
    if path.is_file():
        return sha256_file(path)
    lines = [f"{p.relative_to(path).as_posix()} {sha256_file(p)}"
             for p in sorted(path.rglob("*")) if p.is_file()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def run_pipeline(cfg: PipelineConfig, run_id: str, *, stages: list[str] | None = None,
                 from_stage: str | None = None, force: bool = False,
                 echo: Callable[[str], None] = print, fault: str | None = None,
                 watch: Watcher | None = None) -> list[StageResult]:
    selected = select(cfg, stages, from_stage)
    cfg = pin_cache_dir(cfg)
    check_gangs(cfg, selected, echo)
    store = RunStore(cfg.runs_dir, run_id, cfg.cache_dir)
    code = code_version()
    store.write_pipeline(cfg.model_dump(mode="json"), cfg.stages)
    fingerprints: dict[str, str] = {}
    results = []
    for name in cfg.stages:
        stage_dir = store.stage(name)
        inputs = {dep: input_fingerprint(store, name, dep, fingerprints) for dep in STAGES[name].deps(cfg.stages)}
        stage_fingerprint = fingerprint(name, fingerprint_config(cfg, name), inputs, code)
        if name not in selected:
            fingerprints[name] = _upstream_fingerprint(store, name, stage_fingerprint, selected, cfg.stages, echo)
            continue
        fingerprints[name] = stage_fingerprint
        if not force and stage_dir.is_done(stage_fingerprint) and not stage_dir.changed_outputs():
            echo(f"skip  {name}: done, fingerprint {stage_fingerprint[:12]} unchanged")
            store.event(name, "skip", fingerprint=stage_fingerprint)
            results.append(StageResult(name, "skipped", stage_fingerprint,
                                       metrics=stage_dir.manifest()["metrics"]))
            continue
        results.append(_run_stage(cfg, store, name, stage_fingerprint, inputs, echo, fault, watch))
    return results


def pin_cache_dir(cfg: PipelineConfig) -> PipelineConfig:
    """A run on object storage: the driver fixes the local mirror's folder, so the stage tasks
    (whose environment may differ) work in the same one."""
    from cluster.storage import cache_root, is_uri
    if not is_uri(cfg.runs_dir) or cfg.cache_dir:
        return cfg
    return cfg.model_copy(update={"cache_dir": str(cache_root())})


def check_gangs(cfg: PipelineConfig, selected: list[str], echo: Callable[[str], None]) -> None:
    """Every selected training stage's gang (and an RL stage's actor groups beside it) against
    the cluster, before the first stage runs: an impossible gang fails now, naming its key, not
    after hours of data stages; on an autoscaling cluster, one that must wait for nodes says so."""
    from cluster.gang import preflight
    gangs = [(name, cfg.section(name)) for name in selected]
    gangs = [(name, section) for name, section in gangs
             if getattr(section, "gang", None) is not None and section.gang.check_fit]
    if not gangs:
        return
    connect(RaySettings(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.include_dashboard, cfg.ray.node_ip_address))
    for name, section in gangs:
        wait = preflight(section.gang, f"{name}.gang", role_resources(section))
        if wait:
            echo(f"wait  {name}: {wait}")


def role_resources(section) -> dict[str, float] | None:
    """What an RL stage's actor groups (rollout, reference, reward model) hold beside its gang
    (None: every role shares the gang's processes)."""
    groups = section.placement_groups() if hasattr(section, "placement_groups") else []
    need: dict[str, float] = {}
    for g in groups:
        if not g.workers:
            continue
        need["CPU"] = need.get("CPU", 0.0) + g.cpus_per_worker * g.workers
        if g.use_gpu:
            need["GPU"] = need.get("GPU", 0.0) + float(g.workers)
    return need or None


def input_fingerprint(store: RunStore, stage: str, dep: str, fingerprints: dict[str, str]) -> str:
    """What stands for an input in a stage's fingerprint: the input's own fingerprint, or, where the
    stage reads only part of it (pretrain reads tasks' eval split), the digest of that part, so a
    change elsewhere in the input (SFT data) does not rerun the stage."""
    key = STAGES[stage].views.get(dep)
    if key:
        digest = ((store.stage(dep).manifest() or {}).get("metrics") or {}).get(key)
        if digest is not None:
            return f"{key}:{digest}"
    return fingerprints[dep]


def _upstream_fingerprint(store: RunStore, name: str, expected: str, selected: list[str],
                          order: list[str], echo) -> str:
    """An unselected stage is used as it is on disk, if a selected stage needs it."""
    needed = any(name in STAGES[s].deps(order) for s in selected)
    manifest = store.stage(name).manifest() or {}
    if manifest.get("status") != "done":
        if needed:
            users = [s for s in selected if name in STAGES[s].deps(order)]
            raise ConfigError(f"stage {users[0]!r} needs {name!r}, which is not done in run "
                              f"{store.run_id!r}: run it first (r1pipe run ... --stages {name})")
        return expected
    if needed and manifest.get("fingerprint") != expected:
        echo(f"note  {name}: config or code changed since it ran; using its outputs as they are")
    return manifest["fingerprint"]


def _run_stage(cfg, store, name, stage_fingerprint, inputs, echo, fault, watch: Watcher | None) -> StageResult:
    stage_dir = store.stage(name)
    manifest = stage_dir.begin(stage_fingerprint, inputs, stage_config(cfg, name))
    verb = "resume" if manifest["resumed"] else "run  "
    echo(f"{verb} {name}: fingerprint {stage_fingerprint[:12]}")
    store.event(name, verb.strip(), fingerprint=stage_fingerprint)
    connect(RaySettings(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.include_dashboard,
                        cfg.ray.node_ip_address))
    started = time.time()
    if watch:
        watch.start(name, stage_dir.root)
    try:
        metrics = run_task(execute_stage, cfg, store.run_id, name, fault,
                           resources=STAGES[name].resources, poll=watch.poll if watch else None,
                           here=store.remote is not None)  # object storage: the mirror is this node's
        manifest = record_lineage(store, name, manifest)  # model/lineage.json is an output
    except BaseException as err:  # noqa: BLE001 - record every failure, then re-raise
        message, detail = describe_failure(err)
        stage_dir.fail(manifest, message + "\n" + detail)
        store.event(name, "fail", error=message)
        raise StageFailed(name, message, detail) from err
    finally:
        if watch:
            watch.stop()
    stage_dir.publish(manifest, metrics)
    seconds = time.time() - started
    echo(f"done  {name} in {seconds:.1f}s: " + _headline(metrics))
    for warning in stage_warnings(metrics, manifest):
        echo(f"warn  {name}: {warning}")
    store.event(name, "done", seconds=round(seconds, 2))
    return StageResult(name, "ran", stage_fingerprint, seconds, metrics)


def stage_warnings(metrics: dict, manifest: dict) -> list[str]:
    """What a finished stage should tell its user even when its workers' logs go to a file:
    damaged checkpoints skipped on resume, inputs that changed after they were read."""
    out = [f"damaged checkpoint(s) skipped on resume: {', '.join(map(str, skipped))}"
           for skipped in [metrics.get("corrupt_checkpoints_skipped")] if skipped]
    return out + list((manifest.get("lineage") or {}).get("warnings", []))


def describe_failure(err: BaseException) -> tuple[str, str]:
    """(one line naming the cause, the whole trace). A Ray task's error is unwrapped to the
    stage's own exception; a user's mistake is its message alone, anything else gets its type."""
    cause = error_cause(err)
    text = str(cause).strip() or type(cause).__name__
    line = text if isinstance(cause, USER_ERRORS) else f"{type(cause).__name__}: {text.splitlines()[0]}"
    detail = "".join(traceback.format_exception(err))
    return line, detail


def execute_stage(cfg: PipelineConfig, run_id: str, name: str, fault: str | None = None) -> dict:
    """The body of one stage; runs inside a Ray task. Returns the stage's metrics.

    Fault point (tests): ``<stage>:after_run``, after the stage staged its outputs."""
    from cluster.sharded import configure, maybe_fault
    from pipelines.tracking import make_sink
    configure()
    store = RunStore(cfg.runs_dir, run_id, cfg.cache_dir)
    stage_dir = store.stage(name)
    stage = STAGES[name]
    for dep in stage.deps(cfg.stages):  # object storage: the inputs into this node's mirror
        store.stage(dep).fetch()
    sink = make_sink(cfg.wandb, store.root, run_id, name, stage_config(cfg, name))
    ctx = StageContext(name=name, run_id=run_id, config=cfg, section=cfg.section(name),
                       root=stage_dir.root, out=stage_dir.staging, work=stage_dir.work,
                       inputs={d: store.stage(d).root for d in stage.deps(cfg.stages)}, sink=sink,
                       data_concurrency=cfg.ray.data_concurrency, fault=fault,
                       resumed=bool((stage_dir.manifest() or {}).get("resumed")))
    ctx.work.mkdir(parents=True, exist_ok=True)
    try:
        metrics = stage.run(ctx)
        check_rows_in(store, name, metrics)
        maybe_fault(f"{name}:after_run", fault)
    except BaseException:
        sink.finish(exit_code=1)
        sync_wandb(cfg, store)
        raise
    sink.log(metrics)
    log_report_figures(sink, name, metrics, stage_dir.staging / "train_log.jsonl")
    # the W&B runs of the stages it read (named <run id>/<stage>), with their fingerprints
    sink.summary({**metrics, "upstream": {
        dep: f"{run_id}/{dep} {(store.stage(dep).manifest() or {}).get('fingerprint', '')[:12]}"
        for dep in ctx.inputs}})
    sink.finish()
    sync_wandb(cfg, store)
    return metrics


def sync_wandb(cfg: PipelineConfig, store: RunStore) -> None:
    """Object storage: the run's W&B offline folder (<run>/wandb) goes up after each stage, so
    `wandb sync` works from any machine that downloads it."""
    if store.remote and not cfg.wandb.dir:
        from cluster.storage import join, sync_up
        sync_up(store.root / "wandb", join(store.remote, "wandb"))


def log_report_figures(sink, name: str, metrics: dict, train_log: Path) -> None:
    """The stage's part of `r1pipe report`, as charts in its W&B run."""
    from pipelines.report import stage_figures
    from pipelines.report_data import read_train_log
    for key, fig in stage_figures(name, metrics, read_train_log(train_log)).items():
        sink.figure(key, fig)


def check_rows_in(store: RunStore, name: str, metrics: dict) -> None:
    """A data stage reads exactly the rows its input stages kept. Anything else is a row lost
    that the stage's own in = kept + rejected check cannot see: a truncated input artifact, or
    an intermediate pass (difficulty's scoring) dropping rows before the one it counts."""
    if not STAGES[name].reads_input_rows:
        return
    kept = {dep: (store.stage(dep).manifest() or {}).get("metrics", {}).get("kept")
            for dep in STAGES[name].inputs}
    if "rows_in" not in metrics or not kept or None in kept.values():
        return  # not a data stage, or an input that does not count rows
    if metrics["rows_in"] != sum(kept.values()):
        raise RuntimeError(f"row accounting broken in {store.stage(name).root}: "
                           f"rows_in={metrics['rows_in']}, but the input stage(s) kept {kept}")


def _headline(metrics: dict) -> str:
    """The first few figures of a stage, and its held-out accuracy where it was evaluated."""
    keys = [k for k, v in metrics.items() if isinstance(v, (int, float)) and not k.startswith("eval/")][:4]
    keys += [k for k in ("eval/accuracy",) if k in metrics]
    return ", ".join(f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}"
                     for k in keys)


def resolve_runs_dir(cfg: PipelineConfig, runs_dir: str | None) -> PipelineConfig:
    """An absolute runs_dir (a URI such as s3://bucket/runs stays as it is)."""
    from cluster.storage import is_uri
    chosen = runs_dir or cfg.runs_dir
    resolved = chosen.rstrip("/") if is_uri(chosen) else str(Path(chosen).resolve())
    return cfg.model_copy(update={"runs_dir": resolved})
