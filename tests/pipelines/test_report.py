"""`r1pipe report`: the numbers behind each figure (on a hand-built run), and the page itself in
headless Chromium on a recorded demo run (tests/data/demo_run: the manifests, training logs,
events and lineage files of a real `r1pipe run recipes/demo.yaml`, without the model weights)."""
import json
import re
import shutil
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines import report_data as rd
from pipelines.cli import app
from pipelines.store import RunStore, write_json_atomic

DEMO_RUN = Path(__file__).resolve().parents[1] / "data" / "demo_run"


def _stage(store: RunStore, name: str, metrics: dict, *, log: list[dict] | None = None,
           started: float = 100.0, finished: float = 110.0) -> None:
    root = store.stage(name).root
    write_json_atomic(root / "manifest.json", {
        "stage": name, "status": "done", "fingerprint": f"fp-{name}", "inputs": {}, "config": {"k": 1},
        "outputs": [], "metrics": metrics, "started": started, "finished": finished, "resumed": False,
        "attempts": 1, "error": None})
    if log is not None:
        (root / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))


@pytest.fixture()
def run(tmp_path):
    store = RunStore(tmp_path, "r")
    order = ["ingest", "difficulty", "sft", "prl_1"]
    store.write_pipeline({"name": "r"}, order)
    _stage(store, "ingest", {"rows_in": 10, "kept": 7, "rejected": 3,
                             "rejected_by_reason": {"bad_json": 2, "empty_text": 1}})
    _stage(store, "difficulty", {"rows_in": 7, "kept": 7, "rejected": 0, "tables": {
        "difficulty x domain": {"columns": ["domain", "basic", "advanced", "expert", "total"],
                                "rows": [["math", 1, 2, 0, 3], ["code", 2, 1, 1, 4]]},
        "perplexity histogram": {"columns": ["log10 ppl", "rows"], "rows": [["0.0-0.5", 3], ["0.5-1.0", 4]]},
        "quantile cuts": {"columns": ["domain", "cut basic/advanced", "cut advanced/expert"],
                          "rows": [["*", 2.5, 7.0]]}}})
    _stage(store, "sft", {"eval/accuracy": 0.25, "eval/n": 8, "eval/format_rate": 0.5, "eval/mean_length": 40.0,
                          "eval/accuracy/arithmetic": 0.5, "eval/accuracy/modular": 0.0,
                          "eval/difficulty/basic/accuracy": 0.5, "eval/difficulty/expert/accuracy": 0.0},
           log=[{"step": 1, "loss": 2.0, "lm_loss": 1.9, "aux_loss": 0.1, "lr": 1e-3, "time": 5.0, "skipped": False,
                 "phase_name": "basic", "experts/l1/e0": 0.75, "experts/l1/e1": 0.25, "experts/l1/imbalance": 1.5},
                {"step": 2, "loss": 1.5, "lm_loss": 1.4, "aux_loss": 0.1, "lr": 1e-3, "time": 6.0, "skipped": False,
                 "val/loss": 1.6, "val/family/modular": 1.7,
                 "experts/l1/e0": 0.5, "experts/l1/e1": 0.5, "experts/l1/imbalance": 1.0}])
    _stage(store, "prl_1", {"eval/accuracy": 0.375, "eval/n": 8, "eval/format_rate": 0.75,
                            "eval/mean_length": 30.0, "eval/accuracy/arithmetic": 0.75},
           log=[{"step": 1, "iteration": 1, "loss": 0.1, "reward/mean": 0.2, "reward/accuracy/mean": 0.1,
                 "reward/accuracy/std": 0.3, "kl": 0.01, "entropy": 1.2, "response_length/mean": 50.0,
                 "clip_frac/low": 0.0, "time/generate": 1.5}])
    store.event("ingest", "run")
    store.event("ingest", "done")
    store.event("ingest", "skip")
    with open(store.root / "events.jsonl", "a") as f:
        f.write('{"stage": "sft", "act')  # a line cut short by a crash
    return rd.load_run(tmp_path, "r")


def test_timeline_counts_each_invocations_action(run):
    rows = {r["stage"]: r for r in rd.timeline(run)}
    assert rows["ingest"]["actions"] == {"run": 1, "done": 1, "skip": 1}
    assert rows["sft"]["actions"] == {}  # the cut line is left out, not a crash
    assert rows["ingest"]["seconds"] == 10.0 and rows["ingest"]["status"] == "done"


