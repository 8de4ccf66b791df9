"""`r1pipe status`: where a run stands, from its manifests alone.

Stages may put tables into their metrics as ``{"tables": {name: {"columns":
[...], "rows": [[...], ...]}}}``; status prints them under the stage table.
Training stages that ended with a held-out evaluation (``eval/*`` metrics) get one
row each in the evaluation table: stage x accuracy / format / length / pass@k.
"""
from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from pipelines.store import open_run

_SCALARS = (int, float, str, bool)


def collect(runs_dir: str, run_id: str | None) -> dict:
    store, pipeline = open_run(runs_dir, run_id)
    stages = []
    for name in pipeline["stages"]:
        m = store.stage(name).manifest() or {}
        started, finished = m.get("started"), m.get("finished")
        end = finished or (time.time() if m.get("status") == "running" else None)
        stages.append({
            "stage": name, "status": m.get("status", "pending"),
            "seconds": round(end - started, 2) if started and end else None,
            "fingerprint": m.get("fingerprint"), "error": (m.get("error") or "").split("\n")[0] or None,
            "metrics": m.get("metrics", {}),
        })
    return {"run_id": store.run_id, "root": store.remote or str(store.root.resolve()),
            "code_version": pipeline.get("code_version"), "stages": stages}


def render(report: dict, console: Console) -> None:
    table = Table(title=f"run {report['run_id']}  ({report['root']})")
    for col in ("stage", "status", "duration", "key metrics"):
        table.add_column(col)
    colour = {"done": "green", "running": "yellow", "failed": "red", "pending": "dim"}
    for s in report["stages"]:
        dur = f"{s['seconds']:.1f}s" if s["seconds"] is not None else "-"
        key = _key_metrics(s["metrics"]) if s["status"] == "done" else (s["error"] or "")
        table.add_row(s["stage"], f"[{colour.get(s['status'], 'white')}]{s['status']}[/]", dur, key)
    console.print(table)
    _render_funnel(report, console)
    _render_evaluation(report, console)
    for s in report["stages"]:
        for name, t in s["metrics"].get("tables", {}).items():
            console.print(_table(f"{s['stage']}: {name}", t["columns"], t["rows"]))


def _key_metrics(metrics: dict, limit: int = 6) -> str:
    # the evaluation has a table of its own; its per-family figures would crowd out the rest
    items = [(k, v) for k, v in metrics.items() if isinstance(v, _SCALARS) and not k.startswith("eval/")][:limit]
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items)


def _render_funnel(report: dict, console: Console) -> None:
    rows = [(s["stage"], s["metrics"]) for s in report["stages"] if "rows_in" in s["metrics"]]
    if not rows:
        return
    table = Table(title="data funnel")
    for col in ("stage", "in", "kept", "rejected", "by reason"):
        table.add_column(col)
    for stage, m in rows:
        reasons = ", ".join(f"{k}={v}" for k, v in m.get("rejected_by_reason", {}).items())
        table.add_row(stage, str(m["rows_in"]), str(m["kept"]), str(m["rejected"]), reasons)
    console.print(table)


def evaluation_rows(report: dict) -> list[list]:
    """[stage, tasks, accuracy, format rate, mean length, pass@k] per evaluated stage, in run order."""
    rows = []
    for s in report["stages"]:
        m = s["metrics"]
        if "eval/accuracy" in m:
            pass_k = next((f"{k.removeprefix('eval/')}={v:.3f}" for k, v in m.items() if k.startswith("eval/pass@")
                           and not k.endswith("_sampled")), "-")
            rows.append([s["stage"], m.get("eval/n"), m["eval/accuracy"], m["eval/format_rate"],
                         m["eval/mean_length"], pass_k])
    return rows


def _render_evaluation(report: dict, console: Console) -> None:
    rows = evaluation_rows(report)
    if rows:
        console.print(_table("held-out evaluation", ["stage", "tasks", "accuracy", "format", "mean length", "pass@k"],
                             rows))


def _table(title: str, columns: list, rows: list) -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(str(c))
    for r in rows:
        t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r])
    return t
