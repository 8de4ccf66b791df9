"""The tokenizer and pretrain stages through the runner, on real Ray.

The curated corpus is written by the test into the `difficulty` stage's folder with a
done manifest, as the data stages would leave it, so only tokenizer and pretrain run.
(b) The whole pipeline (the `r1pipe run` process and its embedded Ray cluster) is killed
mid-stage; rerunning resumes from the stage's checkpoint, not from step 0, and the
validation loss goes down. The stage folder ends with model, tokenizer and training log.
"""
import json

from pipelines.config import load_config
from pipelines.runner import run_pipeline
from pipelines.store import write_json_atomic
from tests.conftest import kill_pipeline_when, write_recipe
from tests.pretrain_corpus import write_corpus

RECIPE = """
name: t
runs_dir: {runs}
stages: [ingest, dedup, quality, domains, difficulty, tokenizer, pretrain]
wandb: {{mode: disabled}}
ray: {{num_cpus: 2}}
ingest: {{inputs: [{{path: unused.jsonl}}]}}
dedup: {{}}
quality: {{}}
domains: {{}}
difficulty: {{}}
tokenizer: {{vocab_size: 320}}
pretrain:
  steps: 16
  eval_every: 4
  checkpoint: {{every: 4, keep: 2}}
  model: {{preset: tiny, overrides: {{d_model: 32, n_layers: 2, n_heads: 2, n_kv_heads: 1, dense_hidden: 64,
                                      expert_hidden: 32, max_seq_len: 32}}}}
  engine: {{zero_stage: 2, optimizer: {{lr: 0.01, warmup_steps: 2}}}}
  data: {{seq_len: 16, micro_batch: 2, global_batch: 8, val_fraction: 0.1}}
  gang: {{num_workers: 2}}
"""


def curated_corpus(run_dir):
    """The difficulty stage's outputs and done manifest, as the data stages leave them."""
    write_corpus(run_dir / "difficulty", n_docs=160)
    write_json_atomic(run_dir / "difficulty" / "manifest.json",
                      {"stage": "difficulty", "status": "done", "fingerprint": "curated-by-test", "metrics": {}})


def test_pipeline_killed_mid_stage_resumes_from_checkpoint(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.format(runs=tmp_path / "runs"))
    cfg = load_config(recipe)
    curated_corpus(tmp_path / "runs" / "r")
    [tok] = run_pipeline(cfg, "r", stages=["tokenizer"])
    assert tok.metrics["vocab_size"] == 320 and tok.metrics["docs"] == 160
    stage = tmp_path / "runs" / "r" / "pretrain"

    # the whole pipeline dies while its gang is at step 6 (rank 0 hangs there until killed)
    kill_pipeline_when(stage / ".work" / "tokens" / "fault-pretrain_worker0_step6", recipe, "r", "pretrain",
                       "pretrain:worker0:step6=hang")
    assert json.loads((stage / "manifest.json").read_text())["status"] == "running"
    assert [c.name for c in (stage / "checkpoints").glob("step_*")] == ["step_00000004"]

    [res] = run_pipeline(cfg, "r", stages=["pretrain"])
    assert res.action == "ran" and res.metrics["resumed_from_step"] == 4 and res.metrics["steps"] == 16
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["resumed"] is True
    log = [json.loads(line) for line in (stage / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 17))  # 1-6 from the killed run, 5-16 from the rerun
    val = [r["val/loss"] for r in log if "val/loss" in r]
    assert len(val) == 4 and val[-1] < val[0]
    assert {"val/domain/code", "val/difficulty/basic", "tokens_per_s", "mfu"} <= set(res.metrics)
    outputs = {o["path"] for o in manifest["outputs"]}
    assert {"model/model.safetensors", "model/config.json", "model/tokenizer.json", "train_log.jsonl"} <= outputs

    from training.export import load_model
    assert load_model(stage / "model").cfg.vocab_size == 320  # already a multiple of 64
