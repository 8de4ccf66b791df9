"""The pairs stage through the runner: offline pairs from the tasks stage's splits (held-out pairs
only from held-out tasks), user pairs with malformed rows counted with their reason, file and line,
and user training pairs that pose a held-out problem dropped."""
import json

import pyarrow.parquet as pq
import pytest

from pipelines.config import load_config
from pipelines.runner import StageFailed, run_pipeline
from tests.conftest import reasoner_recipe, write_recipe

GEN = dict(families=["arithmetic", "linear_equation", "list_sort"], train_per_cell=20, eval_per_cell=4,
           train_difficulties=["basic"], eval_difficulties=["basic"])
RECIPE = """
name: p
runs_dir: {runs}
stages: [tasks, pairs]
wandb: {{mode: disabled}}
ray: {{num_cpus: 2}}
tasks: {{generator: {gen}}}
pairs:
  max_reject_fraction: 0.9
  offline: {{per_task: 1, max_eval: 10}}
  files:
    - {{path: {user}}}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pairs")
    (tmp / "user.jsonl").write_text("")  # written below, once the held-out tasks exist
    recipe = write_recipe(tmp / "r.yaml", RECIPE.format(runs=tmp / "runs", gen=json.dumps(GEN), user=tmp / "user.jsonl"))
    run_pipeline(load_config(recipe), "p", stages=["tasks"])
    held = pq.read_table(tmp / "runs" / "p" / "tasks" / "eval").to_pylist()
    user = [{"id": "u1", "prompt": "Is 7 prime?", "chosen": "<think>no divisor</think><answer>yes</answer>",
             "rejected": "<answer>no</answer>"},
            {"id": "u2", "prompt": held[0]["prompt"], "chosen": "a", "rejected": "b"},   # a held-out problem
            {"id": "u3", "prompt": "p", "chosen": "same", "rejected": "same"},
            {"id": "u1", "prompt": "another u1", "chosen": "a", "rejected": "b"}]
    (tmp / "user.jsonl").write_text("".join(json.dumps(r) + "\n" for r in user) + "{not json\n")
    [result] = run_pipeline(load_config(recipe), "p", stages=["pairs"])
    return tmp / "runs" / "p", result, recipe


def test_offline_pairs_come_from_their_own_split_and_user_rows_are_accounted_for(run):
    root, result, _ = run
    assert result.action == "ran" and result.metrics["kept"] == result.metrics["train"] + result.metrics["eval"]
    train = pq.read_table(root / "pairs" / "train").to_pylist()
    held = pq.read_table(root / "pairs" / "eval").to_pylist()
    rejected = pq.read_table(root / "pairs" / "rejected").to_pylist()
    task_ids = {split: {r["id"] for r in pq.read_table(root / "tasks" / split).to_pylist()} for split in ("train", "eval")}
    assert {r["task_id"] for r in train if r["source"] == "offline"} == task_ids["train"]  # one pair per train task
    assert len(held) == 10 and {r["task_id"] for r in held} <= task_ids["eval"]
    assert "u1" in {r["id"] for r in train}
    assert {(r["id"], r["reason"], r["line"]) for r in rejected} == {
        ("u2", "overlaps_eval", 2), ("u3", "identical_responses", 3), ("u1", "duplicate_id", 4), (None, "bad_json", 5)}
    m = json.loads((root / "pairs" / "manifest.json").read_text())["metrics"]
    assert m["rows_in"] == m["kept"] + m["rejected"] == len(task_ids["train"]) + 10 + 5  # pairs made + user rows
    assert m["train"] == len(train) and m["eval"] == 10 and m["rejected_by_reason"]["overlaps_eval"] == 1


def test_user_rows_over_the_error_budget_fail_the_stage_by_key(run):
    root, _, recipe = run
    cfg = load_config(recipe, ["pairs.max_reject_fraction=0.5"])
    with pytest.raises(StageFailed, match=r"pairs: 3 of 5 rows .* pairs.max_reject_fraction=0.5; worst: .*user.jsonl"):
        run_pipeline(cfg, "p", stages=["pairs"])
    assert json.loads((root / "pairs" / "manifest.json").read_text())["status"] == "failed"


ON_POLICY = """
name: op
runs_dir: {runs}
stages: [tasks, pairs]
wandb: {{mode: disabled}}
ray: {{num_cpus: 2}}
{tasks}
pairs:
  offline: {{enabled: false}}
  on_policy: {{enabled: true, model: {init}, k: 4, max_prompts: 24, temperature: 1.5, max_new_tokens: 24}}
"""


def test_on_policy_pairs_are_sampled_from_the_model_and_scored(reasoner, tmp_path):
    from data_engine.generators.tasks import check_answer, format_ok
    recipe = reasoner_recipe(tmp_path / "r.yaml", ON_POLICY, reasoner, tmp_path / "runs")
    [_, result] = run_pipeline(load_config(recipe), "op", stages=["tasks", "pairs"])
    m = result.metrics
    assert m["on_policy_prompts"] == 24 == m["on_policy_pairs"] + m["on_policy_ties"] and m["on_policy_pairs"] > 0
    train = pq.read_table(tmp_path / "runs" / "op" / "pairs" / "train").to_pylist()
    answers = {t["id"]: t["answer"] for t in pq.read_table(reasoner.train_dir).to_pylist()}
    assert len(train) == m["on_policy_pairs"] and {p["kind"] for p in train} == {"on_policy"}
    for p in train:  # the chosen sample scores higher under the verifiable reward
        score = lambda text: 2 * check_answer(answers[p["task_id"]], text) + format_ok(text)  # noqa: E731
        assert score(p["chosen"]) > score(p["rejected"])
