"""`r1pipe report`: one self-contained HTML file about a run.

    r1pipe report                      # the newest run in ./runs -> runs/<run>/report.html
    r1pipe report demo --runs-dir /tmp/runs --out demo.html

On a cluster, run it anywhere the run's folder is readable; the file opens offline (plotly.js is
inlined once; every figure is a plotly chart). Its sections follow the run: the stage timeline
and configs, the data funnel and the difficulty grading, every training stage's curves and
expert loads, the held-out evaluation of each stage, and each model's lineage. The numbers come
from pipelines.report_data (tested apart); this module only draws them.
"""
from __future__ import annotations

import html
import json
import time
from pathlib import Path

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from pipelines import report_data as rd

_STATUS_COLOUR = {"done": "#2e7d32", "running": "#f9a825", "failed": "#c62828", "pending": "#9e9e9e"}
_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=50, b=40), font=dict(size=12))


# --- figures ------------------------------------------------------------------------------------

def timeline_figure(rows: list[dict]) -> go.Figure | None:
    """A Gantt bar per stage from its last execution's start to its end."""
    timed = [r for r in rows if r["started"] and r["finished"]]
    if not timed:
        return None
    t0 = min(r["started"] for r in timed)
    fig = go.Figure()
    for r in timed:
        note = ", ".join(f"{k} x{v}" for k, v in sorted(r["actions"].items())) or "-"
        fig.add_bar(y=[r["stage"]], x=[r["finished"] - r["started"]], base=[r["started"] - t0],
                    orientation="h", marker_color=_STATUS_COLOUR.get(r["status"], "#607d8b"),
                    name=r["stage"], showlegend=False,
                    hovertemplate=f"{r['stage']}: {r['status']}, %{{x:.1f}} s<br>"
                                  f"{'resumed, ' if r['resumed'] else ''}attempts {r['attempts']}<br>"
                                  f"invocations: {html.escape(note)}<extra></extra>")
    fig.update_layout(title="stage timeline (seconds from the first stage's start)", barmode="overlay",
                      height=120 + 24 * len(timed), **_LAYOUT)
    fig.update_yaxes(autorange="reversed")
    return fig


def funnel_figure(rows: list[dict]) -> go.Figure | None:
    """Per data stage, kept rows and the rejected ones stacked by reason."""
    if not rows:
        return None
    stages = [r["stage"] for r in rows]
    fig = go.Figure(go.Bar(x=stages, y=[r["kept"] for r in rows], name="kept", marker_color="#2e7d32"))
    reasons = sorted({reason for r in rows for reason in r["by_reason"]})
    for reason in reasons:
        fig.add_bar(x=stages, y=[r["by_reason"].get(reason, 0) for r in rows], name=reason)
    fig.update_layout(title="data funnel: rows kept and rejected by reason", barmode="stack",
                      height=420, **_LAYOUT)
    return fig


def heatmap_figure(z: list[list], x: list, y: list, title: str, *, fmt: str = "d",
                   colorscale: str = "Blues", height: int | None = None) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=z, x=[str(v) for v in x], y=[str(v) for v in y], colorscale=colorscale,
                               texttemplate=f"%{{z:{fmt}}}", hoverongaps=False))
    fig.update_layout(title=title, height=height or 140 + 26 * len(y), **_LAYOUT)
    fig.update_yaxes(autorange="reversed")
    return fig


def perplexity_figure(ppl: dict) -> go.Figure:
    """The histogram of log10 perplexity, with the all-domain cuts between levels as lines."""
    fig = go.Figure(go.Bar(x=ppl["bins"], y=ppl["rows"], marker_color="#1565c0", name="rows"))
    title = "perplexity (log10) of the graded rows"
    cuts = ppl.get("cuts")
    if cuts:
        overall = next((r for r in cuts["rows"] if r[0] == "*"), None)
        if overall:
            title += " — cuts (all domains): " + ", ".join(
                f"{c.removeprefix('cut ')} at ppl {v:.4g}" for c, v in zip(cuts["columns"][1:], overall[1:]))
    fig.update_layout(title=title, height=360, **_LAYOUT)
    return fig


