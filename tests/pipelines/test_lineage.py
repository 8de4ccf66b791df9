"""Lineage: the exact chain of a stage on a small run store, the runner's hook through a real
`run_pipeline` (stage bodies replaced, so no Ray and no training), and `r1pipe lineage`."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.lineage import build_lineage, record_lineage
from pipelines.store import RunStore, fingerprint, sha256_file, write_json_atomic
from tests.conftest import write_recipe
from tests.reasoner import write_echo_tasks

ORDER = ["ingest", "dedup", "domains", "tokenizer", "tasks", "pretrain", "sft"]
cli = CliRunner()


@pytest.fixture()
def wide(monkeypatch):
    """A console wide enough that the table does not wrap a file's line."""
    from pipelines import cli as cli_module
    monkeypatch.setattr(cli_module.console, "width", 200)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def publish(store: RunStore, name: str, inputs: dict[str, str], files: dict[str, bytes],
            metrics: dict | None = None, config: dict | None = None) -> str:
    """A done stage with these files as its outputs; returns its fingerprint."""
    config = config or {"seed": 0, name: {"files": sorted(files)}}
    fp = fingerprint(name, config, inputs, "test")
    stage = store.stage(name)
    manifest = stage.begin(fp, inputs, config)
    for rel, data in files.items():
        (stage.staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (stage.staging / rel).write_bytes(data)
    stage.publish(manifest, metrics or {})
    return fp


class FakeRun(RunStore):
    """A run store filled by hand; ``fps``: each stage's fingerprint."""
    fps: dict[str, str]


@pytest.fixture()
def store(tmp_path) -> FakeRun:
    """ingest -> dedup -> {domains, tokenizer, tasks}; pretrain reads dedup, tokenizer and tasks'
    eval split (a view); sft reads pretrain and tasks. domains is upstream of nothing."""
    store = FakeRun(tmp_path / "runs", "r")
    store.root.mkdir(parents=True)
    write_json_atomic(store.root / "pipeline.json", {"run_id": "r", "config": {"name": "recipe-x"},
                                                     "code_version": "1.0+gabc", "stages": ORDER})
    fps = {"ingest": publish(store, "ingest", {}, {"data/part-00000.parquet": b"i0",
                                                   "rejected/part-00000.parquet": b"ir"})}
    fps["dedup"] = publish(store, "dedup", {"ingest": fps["ingest"]}, {
        "data/part-00000.parquet": b"d0", "data/part-00001.parquet": b"d1", "rejected/part-00000.parquet": b"dr"})
    fps["domains"] = publish(store, "domains", {"dedup": fps["dedup"]}, {"data/part-00000.parquet": b"x"})
    fps["tokenizer"] = publish(store, "tokenizer", {"dedup": fps["dedup"]}, {"tokenizer.json": b"tok"})
    fps["tasks"] = publish(store, "tasks", {"dedup": fps["dedup"]},
                           {"train/part-00000.parquet": b"tt", "eval/part-00000.parquet": b"te"}, {"eval_digest": "e1"})
    fps["pretrain"] = publish(
        store, "pretrain", {"dedup": fps["dedup"], "tasks": "eval_digest:e1", "tokenizer": fps["tokenizer"]},
        {"model/model.safetensors": b"w0", "model/config.json": b"{}", "train_log.jsonl": b"log",
         "eval_completions.jsonl": b"c"})
    fps["sft"] = publish(store, "sft", {"pretrain": fps["pretrain"], "tasks": fps["tasks"]},
                         {"model/model.safetensors": b"w1"},
                         config={"seed": 0, "sft": {}, "files": {"sft.init_model": "f" * 64}})
    store.fps = fps
    return store


def files(*pairs: tuple[str, bytes]) -> list[dict]:
    return [{"path": p, "bytes": len(b), "sha256": sha(b)} for p, b in pairs]


def test_lineage_of_sft_is_its_transitive_upstream_in_run_order(store):
    lineage = build_lineage(store, "sft")
    fps = store.fps
    assert {k: lineage[k] for k in ("format", "run_id", "recipe", "stage", "fingerprint", "warnings")} == {
        "format": 1, "run_id": "r", "recipe": "recipe-x", "stage": "sft", "fingerprint": fps["sft"], "warnings": []}
    stages = {s["name"]: s for s in lineage["stages"]}
    assert [s["name"] for s in lineage["stages"]] == ["ingest", "dedup", "tokenizer", "tasks", "pretrain", "sft"]
    assert {n: s["fingerprint"] for n, s in stages.items()} == {n: fps[n] for n in stages}
    assert {s["code_version"] for s in lineage["stages"]} == {"1.0+gabc"}  # from pipeline.json: no manifest has one
    assert all(s["finished"] for s in lineage["stages"])
    assert stages["ingest"]["input_files"] == [] and stages["ingest"]["inputs"] == {}
    assert stages["dedup"]["input_files"] == files(("ingest/data/part-00000.parquet", b"i0"))  # not rejected/
    assert stages["pretrain"]["inputs"]["tasks"] == "eval_digest:e1"
    assert stages["pretrain"]["input_files"] == files(
        ("dedup/data/part-00000.parquet", b"d0"), ("dedup/data/part-00001.parquet", b"d1"),
        ("tasks/eval/part-00000.parquet", b"te"), ("tasks/train/part-00000.parquet", b"tt"),
        ("tokenizer/tokenizer.json", b"tok"))
    # the model it started from, not pretrain's logs or completions
    assert stages["sft"]["input_files"] == files(
        ("pretrain/model/config.json", b"{}"), ("pretrain/model/model.safetensors", b"w0"),
        ("tasks/eval/part-00000.parquet", b"te"), ("tasks/train/part-00000.parquet", b"tt"))
    assert stages["sft"]["config_files"] == {"sft.init_model": "f" * 64}
    assert stages["pretrain"]["config_files"] == {}
    assert build_lineage(store, "sft") == lineage
    json.dumps(lineage)


def test_an_input_that_ran_again_is_a_warning_and_a_view_input_only_when_its_part_changed(store):
    publish(store, "tasks", {"dedup": store.fps["dedup"]},
            {"train/part-00000.parquet": b"new", "eval/part-00000.parquet": b"te"}, {"eval_digest": "e1"},
            config={"seed": 1, "tasks": {}})
    [warning] = build_lineage(store, "sft")["warnings"]  # pretrain read only the eval split, unchanged
    assert warning.startswith(f"sft read tasks at {store.fps['tasks'][:24]}, but tasks's folder now holds")


def test_record_lineage_writes_model_lineage_before_publish_and_the_manifest_names_upstream(store):
    stage = store.stage("sft")
    manifest = stage.begin("f" * 64, {"pretrain": store.fps["pretrain"], "tasks": store.fps["tasks"]}, {"seed": 2})
    (stage.staging / "model").mkdir()
    (stage.staging / "model" / "model.safetensors").write_bytes(b"w2")
    done = stage.publish(record_lineage(store, "sft", manifest), {})
    expected = build_lineage(store, "sft")
    expected["stages"][-1]["finished"] = None  # written while the stage ran
    assert json.loads((stage.root / "model" / "lineage.json").read_text()) == expected
    outputs = {o["path"]: o["sha256"] for o in done["outputs"]}
    assert outputs["model/lineage.json"] == sha256_file(stage.root / "model" / "lineage.json")
    assert done["lineage"] == {"code_version": "1.0+gabc", "upstream": {
        n: store.fps[n] for n in ("ingest", "dedup", "tokenizer", "tasks", "pretrain")}, "warnings": []}


def test_a_stage_without_a_model_gets_the_manifest_key_only(store):
    stage = store.stage("domains")
    manifest = stage.begin("e" * 64, {"dedup": store.fps["dedup"]}, {"seed": 2})
    done = stage.publish(record_lineage(store, "domains", manifest), {})
    assert done["lineage"]["upstream"] == {"ingest": store.fps["ingest"], "dedup": store.fps["dedup"]}
    assert not any("lineage" in o["path"] for o in done["outputs"])


# --- the runner's hook, through run_pipeline -------------------------------------------------------

RECIPE = """
name: t
runs_dir: {runs}
stages: [tasks, sft]
wandb: {{mode: disabled}}
tasks:
  generator: {{enabled: false}}
  files: [{{path: {train}}}, {{path: {eval}, split: eval}}]
sft:
  init_model: {init}
"""


def _fake_stage_bodies(fn, cfg, run_id, name, fault, **_):
    """Stands in for a stage's Ray task: stages what tasks and sft publish, in-process."""
    out = RunStore(cfg.runs_dir, run_id).stage(name).staging
    for rel, data in {"tasks": {"train/part-00000.parquet": b"tt", "eval/part-00000.parquet": b"te"},
                      "sft": {"model/model.safetensors": b"w", "model/config.json": b"{}",
                              "train_log.jsonl": b"{}\n"}}[name].items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    return {"steps": 1}


def test_run_pipeline_writes_lineage_into_the_model_before_the_done_manifest(tmp_path, monkeypatch):
    from pipelines.config import load_config
    from pipelines.runner import run_pipeline
    monkeypatch.setattr("pipelines.runner.code_version", lambda: "test")
    monkeypatch.setattr("pipelines.store.code_version", lambda: "test")
    monkeypatch.setattr("pipelines.runner.connect", lambda settings: None)
    monkeypatch.setattr("pipelines.runner.run_task", _fake_stage_bodies)
    monkeypatch.setattr("pipelines.runner.check_gangs", lambda cfg, selected, echo: None)  # no cluster here
    train, evals = write_echo_tasks(tmp_path / "user", n_train=4, n_eval=2)
    (tmp_path / "init").mkdir()
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.format(runs=tmp_path / "runs", init=tmp_path / "init",
                                                             train=train / "part-00000.parquet",
                                                             eval=evals / "part-00000.parquet"))
    tasks, sft = run_pipeline(load_config(recipe), "t", echo=lambda _: None)

    root = tmp_path / "runs" / "t"
    lineage = json.loads((root / "sft" / "model" / "lineage.json").read_text())
    assert [(s["name"], s["fingerprint"]) for s in lineage["stages"]] == [("tasks", tasks.fingerprint),
                                                                         ("sft", sft.fingerprint)]
    assert lineage["stages"][1]["input_files"] == files(("tasks/eval/part-00000.parquet", b"te"),
                                                        ("tasks/train/part-00000.parquet", b"tt"))
    assert set(lineage["stages"][1]["config_files"]) == {"sft.init_model"}
    assert set(lineage["stages"][0]["config_files"]) == {"tasks.data[0]", "tasks.data[1]"}
    manifest = json.loads((root / "sft" / "manifest.json").read_text())
    assert manifest["lineage"] == {"code_version": "test", "upstream": {"tasks": tasks.fingerprint}, "warnings": []}
    assert {o["path"]: o["sha256"] for o in manifest["outputs"]}["model/lineage.json"] == \
        sha256_file(root / "sft" / "model" / "lineage.json")
    assert not (root / "tasks" / "model").exists()