def test_funnel_and_difficulty_tables(run):
    assert rd.funnel(run) == [
        {"stage": "ingest", "in": 10, "kept": 7, "rejected": 3, "by_reason": {"bad_json": 2, "empty_text": 1}},
        {"stage": "difficulty", "in": 7, "kept": 7, "rejected": 0, "by_reason": {}}]
    assert rd.domain_difficulty(run) == {"domains": ["math", "code"], "levels": ["basic", "advanced", "expert"],
                                         "counts": [[1, 2, 0], [2, 1, 1]]}
    ppl = rd.perplexity(run)
    assert ppl["bins"] == ["0.0-0.5", "0.5-1.0"] and ppl["rows"] == [3, 4]
    assert ppl["cuts"]["rows"] == [["*", 2.5, 7.0]]


def test_curves_group_keys_into_panels_and_drop_bookkeeping(run):
    sft = next(s for s in run.stages if s.name == "sft")
    panels = rd.curves(sft.log)
    assert list(panels) == ["loss", "learning rate", "validation", "validation by family"]
    assert panels["loss"]["loss"] == {"step": [1, 2], "value": [2.0, 1.5]}
    assert set(panels["loss"]) == {"loss", "lm_loss", "aux_loss"}
    assert panels["validation"]["val/loss"] == {"step": [2], "value": [1.6]}  # only where it ran
    prl = rd.curves(next(s for s in run.stages if s.name == "prl_1").log)
    assert set(prl["reward terms"]) == {"reward/mean", "reward/accuracy/mean"}
    assert set(prl["KL and entropy"]) == {"kl", "entropy"}
    assert set(prl["other"]) == {"reward/accuracy/std", "clip_frac/low"}
    assert prl["seconds per phase"] == {"time/generate": {"step": [1], "value": [1.5]}}
    assert not any("iteration" in keys or "step" in keys for keys in prl.values())


def test_expert_load_is_a_matrix_per_layer(run):
    sft = next(s for s in run.stages if s.name == "sft")
    assert rd.expert_load(sft.log) == {1: {"steps": [1, 2], "experts": [0, 1], "load": [[0.75, 0.5], [0.25, 0.5]]}}


def test_evaluation_by_stage_family_and_difficulty(run):
    ev = rd.evaluation(run)
    assert ev["stages"] == ["sft", "prl_1"]
    assert ev["families"] == ["arithmetic", "modular"]
    assert ev["by_family"] == [[0.5, 0.0], [0.75, None]]  # prl_1 has no modular figure
    assert ev["levels"] == ["basic", "expert"]
    assert ev["by_difficulty"] == [[0.5, 0.0], [None, None]]
    assert [o["accuracy"] for o in ev["overall"]] == [0.25, 0.375]


def test_report_of_a_missing_run_names_it(tmp_path):
    res = CliRunner().invoke(app, ["report", "nope", "--runs-dir", str(tmp_path)])
    assert res.exit_code == 2 and "nope" in res.output


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_demo_report_renders_in_chromium(tmp_path):
    from tests.browser import view_page
    runs = tmp_path / "runs"
    shutil.copytree(DEMO_RUN, runs / "demo")
    out = tmp_path / "report.html"
    res = CliRunner().invoke(app, ["report", "demo", "--runs-dir", str(runs), "--out", str(out)])
    assert res.exit_code == 0, res.output
    page = out.read_text()
    # nothing to fetch: no script, style or image from elsewhere (plotly.js is inlined)
    assert not re.search(r'<(script|link|img)\b[^>]*\b(src|href)=', page)
    run = rd.load_run(runs, "demo")
    trained = [s.name for s in run.stages if s.log]
    assert {"pretrain", "sft", "dpo", "reward_model", "prl_1", "prl_2"} <= set(trained)
    for name in trained:
        assert f"<h3>{name}</h3>" in page
    assert "lineage of each model" in page and "held-out evaluation" in page

    view = view_page(out, tmp_path / "report.png")
    assert view.errors == [], view.errors
    expected = page.count('<div class="figure">')
    # timeline, funnel, domain x difficulty, perplexity; curves + expert loads per training stage;
    # evaluation by family, by difficulty, and overall
    assert expected == 4 + 2 * len(trained) + 3
    assert len(view.figures) == expected
    for fig in view.figures:
        assert fig["svgs"] >= 1 and fig["marks"] >= 1 and fig["height"] > 100, fig
    width, height = _png_size(view.screenshot)
    assert width == 1400 and height >= 800  # the window less its frame
