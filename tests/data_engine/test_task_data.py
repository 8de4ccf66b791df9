"""Task data without Ray: generated splits, the overlap rules, user files with malformed rows,
and the corpus scan for held-out prompts."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_engine.dedup_minhash import normalize_text
from data_engine.task_data import (ContaminationIndex, DecontaminationConfig, GeneratorConfig, Overlaps, TaskFileSpec,
                                   TaskFieldMap, TasksConfig, generated_split, generated_train, read_task_files)
from data_engine.generators.tasks import FAMILIES, check

DECON = DecontaminationConfig()


def row(id_, prompt, family="arithmetic", answer="7", response="<think>x</think><answer>7</answer>"):
    return {"id": id_, "split": "train", "source": "t", "family": family, "domain": "math", "difficulty": "basic",
            "prompt": prompt, "system": None, "context": None, "response": response, "answer": answer,
            "checker": "answer"}


def test_generated_splits_have_the_configured_counts_and_are_deterministic():
    gen = GeneratorConfig(families=["arithmetic", "list_sort"], train_per_cell=6, eval_per_cell=3,
                          train_difficulties=["basic", "advanced"], eval_difficulties=["basic"],
                          cells={"list_sort": 2, "arithmetic/advanced": 0})
    ev = generated_split(gen, "eval", seed=0)
    assert [(r["family"], r["difficulty"]) for r in ev] == [("arithmetic", "basic")] * 3 + [("list_sort", "basic")] * 3
    assert ev == generated_split(gen, "eval", seed=0) and ev != generated_split(gen, "eval", seed=1)
    train, rejected, short = generated_train(gen, 0, Overlaps(ev, DECON))
    counts = {}
    for r in train:
        counts[(r["family"], r["difficulty"])] = counts.get((r["family"], r["difficulty"]), 0) + 1
    assert counts == {("arithmetic", "basic"): 6, ("list_sort", "basic"): 2, ("list_sort", "advanced"): 2}
    assert short == {} and all(check(r["checker"], r["answer"], r["response"]) for r in train + ev)


def test_bad_generator_names_are_rejected_by_key():
    with pytest.raises(ValueError, match="families"):
        GeneratorConfig(families=["algebra"])
    with pytest.raises(ValueError, match="cells"):
        GeneratorConfig(cells={"arithmetic/impossible": 3})
    with pytest.raises(ValueError, match="nothing to write"):
        TasksConfig(generator={"enabled": False})
    with pytest.raises(ValueError, match="unknown checker 'regex'"):
        TaskFileSpec(path="x.jsonl", checker="regex")


def test_overlap_rules_exact_same_numbers_and_near():
    ev = [row("e1", "Evaluate 12 + 16."), row("e2", "Compute 3 * 4 - 5.", answer="7"),
          row("e3", "Ava buys 6 sandwiches at $1 each and pays with a $10 bill. How many dollars of change "
                    "does Ava get back from the shop today?", family="word_problem", answer="4")]
    train = [row("t1", "  evaluate 12 + 16 "),                       # exact after normalisation
             row("t2", "What is the value of 3 * 4 - 5?", answer="7"),  # same numbers, same answer
             row("t3", "What is the value of 3 * 4 - 5?", family="modular", answer="7"),  # another family
             row("t4", "Ava buys 6 sandwiches at $1 each and pays with a $10 bill. How many dollars of change "
                       "does Ava get back from the shop now?", family="word_problem", answer="5"),  # near
             row("t5", "Evaluate 12 + 17.", answer="29")]              # another problem
    found = Overlaps(ev, DECON).find(train)
    assert {k: v[:2] for k, v in found.items()} == {"t1": ("exact", "e1"), "t2": ("same_numbers", "e2"),
                                                    "t4": ("near", "e3")}
    assert found["t4"][2] >= DECON.threshold


def test_generated_train_replaces_rows_that_overlap_the_eval_split():
    gen = GeneratorConfig(families=["gcd_lcm"], train_per_cell=30, eval_per_cell=0, train_difficulties=["basic"])
    plain, _, _ = generated_train(gen, 0, Overlaps([], DECON))
    planted = [dict(plain[3], id="e-a"), dict(plain[10], id="e-b")]  # eval problems that train would draw
    train, rejected, short = generated_train(gen, 0, Overlaps(planted, DECON))
    assert len(train) == 30 and short == {}
    assert {json.loads(r["detail"])["eval_id"] for r in rejected} == {"e-a", "e-b"}
    assert {r["reason"] for r in rejected} == {"overlaps_eval"}
    eval_prompts = {normalize_text(r["prompt"], DECON.dedup()) for r in planted}
    assert not any(normalize_text(r["prompt"], DECON.dedup()) in eval_prompts for r in train)


def write_user_files(tmp_path):
    lines = [
        json.dumps({"id": "ok1", "prompt": "What is 2 + 2?", "response": "<think>2 + 2 = 4</think><answer>4</answer>"}),
        json.dumps({"id": "rl1", "prompt": "What is 3 + 3?", "answer": 6, "checker": "exact"}),
        '{"id": "broken", "prompt": ',
        json.dumps({"id": "np", "response": "r"}),
        json.dumps({"id": "ep", "prompt": "   ", "response": "r"}),
        json.dumps({"id": "wt", "prompt": ["a list"], "response": "r"}),
        json.dumps({"id": "uc", "prompt": "p", "answer": "1", "checker": "regex"}),
        json.dumps({"id": "bd", "prompt": "p", "answer": "1", "difficulty": "hard"}),
        json.dumps({"id": "nt", "prompt": "p only"}),
        json.dumps(["not", "an", "object"]),
    ]
    (tmp_path / "sft.jsonl").write_text("\n".join(lines) + "\n")
    chats = [{"id": "c1", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                                       {"role": "assistant", "content": "Hello."}]},
             {"id": "c2", "messages": [{"role": "assistant", "content": "no user turn"}]}]
    pq.write_table(pa.Table.from_pylist(chats), tmp_path / "chat.parquet")
    as_strings = [{"id": "c3", "messages": json.dumps([{"role": "user", "content": "1 + 1?"},
                                                        {"role": "assistant", "content": "2"}])},
                  {"id": "c4", "messages": "not json ["}]
    (tmp_path / "chat2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in as_strings))
    import datasets
    datasets.Dataset.from_dict({"q": ["Name a prime.", "No answer here"], "a": ["7", None]}).save_to_disk(
        str(tmp_path / "heldout"))
    return [TaskFileSpec(path=str(tmp_path / "sft.jsonl")),
            TaskFileSpec(path=str(tmp_path / "chat.parquet"), fields=TaskFieldMap(messages="messages")),
            TaskFileSpec(path=str(tmp_path / "chat2.jsonl"), fields=TaskFieldMap(messages="messages")),
            TaskFileSpec(path=str(tmp_path / "heldout"), split="eval", family="primes", fields=TaskFieldMap(
                id=None, prompt="q", response=None, answer="a", checker=None, family=None, difficulty=None))]


def test_user_files_keep_good_rows_and_reject_the_rest_with_reason_file_and_line(tmp_path):
    specs = write_user_files(tmp_path)
    kept, rejected = read_task_files(specs)
    assert len(kept) + len(rejected) == 10 + 4 + 2  # rows in = kept + rejected
    assert [r["id"] for r in kept[:2]] == ["ok1", "rl1"] and kept[1]["answer"] == "6" and kept[1]["checker"] == "exact"
    by_id = {r["id"]: r for r in kept}
    assert by_id["c1"]["system"] == "Be brief." and by_id["c1"]["prompt"] == "Hi?" and by_id["c1"]["response"] == "Hello."
    assert by_id["c3"]["response"] == "2"
    held = [r for r in kept if r["split"] == "eval"]
    assert len(held) == 1 and held[0]["family"] == "primes" and held[0]["answer"] == "7"
    got = {(r["reason"], r["line"], r["file"].rsplit("/", 1)[-1]) for r in rejected}
    assert got == {("bad_json", 3, "sft.jsonl"), ("missing_prompt", 4, "sft.jsonl"), ("empty_prompt", 5, "sft.jsonl"),
                   ("wrong_type", 6, "sft.jsonl"), ("unknown_checker", 7, "sft.jsonl"),
                   ("bad_difficulty", 8, "sft.jsonl"), ("no_response_or_answer", 9, "sft.jsonl"),
                   ("not_a_record", 10, "sft.jsonl"), ("bad_messages", 2, "chat.parquet"),
                   ("bad_messages", 2, "chat2.jsonl"), ("no_answer", 2, "heldout")}
    assert all(json.loads(r["detail"])["error"] for r in rejected)


def test_corpus_documents_holding_an_eval_prompt_are_found():
    ev = [row("e1", "Sort the list [32, 41, 38, 33, 6] in ascending order."),
          row("e2", "Find the greatest common divisor of 15 and 45.", family="gcd_lcm", answer="15"),
          row("e3", "Capital of France?", family="capitals", answer="Paris")]  # shorter than one 5-gram
    docs = pa.table({"id": ["d1", "d2", "d3", "d4", "d5"], "text": [
        "Some notes.\n\nSort the list [32, 41, 38, 33, 6] in ascending order.\n\n<think>...</think>",
        "Sort the list [32, 41, 38, 33, 7] in ascending order, then add them.",   # other numbers
        "find the greatest common divisor of 15 and 45",                          # case and punctuation differ
        "An unrelated document about the history of Rome.",
        "Geography quiz, question 3: capital of France? Answer: Paris."]})
    hits = ContaminationIndex(ev, DECON).contaminated(docs).to_pylist()
    assert [(h["doc_id"], h["task_id"]) for h in hits] == [("d1", "e1"), ("d3", "e2"), ("d5", "e3")]
    assert all(h["containment"] == 1.0 for h in hits)


def test_every_family_is_known_to_the_generator_config():
    assert GeneratorConfig().family_names == list(FAMILIES)