def curves_figure(stage: str, panels: dict[str, dict[str, dict[str, list]]]) -> go.Figure | None:
    """Every curve panel of a training stage in one grid of small charts over steps."""
    if not panels:
        return None
    titles = list(panels)
    cols = 3
    rows = (len(titles) + cols - 1) // cols
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.07,
                        vertical_spacing=0.32 / max(rows, 1) + 0.04)
    for i, title in enumerate(titles):
        r, c = divmod(i, cols)
        several = len(panels[title]) > 1  # a panel of one curve is named by its title alone
        for key, series in panels[title].items():
            mode = "lines" if len(series["step"]) > 12 else "lines+markers"
            fig.add_scatter(x=series["step"], y=series["value"], name=key, mode=mode, row=r + 1, col=c + 1,
                            legendgroup=title, legendgrouptitle_text=title, showlegend=several,
                            hovertemplate=f"{key}<br>step %{{x}}: %{{y:.4g}}<extra></extra>")
    fig.update_layout(title=f"{stage}: training curves over steps", height=260 * rows + 80,
                      legend=dict(font=dict(size=10), groupclick="toggleitem"), **_LAYOUT)
    return fig


def expert_figure(stage: str, load: dict[int, dict]) -> go.Figure | None:
    """Per MoE layer, the share of routed tokens each expert got at each step."""
    if not load:
        return None
    layers = list(load)
    fig = make_subplots(rows=1, cols=len(layers), subplot_titles=[f"layer {l}" for l in layers],
                        horizontal_spacing=0.04)
    for i, layer in enumerate(layers):
        d = load[layer]
        fig.add_heatmap(z=d["load"], x=d["steps"], y=[f"e{e}" for e in d["experts"]], row=1, col=i + 1,
                        coloraxis="coloraxis",
                        hovertemplate="step %{x}, %{y}: %{z:.3f} of tokens<extra></extra>")
    fig.update_layout(title=f"{stage}: expert load per layer over steps", height=140 + 22 * max(
        len(d["experts"]) for d in load.values()), coloraxis=dict(colorscale="Viridis"), **_LAYOUT)
    return fig


def evaluation_figures(ev: dict) -> list[go.Figure]:
    """Accuracy by stage x family and by stage x difficulty; accuracy, format rate and length."""
    if not ev["stages"]:
        return []
    figs = []
    if ev["families"]:
        figs.append(heatmap_figure(ev["by_family"], ev["families"], ev["stages"],
                                   "held-out accuracy by stage and task family", fmt=".2f", colorscale="Greens"))
    if ev["levels"]:
        figs.append(heatmap_figure(ev["by_difficulty"], ev["levels"], ev["stages"],
                                   "held-out accuracy by stage and difficulty", fmt=".2f", colorscale="Greens"))
    overall = ev["overall"]
    fig = make_subplots(rows=1, cols=3, subplot_titles=["accuracy", "well-formed answers", "mean length (tokens)"])
    for i, key in enumerate(["accuracy", "format_rate", "mean_length"]):
        fig.add_bar(x=[o["stage"] for o in overall], y=[o[key] for o in overall], row=1, col=i + 1,
                    name=key, showlegend=False)
    fig.update_layout(title="held-out evaluation after each training stage", height=360, **_LAYOUT)
    figs.append(fig)
    return figs


