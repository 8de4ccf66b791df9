"""Preference pairs on the session's tiny trained model's tasks (tests/reasoner.py), shared by the
DPO and reward-model tests: chosen is the task's right response, rejected a wrong answer."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_engine.pair_data import PAIR_SCHEMA


def pair_row(task: dict, i: int) -> dict:
    n = int(task["answer"])
    wrong = f"<think>\nThe number is {n + 1 + i % 3}.\n</think>\n<answer>{n + 1 + i % 3}</answer>"
    return {"id": f"p-{task['id']}", "split": task["split"], "source": "test", "kind": "wrong_answer",
            "task_id": task["id"], "family": task["family"], "difficulty": task["difficulty"],
            "prompt": task["prompt"], "system": None, "context": None, "chosen": task["response"], "rejected": wrong}


@pytest.fixture(scope="session")
def pairs(reasoner, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    for split, folder in (("train", reasoner.train_dir), ("eval", reasoner.eval_dir)):
        rows = [pair_row(t, i) for i, t in enumerate(pq.read_table(folder).to_pylist())]
        (root / split).mkdir()
        pq.write_table(pa.Table.from_pylist(rows[:200], schema=PAIR_SCHEMA), root / split / "part-00000.parquet")
    return root
