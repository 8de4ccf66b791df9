"""The data behind `r1pipe report`, read from what every stage already writes.

Sources, and nothing else, so that a new stage shows up without a change here:
    <run>/pipeline.json            stage order, the recipe, the code version
    <run>/events.jsonl             each invocation's action per stage (run, resume, skip, done, fail)
    <stage>/manifest.json          status, times, fingerprint, config, metrics (+ their tables)
    <stage>/train_log.jsonl        one row per optimizer step of a training stage
    <stage>/model/lineage.json     what the stage's model was trained from (pipelines/lineage.py)

Every function here is pure over a loaded ``RunData`` and returns plain lists and
dicts, so that each figure's numbers are tested without a browser.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipelines.lineage import find_lineage
from pipelines.store import RunStore, open_run, read_json, write_json_atomic

# train_log keys that are bookkeeping, not curves
_NOT_CURVES = {"step", "time", "cpu_time", "tokens", "phase", "skipped", "nonfinite_total", "iteration"}
_EXPERT = re.compile(r"^experts/l(\d+)/e(\d+)$")


@dataclass
class StageData:
    name: str
    manifest: dict
    log: list[dict] = field(default_factory=list)

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics") or {}

    @property
    def status(self) -> str:
        return self.manifest.get("status", "pending")


@dataclass
class RunData:
    run_id: str
    root: Path
    pipeline: dict
    stages: list[StageData]
    events: list[dict]
    remote: str | None = None   # the run's URI when it lives on object storage


def load_run(runs_dir: str | Path, run_id: str | None = None) -> RunData:
    store, pipeline = open_run(runs_dir, run_id)
    if store.remote:  # object storage: what the report reads, into the local mirror
        write_json_atomic(store.root / "pipeline.json", pipeline)
        for name in pipeline["stages"]:
            store.stage(name).fetch(only=("train_log.jsonl", "model/lineage.json"))
    stages = [_load_stage(store.stage(name).root, name) for name in pipeline["stages"]]
    return RunData(store.run_id, store.root, pipeline, stages, store.events(), store.remote)


def _load_stage(root: Path, name: str) -> StageData:
    return StageData(name, read_json(root / "manifest.json") or {}, read_train_log(root / "train_log.jsonl"))


def read_train_log(path: Path) -> list[dict]:
    """A training log's rows ([] where the stage has none)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


# --- timeline ---------------------------------------------------------------------------------

def timeline(run: RunData) -> list[dict]:
    """One row per stage: status, its last execution's start and end, and what each invocation
    of the pipeline did with it (ran, resumed, skipped, failed), counted from events.jsonl."""
    rows = []
    for s in run.stages:
        actions: dict[str, int] = {}
        for e in run.events:
            if e.get("stage") == s.name:
                actions[e["action"]] = actions.get(e["action"], 0) + 1
        started, finished = s.manifest.get("started"), s.manifest.get("finished")
        rows.append({"stage": s.name, "status": s.status, "started": started, "finished": finished,
                     "seconds": round(finished - started, 2) if started and finished else None,
                     "resumed": bool(s.manifest.get("resumed")),
                     "attempts": s.manifest.get("attempts", 0), "actions": actions,
                     "fingerprint": s.manifest.get("fingerprint"),
                     "error": (s.manifest.get("error") or "").split("\n")[0] or None})
    return rows


# --- data stages ------------------------------------------------------------------------------

def funnel(run: RunData) -> list[dict]:
    """Rows in, kept, and rejected by reason for every stage that counts rows."""
    return [{"stage": s.name, "in": s.metrics["rows_in"], "kept": s.metrics.get("kept", 0),
             "rejected": s.metrics.get("rejected", 0),
             "by_reason": dict(s.metrics.get("rejected_by_reason") or {})}
            for s in run.stages if "rows_in" in s.metrics]


def find_table(run: RunData, title: str) -> tuple[str, dict] | None:
    """(stage, table) of the first stage whose metrics hold a table of that title."""
    for s in run.stages:
        table = (s.metrics.get("tables") or {}).get(title)
        if table:
            return s.name, table
    return None


def domain_difficulty(run: RunData) -> dict | None:
    """The difficulty stage's domain x difficulty counts as a matrix (the total column left out)."""
    found = find_table(run, "difficulty x domain")
    if not found:
        return None
    _, table = found
    levels = [c for c in table["columns"][1:] if c != "total"]
    index = [table["columns"].index(c) for c in levels]
    return {"domains": [r[0] for r in table["rows"]], "levels": levels,
            "counts": [[r[i] for i in index] for r in table["rows"]]}


def perplexity(run: RunData) -> dict | None:
    """The perplexity histogram (bins of log10 ppl) and the quantile cuts between levels."""
    found = find_table(run, "perplexity histogram")
    if not found:
        return None
    _, hist = found
    cuts = find_table(run, "quantile cuts")
    return {"bins": [r[0] for r in hist["rows"]], "rows": [r[1] for r in hist["rows"]],
            "cuts": {"columns": cuts[1]["columns"], "rows": cuts[1]["rows"]} if cuts else None}


# --- training curves --------------------------------------------------------------------------

