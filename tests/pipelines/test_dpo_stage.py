"""The tasks, pairs, dpo and reward_model stages through the runner, on real Ray: the pipeline
process is killed while DPO's gang is mid-run; rerunning resumes from the stage's checkpoint, trains
to the end, reports the held-out preference figures, evaluates on the held-out tasks, and `r1pipe
status` shows a dpo row in the evaluation table. The reward model trains on a 2-worker gang from
the same model and writes a reward model folder that `r1pipe eval` refuses by name."""
import json
import os
import subprocess

import pyarrow.parquet as pq

from pipelines.config import load_config
from pipelines.runner import run_pipeline
from tests.conftest import REPO, VENV_BIN, kill_pipeline_when, reasoner_recipe
from tests.rl.conftest import pair_row

RECIPE = """
name: t
runs_dir: {runs}
stages: [tasks, pairs, dpo, reward_model]
wandb: {{mode: offline}}
ray: {{num_cpus: 2}}
{tasks}
pairs:
  offline: {{enabled: false}}
  files:
    - {{path: {pairs_train}}}
    - {{path: {pairs_eval}, split: eval}}
dpo:
  init_model: {init}
  steps: 12
  eval_every: 4
  checkpoint: {{every: 4, keep: 2}}
  engine: {{zero_stage: 1, optimizer: {{lr: 0.0003, warmup_steps: 1}}}}
  data: {{seq_len: 64, micro_batch: 4, global_batch: 8, val_max_pairs: 16}}
  gang: {{num_workers: 2}}
  eval: {{max_new_tokens: 24, batch_size: 16, pass_at_k: {{tasks: 0}}}}
reward_model:
  init_model: {init}
  steps: 40
  eval_every: 20
  checkpoint: {{every: 20, keep: 1}}
  engine: {{zero_stage: 1, optimizer: {{lr: 0.001, warmup_steps: 5}}}}
  data: {{seq_len: 64, micro_batch: 4, global_batch: 8, val_max_pairs: 40}}
  gang: {{num_workers: 2}}
"""


def pair_recipe(reasoner, tmp_path):
    """The recipe, and the pair rows it reads from user files (train, eval)."""
    rows = {split: [pair_row(t, i) for i, t in enumerate(pq.read_table(folder).to_pylist())][:200]
            for split, folder in (("train", reasoner.train_dir), ("eval", reasoner.eval_dir))}
    for split, split_rows in rows.items():
        (tmp_path / f"pairs_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))
    recipe = reasoner_recipe(tmp_path / "r.yaml", RECIPE, reasoner, tmp_path / "runs",
                             pairs_train=tmp_path / "pairs_train.jsonl", pairs_eval=tmp_path / "pairs_eval.jsonl")
    return recipe, rows


def test_dpo_killed_mid_stage_resumes_then_evaluates(reasoner, tmp_path):
    recipe, _ = pair_recipe(reasoner, tmp_path)
    cfg = load_config(recipe)
    [_, pairs] = run_pipeline(cfg, "t", stages=["tasks", "pairs"])
    assert pairs.metrics["train"] == 200 and pairs.metrics["eval"] == 40 and pairs.metrics["rejected"] == 0
    stage = tmp_path / "runs" / "t" / "dpo"

    kill_pipeline_when(stage / ".work" / "reference" / "fault-dpo_worker0_step6", recipe, "t", "dpo",
                       "dpo:worker0:step6=hang")
    assert json.loads((stage / "manifest.json").read_text())["status"] == "running"
    assert [c.name for c in (stage / "checkpoints").glob("step_*")] == ["step_00000004"]

    [res] = run_pipeline(cfg, "t", stages=["dpo"])
    m = res.metrics
    assert res.action == "ran" and m["resumed_from_step"] == 4 and m["steps"] == 12 and m["pairs"] == 200
    log = [json.loads(line) for line in (stage / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert abs(log[0]["dpo_loss"] - 0.6931472) < 1e-5 and log[-1]["val/loss"] < log[3]["val/loss"]
    assert m["val/rewards/accuracies"] >= 0.8 and m["eval/n"] == 40
    assert m["eval/accuracy"] > 0.5  # a gentle DPO keeps what SFT taught (the reasoner answers ~0.97)
    assert set(m["tables"]) == {"held-out pairs by kind", "eval by family and difficulty"}
    assert m["tables"]["held-out pairs by kind"]["rows"] == [
        ["user", round(m["val/rewards/accuracies/user"], 4)], ["all", round(m["val/rewards/accuracies"], 4)]]
    outputs = {o["path"] for o in json.loads((stage / "manifest.json").read_text())["outputs"]}
    assert {"model/model.safetensors", "model/tokenizer.json", "train_log.jsonl", "eval_completions.jsonl"} <= outputs

    status = subprocess.run([str(VENV_BIN / "r1pipe"), "status", "t", "--runs-dir", str(tmp_path / "runs")],
                            cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ, COLUMNS="200"))
    assert status.returncode == 0
    lines = status.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if "held-out evaluation" in line)
    row = next(line for line in lines[header:] if line.strip("│ ").startswith("dpo"))
    assert f"{m['eval/accuracy']:.4g}" in row


def test_reward_model_stage_trains_on_a_gang_and_writes_a_scorer_folder(reasoner, tmp_path):
    recipe, rows = pair_recipe(reasoner, tmp_path)
    [_, _, rm] = run_pipeline(load_config(recipe), "t", stages=["tasks", "pairs", "reward_model"])
    m = rm.metrics
    assert rm.action == "ran" and m["steps"] == 40 and m["pairs"] == 200 and m["val_pairs"] == 40
    log = [json.loads(line) for line in (tmp_path / "runs" / "t" / "reward_model" / "train_log.jsonl").read_text().splitlines()]
    assert abs(log[0]["rm_loss"] - 0.6931472) < 1e-6 and [r["step"] for r in log] == list(range(1, 41))
    assert {"val/accuracy", "val/margin", "val/loss"} <= set(m)
    assert m["tables"]["held-out pairs by kind"]["rows"][-1] == ["all", round(m["val/accuracy"], 4)]
    status = subprocess.run([str(VENV_BIN / "r1pipe"), "status", "t", "--runs-dir", str(tmp_path / "runs")],
                            cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ, COLUMNS="200"))
    assert status.returncode == 0
    [row] = [line for line in status.stdout.splitlines() if line.strip("│ ").startswith("all ")]  # the table by kind
    assert f"{round(m['val/accuracy'], 4):.4g}" in row
    folder = tmp_path / "runs" / "t" / "reward_model" / "model"
    from rl.reward_model import RewardScorer
    scores = RewardScorer.from_folder(folder).score([rows["eval"][0]["prompt"]] * 2,
                                                    [rows["eval"][0]["chosen"], rows["eval"][0]["rejected"]])
    assert len(scores) == 2 and scores[0] != scores[1]
    refused = subprocess.run([str(VENV_BIN / "r1pipe"), "eval", str(folder.parent)], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "holds a reward model" in refused.stdout + refused.stderr