def stage_figures(name: str, metrics: dict, log: list[dict]) -> dict[str, go.Figure]:
    """The figures of one stage's part of the report, by W&B key: what execute_stage logs to the
    stage's own W&B run (its data funnel, difficulty grading, training curves, expert loads and
    held-out evaluation, whichever it has)."""
    run = rd.RunData("", Path("."), {}, [rd.StageData(name, {"status": "done", "metrics": metrics}, log)], [])
    dd, ppl, ev = rd.domain_difficulty(run), rd.perplexity(run), rd.evaluation(run)
    figs = {"report/funnel": funnel_figure(rd.funnel(run)),
            "report/domain_x_difficulty": dd and heatmap_figure(dd["counts"], dd["levels"], dd["domains"],
                                                                "rows by domain and difficulty"),
            "report/perplexity": ppl and perplexity_figure(ppl),
            "report/curves": curves_figure(name, rd.curves(log)),
            "report/expert_load": expert_figure(name, rd.expert_load(log))}
    for i, fig in enumerate(evaluation_figures(ev)):
        figs[f"report/evaluation_{i}"] = fig
    return {k: v for k, v in figs.items() if v is not None}


# --- the page -----------------------------------------------------------------------------------

class _Page:
    """Sections of HTML; each figure becomes a div that plotly.js draws (class "figure")."""

    def __init__(self):
        self.parts: list[str] = []
        self.nav: list[tuple[str, str]] = []
        self.figures = 0

    def section(self, anchor: str, title: str) -> None:
        self.nav.append((anchor, title))
        self.parts.append(f'<h2 id="{anchor}">{html.escape(title)}</h2>')

    def text(self, markup: str) -> None:
        self.parts.append(markup)

    def figure(self, fig: go.Figure | None) -> None:
        if fig is None:
            return
        self.figures += 1
        chart = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig{self.figures}",
                            config={"displaylogo": False, "responsive": True})
        self.parts.append(f'<div class="figure">{chart}</div>')

    def table(self, columns: list, rows: list[list]) -> None:
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
        self.parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return "-" if value is None else str(value)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def build_html(run: rd.RunData) -> str:
    page = _Page()
    _overview(page, run)
    _data(page, run)
    _training(page, run)
    _evaluation(page, run)
    _lineage(page, run)
    nav = " · ".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in page.nav)
    return _TEMPLATE.format(title=html.escape(f"r1pipe run {run.run_id}"), plotly=get_plotlyjs(), nav=nav,
                            generated=_when(time.time()), root=html.escape(str(run.root)),
                            code=html.escape(str(run.pipeline.get("code_version"))), body="\n".join(page.parts))


def _overview(page: _Page, run: rd.RunData) -> None:
    page.section("timeline", "stages")
    rows = rd.timeline(run)
    page.figure(timeline_figure(rows))
    page.table(["stage", "status", "started", "finished", "seconds", "resumed", "attempts", "invocations",
                "fingerprint", "error"],
               [[r["stage"], r["status"], _when(r["started"]), _when(r["finished"]), r["seconds"],
                 r["resumed"], r["attempts"], r["actions"], (r["fingerprint"] or "")[:12], r["error"]]
                for r in rows])
    configs = "".join(
        f"<details><summary>{html.escape(s.name)}</summary><pre>"
        f"{html.escape(json.dumps(s.manifest.get('config'), indent=2, sort_keys=True))}</pre></details>"
        for s in run.stages if s.manifest.get("config"))
    page.text(f"<h3>stage configs</h3>{configs}")


def _data(page: _Page, run: rd.RunData) -> None:
    rows = rd.funnel(run)
    dd, ppl = rd.domain_difficulty(run), rd.perplexity(run)
    if not (rows or dd or ppl):
        return
    page.section("data", "data")
    page.figure(funnel_figure(rows))
    page.table(["stage", "in", "kept", "rejected", "by reason"],
               [[r["stage"], r["in"], r["kept"], r["rejected"], r["by_reason"]] for r in rows])
    if dd:
        page.figure(heatmap_figure(dd["counts"], dd["levels"], dd["domains"], "rows by domain and difficulty"))
    if ppl:
        page.figure(perplexity_figure(ppl))
        if ppl["cuts"]:
            page.table(ppl["cuts"]["columns"], ppl["cuts"]["rows"])