def _val_panel(key: str) -> str | None:
    parts = key.split("/")
    if parts[0] != "val":
        return None
    return f"validation by {parts[1]}" if len(parts) >= 3 and parts[1] in {"domain", "difficulty", "family"} \
        else "validation"


# (panel title, rule); the first rule that takes a key wins, the rest go to "other"
PANELS: list[tuple[str, Callable[[str], bool]]] = [
    ("loss", lambda k: (k == "loss" or k.endswith("_loss")) and "/" not in k),
    ("learning rate", lambda k: k == "lr"),
    ("grad norm", lambda k: k == "grad_norm"),
    ("tokens/s", lambda k: k.endswith("tokens_per_s")),
    ("MFU", lambda k: k == "mfu"),
    ("reward terms", lambda k: k == "reward/mean" or (k.startswith("reward/") and k.endswith("/mean"))),
    ("KL and entropy", lambda k: k in {"kl", "entropy", "rollout/kl"}),
    ("response length", lambda k: k in {"response_length/mean", "response_length/max"}),
    ("preference", lambda k: k.startswith(("rewards/", "logps/", "scores/")) or k in {"accuracy", "margin"}),
    ("seconds per phase", lambda k: k.startswith("time/") or k == "step_seconds"),
]


def panel_of(key: str) -> str | None:
    """The curve panel a train_log key belongs to; None for bookkeeping and expert loads."""
    if key in _NOT_CURVES or key.startswith("experts/"):
        return None
    val = _val_panel(key)
    if val:
        return val
    return next((title for title, rule in PANELS if rule(key)), "other")


def curves(log: list[dict]) -> dict[str, dict[str, dict[str, list]]]:
    """{panel: {key: {"step": [...], "value": [...]}}} over the numeric keys of a train log, in
    the PANELS order; a key missing at a step (validation runs now and then) has no point there."""
    panels: dict[str, dict[str, dict[str, list]]] = {}
    for row in log:
        step = row.get("step")
        for key, value in row.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            title = panel_of(key)
            if title is None:
                continue
            series = panels.setdefault(title, {}).setdefault(key, {"step": [], "value": []})
            series["step"].append(step)
            series["value"].append(value)
    order = [t for t, _ in PANELS]
    return dict(sorted(panels.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order
                                                       else len(order) + (kv[0] == "other"), kv[0])))


def expert_load(log: list[dict]) -> dict[int, dict]:
    """Per MoE layer: {"steps": [...], "experts": [...], "load": [[share of tokens per step] per
    expert]}, from the ``experts/l<L>/e<E>`` keys of a train log."""
    layers: dict[int, dict[int, dict[int, float]]] = {}
    for row in log:
        for key, value in row.items():
            m = _EXPERT.match(key)
            if m:
                layers.setdefault(int(m[1]), {}).setdefault(int(m[2]), {})[row["step"]] = value
    out = {}
    for layer, experts in sorted(layers.items()):
        steps = sorted({s for by_step in experts.values() for s in by_step})
        names = sorted(experts)
        out[layer] = {"steps": steps, "experts": names,
                      "load": [[experts[e].get(s) for s in steps] for e in names]}
    return out


# --- evaluation -------------------------------------------------------------------------------

def evaluation(run: RunData) -> dict:
    """Held-out evaluation of every stage that ran one: accuracy per stage x family and per stage
    x difficulty, plus accuracy, format rate and mean length per stage."""
    stages = [s for s in run.stages if "eval/accuracy" in s.metrics]
    families = sorted({k.split("/")[2] for s in stages for k in s.metrics
                       if k.startswith("eval/accuracy/")})
    levels = _ordered_levels({k.split("/")[2] for s in stages for k in s.metrics
                              if k.startswith("eval/difficulty/") and k.endswith("/accuracy")})
    return {
        "stages": [s.name for s in stages], "families": families, "levels": levels,
        "by_family": [[s.metrics.get(f"eval/accuracy/{f}") for f in families] for s in stages],
        "by_difficulty": [[s.metrics.get(f"eval/difficulty/{d}/accuracy") for d in levels] for s in stages],
        "overall": [{"stage": s.name, "n": s.metrics.get("eval/n"), "accuracy": s.metrics["eval/accuracy"],
                     "format_rate": s.metrics.get("eval/format_rate"),
                     "mean_length": s.metrics.get("eval/mean_length")} for s in stages],
    }


def _ordered_levels(levels: set[str]) -> list[str]:
    known = ["basic", "advanced", "expert"]
    return [x for x in known if x in levels] + sorted(levels - set(known))


# --- lineage ----------------------------------------------------------------------------------

def models(run: RunData) -> list[StageData]:
    """Training stages that published a model (a ``model/`` output and a training log)."""
    return [s for s in run.stages if s.status == "done" and (run.root / s.name / "train_log.jsonl").is_file()
            and any(o["path"].startswith("model/") for o in s.manifest.get("outputs", []))]


def lineage_of(run: RunData, stage: str) -> dict:
    """The lineage its model recorded at publish (model/lineage.json, with the stage's finish
    time), else built from the manifests (a run published before models recorded it)."""
    return find_lineage(run.root / stage)
