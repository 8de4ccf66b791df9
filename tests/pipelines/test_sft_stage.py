"""The tasks and sft stages through the runner, on real Ray: the whole pipeline process is killed
while SFT's gang is mid-run; rerunning resumes from the stage's checkpoint, trains to the end,
evaluates on the held-out split, and `r1pipe status` shows the evaluation table."""
import json
import os
import subprocess

from pipelines.config import load_config
from pipelines.runner import run_pipeline
from tests.conftest import REPO, VENV_BIN, kill_pipeline_when, reasoner_recipe
from tests.wandb_records import logged_values

RECIPE = """
name: t
runs_dir: {runs}
stages: [tasks, sft]
wandb: {{mode: offline}}
ray: {{num_cpus: 2}}
{tasks}
sft:
  init_model: {init}
  steps: 12
  eval_every: 4
  checkpoint: {{every: 4, keep: 2}}
  engine: {{zero_stage: 1, optimizer: {{lr: 0.001, warmup_steps: 2}}}}
  data: {{seq_len: 64, micro_batch: 4, global_batch: 16, val_max_examples: 8}}
  gang: {{num_workers: 2}}
  eval: {{max_new_tokens: 24, batch_size: 16, pass_at_k: {{k: 2, tasks: 4}}}}
"""


def test_sft_killed_mid_stage_resumes_then_evaluates(reasoner, tmp_path):
    recipe = reasoner_recipe(tmp_path / "r.yaml", RECIPE, reasoner, tmp_path / "runs")  # goes on from the trained model
    cfg = load_config(recipe)
    [tasks] = run_pipeline(cfg, "t", stages=["tasks"])
    assert tasks.metrics["train"] == 600 and tasks.metrics["eval"] == 40 and tasks.metrics["rejected"] == 0
    stage = tmp_path / "runs" / "t" / "sft"

    kill_pipeline_when(stage / ".work" / "examples" / "fault-sft_worker0_step6", recipe, "t", "sft",
                       "sft:worker0:step6=hang")
    assert json.loads((stage / "manifest.json").read_text())["status"] == "running"
    assert [c.name for c in (stage / "checkpoints").glob("step_*")] == ["step_00000004"]

    [res] = run_pipeline(cfg, "t", stages=["sft"])
    m = res.metrics
    assert res.action == "ran" and m["resumed_from_step"] == 4 and m["steps"] == 12
    log = [json.loads(line) for line in (stage / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert log[-1]["val/loss"] < log[3]["val/loss"]
    assert m["eval/n"] == 40 and m["eval/accuracy"] > 0.5 and "eval/pass@2" in m
    assert m["tables"]["eval by family and difficulty"]["columns"][:3] == ["family", "difficulty", "n"]
    completions = [json.loads(line) for line in (stage / "eval_completions.jsonl").read_text().splitlines()]
    assert len([c for c in completions if c["samples"] == 1]) == 40
    outputs = {o["path"] for o in json.loads((stage / "manifest.json").read_text())["outputs"]}
    assert {"model/model.safetensors", "model/tokenizer.json", "train_log.jsonl", "eval_completions.jsonl"} <= outputs

    wandb_runs = sorted((tmp_path / "runs" / "t" / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"),
                        key=lambda p: p.stat().st_mtime)
    values = logged_values(wandb_runs[-1])  # the sft run that finished
    assert {"lm_loss", "grad_norm", "tokens_per_s", "val/loss", "eval/accuracy", "eval/format_rate"} <= set(values)
    assert any(k.startswith("eval_by_family") for k in values)
    # the stage's part of the report, as W&B charts, and the W&B run of the stage it read
    charts = {k.split("/")[1] for k in values if k.startswith("report/") and k.endswith("/_type")}
    assert {"curves", "expert_load", "evaluation_0"} <= charts
    assert values["upstream/tasks"].startswith("t/tasks ")

    status = subprocess.run([str(VENV_BIN / "r1pipe"), "status", "t", "--runs-dir", str(tmp_path / "runs")],
                            cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ, COLUMNS="200"))
    assert status.returncode == 0
    lines = status.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if "held-out evaluation" in line)
    row = next(line for line in lines[header:] if line.strip("│ ").startswith("sft"))
    assert f"{m['eval/accuracy']:.4g}" in row and f"{m['eval/format_rate']:.4g}" in row and "pass@2=" in row