def _training(page: _Page, run: rd.RunData) -> None:
    trained = [s for s in run.stages if s.log]
    if not trained:
        return
    page.section("training", "training")
    for s in trained:
        page.text(f"<h3>{html.escape(s.name)}</h3>")
        page.figure(curves_figure(s.name, rd.curves(s.log)))
        page.figure(expert_figure(s.name, rd.expert_load(s.log)))


def _evaluation(page: _Page, run: rd.RunData) -> None:
    ev = rd.evaluation(run)
    if not ev["stages"]:
        return
    page.section("evaluation", "held-out evaluation")
    for fig in evaluation_figures(ev):
        page.figure(fig)
    page.table(["stage", "tasks", "accuracy", "format rate", "mean length"],
               [[o["stage"], o["n"], o["accuracy"], o["format_rate"], o["mean_length"]] for o in ev["overall"]])


def _lineage(page: _Page, run: rd.RunData) -> None:
    chains = [(s.name, rd.lineage_of(run, s.name)) for s in rd.models(run)]
    if not chains:
        return
    page.section("lineage", "lineage of each model")
    for i, (name, lineage) in enumerate(chains):
        last = i == len(chains) - 1  # the run's final model is open, the others folded
        page.text(f"<details{' open' if last else ''}><summary><b>{html.escape(name)}/model</b>: "
                  f"{len(lineage['stages'])} stages</summary>")
        for warning in lineage.get("warnings", []):
            page.text(f"<p class=\"warn\">{html.escape(warning)}</p>")
        page.table(["stage", "fingerprint", "finished", "code", "files read (sha256)"],
                   [[e["name"], (e.get("fingerprint") or "")[:12], _when(e.get("finished")), e.get("code_version"),
                     "; ".join(f"{f['path']} {f['sha256'][:10]}" for f in e.get("input_files", [])[:6])
                     + (f"; +{len(e['input_files']) - 6} more" if len(e.get("input_files", [])) > 6 else "")]
                    for e in lineage["stages"]])
        page.text("</details>")


def write_report(runs_dir: str | Path, run_id: str | None = None, out: str | Path | None = None) -> Path:
    """Write the run's report; by default to <run>/report.html (atomically). Returns the path."""
    run = rd.load_run(runs_dir, run_id)
    path = Path(out) if out else run.root / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(build_html(run), encoding="utf-8")
    tmp.replace(path)
    if run.remote and not out:  # object storage: the report goes beside the run
        from cluster.storage import join, upload
        upload(path, join(run.remote, "report.html"))
    return path


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<script type="text/javascript">{plotly}</script>
<style>
body {{ font-family: system-ui, sans-serif; margin: 0 2rem 3rem; color: #212121; }}
header {{ position: sticky; top: 0; background: #fff; padding: .6rem 0; border-bottom: 1px solid #ddd; z-index: 10; }}
h1 {{ font-size: 1.3rem; margin: .2rem 0; }} h2 {{ margin-top: 2rem; border-bottom: 2px solid #1565c0; }}
table {{ border-collapse: collapse; font-size: .85rem; margin: .5rem 0 1rem; }}
th, td {{ border: 1px solid #ddd; padding: .2rem .5rem; text-align: left; vertical-align: top; }}
th {{ background: #f5f5f5; }} pre {{ font-size: .8rem; background: #fafafa; padding: .5rem; overflow-x: auto; }}
.meta {{ color: #616161; font-size: .85rem; }} .warn {{ color: #c62828; }}
summary {{ cursor: pointer; margin: .4rem 0; }} .figure {{ margin: .5rem 0; }}
</style></head>
<body><header><h1>{title}</h1><div class="meta">{root} · code {code} · written {generated}</div>
<nav>{nav}</nav></header>
{body}
</body></html>
"""
