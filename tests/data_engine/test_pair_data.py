"""Preference pairs without Ray: offline pairs from generated tasks, user files in every shape
with malformed rows (kept + rejected = in, each with its reason, file and line)."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_engine.pair_data import (OfflinePairsConfig, PairFieldMap, PairFileSpec, offline_pairs, read_pair_files,
                                   tables)
from data_engine.task_data import GeneratorConfig, generated_split
from data_engine.generators.tasks import REJECT_KINDS, check_answer, format_ok

GEN = GeneratorConfig(train_per_cell=0, eval_per_cell=6, eval_difficulties=["basic", "advanced"])


def test_offline_pairs_prefer_the_worked_solution_to_a_checkably_worse_response():
    tasks = generated_split(GEN, "eval", seed=0)
    pairs = offline_pairs(tasks, OfflinePairsConfig(per_task=2), split="eval", seed=0)
    assert len(pairs) == 2 * len(tasks) and {p["kind"] for p in pairs} == set(REJECT_KINDS)
    answers = {t["id"]: t["answer"] for t in tasks}
    for p in pairs:
        assert p["chosen"] != p["rejected"] and check_answer(answers[p["task_id"]], p["chosen"])
        assert format_ok(p["chosen"])
        # the rejected response is worse in a way a checker sees: a wrong answer or no reasoning
        assert not check_answer(answers[p["task_id"]], p["rejected"]) or not format_ok(p["rejected"])
    assert len({p["id"] for p in pairs}) == len(pairs)
    # a pair depends on its task and the seed, not on which other tasks are present
    alone = offline_pairs(tasks[5:6], OfflinePairsConfig(per_task=2), split="eval", seed=0)
    assert alone == [p for p in pairs if p["task_id"] == tasks[5]["id"]]
    assert offline_pairs(tasks, OfflinePairsConfig(per_task=2), "eval", seed=1) != pairs


def test_offline_pairs_skip_user_tasks_and_respect_kinds_and_limits():
    tasks = generated_split(GEN, "eval", seed=0)
    user = dict(tasks[0], id="u1", source="mine")
    only = offline_pairs(tasks + [user], OfflinePairsConfig(kinds=["missing_think"], max_eval=10), "eval", seed=0)
    assert len(only) == 10 and {p["kind"] for p in only} == {"missing_think"} and "u1" not in {p["task_id"] for p in only}
    with pytest.raises(ValueError, match="kinds: unknown.*'typo'.*known: arithmetic_slip"):
        OfflinePairsConfig(kinds=["typo"])


def write_user_files(tmp_path):
    lines = [
        json.dumps({"id": "s1", "prompt": "2 + 2?", "chosen": "4", "rejected": "5", "family": "add"}),
        json.dumps({"id": "m1", "prompt": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "3 * 3?"}],
                    "chosen": [{"role": "assistant", "content": "9"}], "rejected": [{"role": "assistant", "content": "6"}]}),
        '{"id": "broken", ',
        json.dumps({"id": "nc", "prompt": "p", "rejected": "r"}),
        json.dumps({"id": "same", "prompt": "p", "chosen": "x", "rejected": "x"}),
        json.dumps({"id": "ec", "prompt": "p", "chosen": "  ", "rejected": "r"}),
        json.dumps({"id": "wt", "prompt": "p", "chosen": 3, "rejected": "r"}),
        json.dumps({"id": "np", "chosen": "c", "rejected": "r"}),
        json.dumps({"id": "bd", "prompt": "p", "chosen": "c", "rejected": "r", "difficulty": "hard"}),
        json.dumps({"id": "lu", "prompt": "p", "chosen": [{"role": "user", "content": "c"}], "rejected": "r"}),
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    # HF's implicit-prompt shape: whole conversations that share every turn but the last
    conv = lambda answer: [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": answer}]  # noqa: E731
    rows = [{"chosen": conv("Paris"), "rejected": conv("Lyon")},
            {"chosen": conv("Paris"), "rejected": [{"role": "user", "content": "Other?"},
                                                   {"role": "assistant", "content": "Lyon"}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "implicit.parquet")
    import datasets
    datasets.Dataset.from_dict({"q": ["Name a prime.", "Even prime?"], "good": ["7", "2"], "bad": ["8", None]}).save_to_disk(
        str(tmp_path / "heldout"))
    return [PairFileSpec(path=str(tmp_path / "pairs.jsonl")),
            PairFileSpec(path=str(tmp_path / "implicit.parquet"), fields=PairFieldMap(prompt=None)),
            PairFileSpec(path=str(tmp_path / "heldout"), split="eval", family="primes",
                         fields=PairFieldMap(id=None, prompt="q", chosen="good", rejected="bad"))]


def test_user_files_keep_good_rows_and_reject_the_rest_with_reason_file_and_line(tmp_path):
    kept, rejected = read_pair_files(write_user_files(tmp_path))
    assert len(kept) + len(rejected) == 10 + 2 + 2  # rows in = kept + rejected
    by_id = {r["id"]: r for r in kept}
    assert by_id["s1"]["prompt"] == "2 + 2?" and by_id["s1"]["family"] == "add" and by_id["s1"]["kind"] == "user"
    assert (by_id["m1"]["system"], by_id["m1"]["prompt"], by_id["m1"]["chosen"], by_id["m1"]["rejected"]) == (
        "Be exact.", "3 * 3?", "9", "6")
    implicit = [r for r in kept if r["source"] == "implicit"]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in implicit] == [("Capital of France?", "Paris", "Lyon")]
    held = [r for r in kept if r["split"] == "eval"]
    assert len(held) == 1 and held[0]["family"] == "primes" and held[0]["id"].startswith("u")
    got = {(r["reason"], r["line"], r["file"].rsplit("/", 1)[-1]) for r in rejected}
    assert got == {("bad_json", 3, "pairs.jsonl"), ("missing_chosen", 4, "pairs.jsonl"),
                   ("identical_responses", 5, "pairs.jsonl"), ("empty_chosen", 6, "pairs.jsonl"),
                   ("wrong_type", 7, "pairs.jsonl"), ("missing_prompt", 8, "pairs.jsonl"),
                   ("bad_difficulty", 9, "pairs.jsonl"), ("bad_messages", 10, "pairs.jsonl"),
                   ("prompt_mismatch", 2, "implicit.parquet"), ("missing_rejected", 2, "heldout")}
    assert all(json.loads(r["detail"])["error"] for r in rejected)
    pair_table, reject_table = tables(kept, rejected)
    assert pair_table.num_rows == len(kept) and reject_table.num_rows == len(rejected)
