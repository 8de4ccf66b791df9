"""Held-out evaluation: the pass@k estimator on known counts, the figures from records, and the
session's tiny trained model evaluated on Ray: the stage folder and its transformers export give
the same figures, whatever the number of workers, and `r1pipe eval` prints them."""
import json
import math
import subprocess

import pytest

from cluster.eval import evaluate_on_ray
from cluster.session import RaySettings, connect
from rl.config import EvalConfig
from rl.eval import EvalTask, aggregate, load_tasks, pass_at_k, plan_batches, spread
from tests.conftest import REPO, VENV_BIN
from training.export import export_folder

CFG = EvalConfig(max_new_tokens=24, batch_size=8, pass_at_k={"k": 4, "samples": 6, "tasks": 6})


@pytest.mark.parametrize("n, c, k, want", [
    (5, 0, 1, 0.0), (5, 5, 3, 1.0), (10, 3, 1, 0.3), (10, 3, 2, 1 - math.comb(7, 2) / math.comb(10, 2)),
    (8, 1, 8, 1.0), (20, 2, 5, 1 - math.comb(18, 5) / math.comb(20, 5))])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k, want):
    assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="samples=3 must be >= pass_at_k.k=4"):
        EvalConfig(pass_at_k={"k": 4, "samples": 3})


def test_figures_from_records():
    greedy = [{"id": str(i), "family": f, "difficulty": d, "samples": 1, "correct": ok, "format_ok": fmt, "length": n}
              for i, (f, d, ok, fmt, n) in enumerate([("a", "basic", True, True, 10), ("a", "advanced", False, True, 30),
                                                      ("b", "basic", False, False, 50), ("b", "basic", True, True, 10)])]
    sampled = [{"id": "0", "family": "a", "difficulty": "basic", "samples": 6, "n": 6, "c": 2},
               {"id": "2", "family": "b", "difficulty": "basic", "samples": 6, "n": 6, "c": 0}]
    f = aggregate(greedy + sampled, CFG)
    assert f["eval/accuracy"] == 0.5 and f["eval/format_rate"] == 0.75 and f["eval/mean_length"] == 25
    assert f["eval/accuracy/a"] == 0.5 and f["eval/accuracy/b"] == 0.5
    assert f["eval/difficulty/basic/accuracy"] == pytest.approx(2 / 3) and f["eval/difficulty/advanced/accuracy"] == 0
    assert f["eval/pass@4"] == pytest.approx((pass_at_k(6, 2, 4) + 0) / 2) and f["eval/pass@1_sampled"] == pytest.approx(1 / 6)
    assert f["tables"]["eval by family and difficulty"]["rows"][0] == ["a", "advanced", 1, 0.0, 1.0, 30.0]


def test_batches_are_planned_from_the_tasks_alone():
    tasks = [EvalTask(f"t{i}", "ab"[i % 2], "basic", "x" * (i % 7 + 1), "1") for i in range(20)]
    items = plan_batches(tasks, CFG)
    greedy = [t.id for item in items if item["samples"] == 1 for t in item["tasks"]]
    assert sorted(greedy) == sorted(t.id for t in tasks) and [i["index"] for i in items] == list(range(len(items)))
    sampled = [t for item in items if item["samples"] == 6 for t in item["tasks"]]
    assert [t.family for t in sampled] == ["a", "b", "a", "b", "a", "b"]  # spread over families
    assert plan_batches(tasks, CFG) == items
    assert [t.family for t in spread(tasks, 3)] == ["a", "b", "a"]


def test_a_subset_covers_every_family_and_difficulty():
    """The files list each family's basic tasks before its advanced ones: a subset must not be all basic."""
    tasks = [EvalTask(f"{f}{d}{i}", f, d, "p", "1") for f in "ab" for d in ("basic", "advanced") for i in range(5)]
    cells = [(t.family, t.difficulty) for t in spread(tasks, 8)]
    assert sorted(cells) == sorted([(f, d) for f in "ab" for d in ("basic", "advanced")] * 2)
    assert [t.id for t in spread(tasks, 4)] == ["aadvanced0", "abasic0", "badvanced0", "bbasic0"]


def test_bad_task_files_name_the_row(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"id": "a", "prompt": "p", "answer": "1"}) + "\n"
                                      + json.dumps({"id": "b", "prompt": "p"}) + "\n")
    with pytest.raises(ValueError, match=r"t.jsonl:2: field 'answer' missing"):
        load_tasks(tmp_path / "t.jsonl")
    with pytest.raises(ValueError, match="no such file"):
        load_tasks(tmp_path / "missing")


@pytest.fixture(scope="module")
def ray_cluster():
    connect(RaySettings(num_cpus=2))


def test_the_stage_folder_and_its_export_give_the_same_figures_on_any_number_of_workers(reasoner, ray_cluster,
                                                                                        tmp_path):
    tasks = load_tasks(reasoner.eval_dir)
    folder, records = evaluate_on_ray(reasoner.model, tasks, CFG.model_copy(update={"workers": 2}), seed=0)
    assert folder["eval/accuracy"] > 0.5  # the session's model learned its family
    assert folder["eval/format_rate"] > 0.9 and folder["eval/n"] == len(tasks) and "eval/pass@4" in folder
    assert [r["id"] for r in records if r["samples"] == 1] == [t.id for t in tasks]
    export_folder(reasoner.model, tmp_path / "hf")
    exported, exported_records = evaluate_on_ray(tmp_path / "hf", tasks, CFG.model_copy(update={"workers": 1}), seed=0)
    assert exported == folder
    assert [r.get("completion") for r in exported_records] == [r.get("completion") for r in records]


def test_r1pipe_eval_prints_the_figures(reasoner, tmp_path):
    proc = subprocess.run([str(VENV_BIN / "r1pipe"), "eval", str(reasoner.model), "--tasks", str(reasoner.eval_dir),
                           "--max-new-tokens", "24", "--pass-k", "4", "--pass-k-tasks", "0", "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["eval/n"] == 40 and report["tasks"] == str(reasoner.eval_dir)
    assert 0 < report["eval/accuracy"] <= 1 and "eval/pass@4" not in report
    human = subprocess.run([str(VENV_BIN / "r1pipe"), "eval", str(tmp_path / "nothing-here")], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert human.returncode == 2 and "nothing-here: no model.safetensors" in " ".join(human.stderr.split())


def test_a_prompt_too_long_to_answer_is_a_failure_not_a_crash(reasoner):
    from rl.eval import evaluate
    from training.export import load_model
    from training.tokenizer import load_tokenizer
    tasks = load_tasks(reasoner.eval_dir)[:3] + [EvalTask("long", "echo", "basic", "Repeat the number 5. " * 60, "5")]
    figures, records = evaluate(load_model(reasoner.model), load_tokenizer(reasoner.model), tasks,
                                EvalConfig(max_new_tokens=24, pass_at_k={"tasks": 0}), seed=0)
    assert figures["eval/n"] == 4 and figures["eval/prompts_too_long"] == 1
    [long] = [r for r in records if r["id"] == "long"]
    assert long["correct"] is False and long["length"] == 0
