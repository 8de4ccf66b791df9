"""The tasks stage through the runner, on real Ray: generated and user tasks, a held-out split that
shares no problem with the train split, malformed user rows counted with their reason, file and
line, and the corpus documents that hold a held-out prompt listed for pretraining to leave out."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_engine.dedup_minhash import normalize_text
from data_engine.task_data import DecontaminationConfig, GeneratorConfig, Overlaps, generated_split
from pipelines.config import load_config
from pipelines.runner import run_pipeline
from pipelines.store import write_json_atomic
from tests.conftest import write_recipe

GEN = dict(families=["arithmetic", "gcd_lcm", "modular", "list_sort"], train_per_cell=60, eval_per_cell=6,
           train_difficulties=["basic", "advanced"], eval_difficulties=["basic", "advanced"])
RECIPE = """
name: t
runs_dir: {runs}
stages: [ingest, dedup, quality, domains, difficulty, tasks]
wandb: {{mode: disabled}}
ray: {{num_cpus: 2}}
ingest: {{inputs: [{{path: unused.jsonl}}]}}
dedup: {{}}
quality: {{}}
domains: {{}}
difficulty: {{}}
tasks:
  max_reject_fraction: 0.9
  generator: {gen}
  files:
    - {{path: {user}}}
    - {{path: {held}, split: eval, family: capitals, fields: {{answer: capital, prompt: question}}}}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tasks")
    held_out = generated_split(GeneratorConfig(**GEN), "eval", seed=0)
    # the curated corpus, as the data stages leave it: two documents quote a held-out prompt
    docs = [{"id": "d-clean", "text": "A page about sorting algorithms and their costs."},
            {"id": "d-quote", "text": "Practice set.\n\n" + held_out[3]["prompt"] + "\n\n<think>...</think>"},
            {"id": "d-quote2", "text": held_out[-1]["prompt"].upper()}]
    (tmp / "runs" / "t" / "difficulty" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(docs), tmp / "runs" / "t" / "difficulty" / "data" / "part-00000.parquet")
    write_json_atomic(tmp / "runs" / "t" / "difficulty" / "manifest.json",
                      {"stage": "difficulty", "status": "done", "fingerprint": "by-test", "metrics": {"kept": 3}})
    user = [{"id": "u1", "prompt": "What is 2 + 2?", "response": "<think>2 + 2 = 4</think><answer>4</answer>"},
            {"id": "u2", "prompt": held_out[0]["prompt"], "response": "a copy of a held-out problem"},
            {"id": "u3", "prompt": ""}, {"id": "u1", "prompt": "another row with id u1", "answer": "9"}]
    (tmp / "user.jsonl").write_text("".join(json.dumps(r) + "\n" for r in user) + "{not json\n")
    (tmp / "held.jsonl").write_text(json.dumps({"id": "c1", "question": "Capital of France?", "capital": "Paris"})
                                    + "\n" + json.dumps({"id": "c2", "question": "Capital of Peru?"}) + "\n")
    recipe = write_recipe(tmp / "r.yaml", RECIPE.format(runs=tmp / "runs", gen=json.dumps(GEN), user=tmp / "user.jsonl",
                                                        held=tmp / "held.jsonl"))
    [result] = run_pipeline(load_config(recipe), "t", stages=["tasks"])
    return tmp / "runs" / "t" / "tasks", result, held_out


def test_splits_have_their_counts_and_share_no_problem(run):
    folder, result, held_out = run
    train = pq.read_table(folder / "train").to_pylist()
    evals = pq.read_table(folder / "eval").to_pylist()
    assert [r["id"] for r in evals] == [r["id"] for r in held_out] + ["c1"]  # the generated eval split is kept whole
    assert result.metrics["train"] == len(train) == 4 * 2 * 60 + 1 and result.metrics["eval"] == len(evals)
    decon = DecontaminationConfig()
    assert Overlaps(evals, decon).find(train) == {}  # no exact, same-numbers or near duplicate left
    normal = {normalize_text(r["prompt"], decon.dedup()) for r in evals}
    assert not normal & {normalize_text(r["prompt"], decon.dedup()) for r in train}
    assert {r["family"] for r in train} == set(GEN["families"]) | {"user"}