# --- r1pipe lineage -------------------------------------------------------------------------------

def test_cli_on_a_stage_folder_and_as_json(store, wide):
    res = cli.invoke(app, ["lineage", str(store.stage("pretrain").root)])
    assert res.exit_code == 0, res.output
    assert "lineage of pretrain" in res.output and store.fps["dedup"][:12] in res.output
    assert f"dedup/data/part-00001.parquet {sha(b'd1')[:12]}" in res.output
    assert "domains" not in res.output and "sft" not in res.output
    res = cli.invoke(app, ["lineage", str(store.stage("pretrain").root), "--json"])
    assert json.loads(res.stdout) == build_lineage(store, "pretrain")


def test_cli_on_a_checkpoint_reads_the_stage_models_lineage_with_its_finish_time(store):
    stage = store.stage("pretrain")
    recorded = dict(build_lineage(store, "pretrain"), recipe="as recorded")
    recorded["stages"][-1]["finished"] = None
    write_json_atomic(stage.root / "model" / "lineage.json", recorded)
    checkpoint = stage.root / "checkpoints" / "step_00000004" / "ds"
    checkpoint.mkdir(parents=True)
    res = cli.invoke(app, ["lineage", str(checkpoint), "--json"])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.stdout)
    assert shown["recipe"] == "as recorded" and shown["stages"][-1]["finished"] == stage.manifest()["finished"]


