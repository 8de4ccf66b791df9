"""Progressive RL through the runner on real Ray: two PRL stages from the session reasoner, each on
a 2-worker gang. The pipeline process is killed while prl_2 is mid-stage; rerunning the whole
recipe skips tasks and prl_1 and resumes prl_2 from its checkpoint (mid-schedule, mid-stage).
`r1pipe status` lists both stages with their held-out evaluation; editing stage 2's reward
weights changes prl_2's fingerprint only."""
import json
import os
import subprocess

from pipelines.config import load_config
from pipelines.runner import run_pipeline
from tests.conftest import REPO, VENV_BIN, kill_pipeline_when, reasoner_recipe

RECIPE = """
name: t
runs_dir: {runs}
stages: [tasks, prl]
wandb: {{mode: offline}}
ray: {{num_cpus: 2}}
{tasks}
prl:
  init_model: {init}
  iterations: 4
  minibatch: 16
  micro_batch: 8
  checkpoint_every: 2
  rollout: {{prompts: 8, group_size: 4, max_new_tokens: 24, temperature: 2.0}}
  engine: {{zero_stage: 1, optimizer: {{lr: 0.001, warmup_steps: 0}}}}
  gang: {{num_workers: 2}}
  eval: {{max_new_tokens: 24, batch_size: 16, pass_at_k: {{tasks: 0}}}}
  stages:
    - {{rewards: {{accuracy: 1.0}}}}
    - {{rewards: {{accuracy: 1.0, conciseness: {weight}}}, reward_terms: {{length_budget: 16}}}}
"""


def status_lines(tmp_path) -> list[str]:
    out = subprocess.run([str(VENV_BIN / "r1pipe"), "status", "t", "--runs-dir", str(tmp_path / "runs")],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ, COLUMNS="200"))
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_prl_stages_resume_mid_schedule_and_rerun_only_what_changed(reasoner, tmp_path):
    recipe = reasoner_recipe(tmp_path / "r.yaml", RECIPE, reasoner, tmp_path / "runs", weight=0.5)
    cfg = load_config(recipe)
    assert cfg.stages == ["tasks", "prl_1", "prl_2"]
    [_, one] = run_pipeline(cfg, "t", stages=["tasks", "prl_1"])
    assert one.action == "ran" and one.metrics["iterations"] == 4 and one.metrics["steps"] == 8
    assert one.metrics["entropy_coef"] == 0.01 and one.metrics["eval/n"] == 40

    stage = tmp_path / "runs" / "t" / "prl_2"
    kill_pipeline_when(stage / ".work" / "fault-prl_2_worker0_step5", recipe, "t", "prl_2", "prl_2:worker0:step5=hang")
    assert json.loads((stage / "manifest.json").read_text())["status"] == "running"
    assert [c.name for c in (stage / "checkpoints").glob("step_*")] == ["step_00000004"]

    results = run_pipeline(cfg, "t")
    assert [r.action for r in results] == ["skipped", "skipped", "ran"]
    m = results[-1].metrics
    assert m["resumed_from_step"] == 4 and m["iterations"] == 4 and m["entropy_coef"] == 0.02
    assert "reward/conciseness/mean" in m and m["eval/n"] == 40
    log = [json.loads(line) for line in (stage / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))
    assert [r["iteration"] for r in log if "reward/mean" in r] == [1, 2, 3, 4]
    # prl_2 started from prl_1's model: its first rollout's KL to its own start is 0
    assert log[0]["rollout/kl"] == 0.0

    lines = status_lines(tmp_path)
    header = next(i for i, line in enumerate(lines) if "held-out evaluation" in line)
    for name, metrics in (("prl_1", one.metrics), ("prl_2", m)):
        row = next(line for line in lines[header:] if line.strip("│ ").startswith(name))
        assert f"{metrics['eval/accuracy']:.4g}" in row

    # the report shows the RL stages with no change of its own: reward terms, KL, entropy, length
    from pipelines import report_data as rd
    run = rd.load_run(tmp_path / "runs", "t")
    prl_2 = rd.curves(next(s for s in run.stages if s.name == "prl_2").log)
    assert {"reward/mean", "reward/accuracy/mean", "reward/conciseness/mean"} <= set(prl_2["reward terms"])
    assert {"kl", "entropy"} <= set(prl_2["KL and entropy"]) and "response_length/mean" in prl_2["response length"]
    assert rd.evaluation(run)["stages"] == ["prl_1", "prl_2"]
    assert [e["action"] for e in run.events if e["stage"] == "prl_2"] == ["run", "resume", "done"]

    # an edit of stage 2's reward weights changes prl_2's fingerprint only, so it alone reruns (the
    # runner reruns a stage whose fingerprint changed: tests/pipelines/test_data_stages.py)
    from pipelines.runner import fingerprint_config
    edited = load_config(reasoner_recipe(tmp_path / "r2.yaml", RECIPE, reasoner, tmp_path / "runs", weight=0.25))
    assert fingerprint_config(edited, "prl_1") == fingerprint_config(cfg, "prl_1")
    assert fingerprint_config(edited, "prl_2") != fingerprint_config(cfg, "prl_2")