def test_rows_in_equal_kept_plus_rejected_with_reasons(run):
    folder, result, _ = run
    m = result.metrics
    rejected = pq.read_table(folder / "rejected").to_pylist()
    assert m["rows_in"] == m["kept"] + m["rejected"] == m["kept"] + len(rejected)
    by_reason = {}
    for r in rejected:
        by_reason.setdefault(r["reason"], []).append(r)
    user = [(r["reason"], r["line"]) for r in rejected if r["file"] and r["file"].endswith("user.jsonl")]
    assert sorted(user) == [("bad_json", 5), ("duplicate_id", 4), ("empty_prompt", 3), ("overlaps_eval", 2)]
    assert [(r["reason"], r["line"]) for r in rejected if r["file"] and r["file"].endswith("held.jsonl")] == [
        ("no_answer", 2)]
    [dup] = by_reason["duplicate_id"]
    assert json.loads(dup["detail"])["first"].endswith("user.jsonl:1")  # names the row that holds the id
    generated_overlaps = [r for r in by_reason["overlaps_eval"] if r["file"] is None]
    assert m["overlaps_by_kind"]["exact"] >= 1 and len(generated_overlaps) == m["rejected_by_reason"]["overlaps_eval"] - 1


def test_the_error_budget_names_the_worst_user_file(run):
    folder = run[0]
    recipe = folder.parent.parent.parent / "r.yaml"
    cfg = load_config(recipe, ["tasks.max_reject_fraction=0.2", "stages=[tasks]"])
    with pytest.raises(Exception, match=r"4 of 7 rows of the user files rejected.*user.jsonl \(3 rows\)"):
        run_pipeline(cfg, "t-budget", stages=["tasks"])


def test_corpus_documents_with_a_held_out_prompt_are_excluded(run):
    folder, result, held_out = run
    assert json.loads((folder / "corpus_excluded.json").read_text()) == ["d-quote", "d-quote2"]
    hits = pq.read_table(folder / "contamination.parquet").to_pylist()
    assert {(h["doc_id"], h["task_id"]) for h in hits} == {("d-quote", held_out[3]["id"]),
                                                           ("d-quote2", held_out[-1]["id"])}
    assert result.metrics["corpus_docs_excluded"] == 2


def test_pretrain_depends_on_the_eval_split_only_and_user_files_by_content(run):
    from pipelines.runner import input_fingerprint, stage_config
    from pipelines.store import RunStore
    folder, result, _ = run
    store = RunStore(folder.parent.parent, "t")
    # pretrain reads the eval split and the exclusions: new SFT data leaves its fingerprint alone
    assert input_fingerprint(store, "pretrain", "tasks", {"tasks": "tasks-fp"}) == f"eval_digest:{result.metrics['eval_digest']}"
    assert input_fingerprint(store, "sft", "tasks", {"tasks": "tasks-fp"}) == "tasks-fp"
    recipe = folder.parent.parent.parent / "r.yaml"
    before = stage_config(load_config(recipe), "tasks")
    user = folder.parent.parent.parent / "user.jsonl"
    original = user.read_text()
    try:
        user.write_text(original.replace("What is 2 + 2?", "What is 2 + 3?"))
        assert stage_config(load_config(recipe), "tasks") != before  # an edited SFT file reruns tasks
    finally:
        user.write_text(original)
    assert stage_config(load_config(recipe), "tasks") == before


def test_an_empty_eval_split_skips_the_evaluation(tmp_path):
    from types import SimpleNamespace

    from data_engine.task_data import TASK_SCHEMA
    from pipelines.stages.train_common import evaluate_stage
    from rl.config import EvalConfig
    (tmp_path / "tasks" / "eval").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([], schema=TASK_SCHEMA), tmp_path / "tasks" / "eval" / "part-00000.parquet")
    said = []
    ctx = SimpleNamespace(inputs={"tasks": tmp_path / "tasks"}, log=said.append)
    assert evaluate_stage(ctx, tmp_path / "model", EvalConfig()) == {}
    assert "eval split is empty" in said[0]