def test_cli_on_an_export_like_folder(store, tmp_path, wide):
    export = tmp_path / "hf"
    export.mkdir()
    write_json_atomic(export / "lineage.json", build_lineage(store, "sft"))
    res = cli.invoke(app, ["lineage", str(export)])
    assert res.exit_code == 0, res.output
    assert "lineage of sft" in res.output and store.fps["pretrain"][:12] in res.output
    assert f"pretrain/model/model.safetensors {sha(b'w0')[:12]}" in res.output


@pytest.mark.parametrize("where", ["empty", "missing"])
def test_cli_on_a_path_without_lineage_names_it(tmp_path, where):
    path = tmp_path / "nothing-here"
    if where == "empty":
        path.mkdir()
    res = cli.invoke(app, ["lineage", str(path)])
    assert res.exit_code == 2
    assert "error:" in res.output and "nothing-here" in res.output


def test_export_copies_the_lineage(store, tmp_path, monkeypatch):
    from pipelines import export
    monkeypatch.setattr(export, "export_folder", lambda model_dir, out, tok: Path(out).mkdir(exist_ok=True))
    out = export.export_stage(store.stage("pretrain").root, tmp_path / "hf")
    assert json.loads((out / "lineage.json").read_text()) == build_lineage(store, "pretrain")
