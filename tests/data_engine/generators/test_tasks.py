"""Reasoning tasks: worked answers are right, checking is canonical, pairs are wrong on purpose."""
from __future__ import annotations

import contextlib
import io
import math
import random
import re
from collections import Counter
from fractions import Fraction

import pytest

from data_engine.schema import DIFFICULTIES
from data_engine.generators.tasks import (FAMILIES, REJECT_KINDS, Task, check_answer, extract_answer, format_ok,
                               generate_tasks, make_preference_pair, same_answer, wrong_answer)

ALL = [(f, d) for f in FAMILIES for d in DIFFICULTIES]


def _tasks(family: str, difficulty: str, n: int = 12) -> list[Task]:
    return generate_tasks(n, seed=11, families=[family], difficulties=[difficulty])


@pytest.mark.parametrize("family,difficulty", ALL)
def test_every_worked_solution_is_well_formed_and_correct(family, difficulty):
    for task in _tasks(family, difficulty):
        assert (task.family, task.difficulty) == (family, difficulty)
        assert task.domain == ("code" if family.startswith("python") else "math")
        assert format_ok(task.solution)
        assert extract_answer(task.solution) == task.answer
        assert check_answer(task, task.solution) and check_answer(task.answer, task.solution)
        think = task.solution.split("<think>")[1].split("</think>")[0].strip().splitlines()
        assert len(think) >= 2, task.solution  # a real derivation, not just the answer


@pytest.mark.parametrize("family,difficulty", ALL)
def test_a_wrong_answer_is_rejected(family, difficulty):
    rng = random.Random(5)
    for task in _tasks(family, difficulty):
        wrong = wrong_answer(task.answer, rng)
        assert not check_answer(task, f"<think>steps</think><answer>{wrong}</answer>"), (task.answer, wrong)


# ---------------------------------------------------------------- answers recomputed independently
def _code_block(prompt: str) -> str:
    return re.search(r"```python\n(.*?)\n```", prompt, re.S).group(1)


def _fractions_eval(expr: str):
    """Evaluate an expression with every integer literal as a Fraction (exact division)."""
    return eval(re.sub(r"\d+", lambda m: f"Fraction({m.group()})", expr), {"Fraction": Fraction})


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_answers_agree_with_the_python_interpreter(difficulty):
    for task in _tasks("python_eval", difficulty):
        assert repr(eval(_code_block(task.prompt))) == task.answer
    for task in _tasks("python_trace", difficulty):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(_code_block(task.prompt), {})
        assert out.getvalue().strip() == task.answer


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_math_answers_agree_with_direct_computation(difficulty):
    for t in _tasks("arithmetic", difficulty):
        expr = re.sub(r"^(Evaluate|What is the value of|Compute) ", "", t.prompt).rstrip(".?")
        assert str(eval(expr)) == t.answer
    for t in _tasks("linear_equation", difficulty):
        left, right = t.prompt.removeprefix("Solve for x: ").rstrip(".").split(" = ")
        x = Fraction(t.answer)
        as_python = [re.sub(r"(\d)(x|\()", r"\1*\2", side) for side in (left, right)]
        assert _fractions_eval(as_python[0].replace("x", f"({x})")) == _fractions_eval(
            as_python[1].replace("x", f"({x})"))
    for t in _tasks("fraction", difficulty):
        expr = re.search(r"(?:Add|Compute) (.*?) (?:and simplify|and give)", t.prompt).group(1)
        assert _fractions_eval(expr.replace("÷", "/")) == Fraction(t.answer)
    for t in _tasks("modular", difficulty):
        a, e, m = map(int, re.findall(r"\d+", t.prompt)) if "^" in t.prompt else (None, None, None)
        if a is not None:
            assert pow(a, e, m) == int(t.answer)
        else:
            expr = t.prompt.split("is ")[1].replace(" mod ", " % ").rstrip("?")
            assert _fractions_eval(expr) == int(t.answer)
    for t in _tasks("gcd_lcm", difficulty):
        nums = list(map(int, re.findall(r"\d+", t.prompt)))
        expected = math.gcd(*nums) if "greatest" in t.prompt else math.lcm(*nums)
        assert expected == int(t.answer)


def test_sorted_lists_are_sorted():
    for t in _tasks("list_sort", "basic") + _tasks("list_sort", "advanced"):
        values = eval(re.search(r"(\[.*?\])", t.prompt).group(1))
        assert eval(t.answer) == sorted(values, reverse="descending" in t.prompt)
    for t in _tasks("list_sort", "expert"):
        words = eval(re.search(r"(\[.*?\])", t.prompt).group(1))
        assert eval(t.answer) == sorted(words, key=lambda w: (len(w), w))


# ---------------------------------------------------------------- canonical comparison
@pytest.mark.parametrize("expected,given,ok", [
    ("3/4", "0.75", True), ("0.75", "3/4", True), ("10/3", "3.3333", True), ("10/3", "3.33", False),
    ("2500", "2,500", True), ("2500", "2500.0", True), ("42", "x = 42", True), ("42", "42 km", True),
    ("42", "43", False), ("42", "41.99999", False), ("28.8", "$28.80", True), ("-7/20", "-0.35", True),
    ("[1, 2, 3]", "[1,2,3]", True), ("[1, 2, 3]", "[3, 2, 1]", False), ("[1, 2, 3]", "(1, 2, 3)", True),
    ("['fig', 'kiwi']", '["fig", "kiwi"]', True), ("'bcd'", "bcd", True), ("'Bcd'", "'bcd'", False),
    ("6 3", "6  3", True), ("6 3", "6 4", False), ("True", "true", True), ("olleh", "OLLEH.", True),
])
def test_same_answer_is_canonical(expected, given, ok):
    assert same_answer(expected, given) is ok


@pytest.mark.parametrize("given", ["1e999999999", "9" * 5000, "inf", "nan", "[" * 5000, "1j", "{1: 2}"])
def test_hostile_answers_are_just_wrong(given):
    assert same_answer("5", given) is False


def test_check_answer_reads_the_last_answer_block():
    assert check_answer("7", "<think>a</think><answer>3</answer> wait <answer> 7 </answer>")
    assert not check_answer("7", "<think>the answer is 7</think>")
    assert not check_answer("7", "<answer></answer>")


@pytest.mark.parametrize("text,ok", [
    ("<think>steps</think><answer>4</answer>", True),
    ("  <think>\nsteps\n</think>\n<answer>4</answer>\n", True),
    ("<answer>4</answer>", False),
    ("<answer>4</answer><think>steps</think>", False),
    ("<think>steps</think><answer>4</answer><answer>5</answer>", False),
    ("<think>a</think><think>b</think><answer>4</answer>", False),
    ("<think> </think><answer>4</answer>", False),
    ("<think>steps</think><answer> </answer>", False),
    ("<think>steps</think><answer>4</answer> trailing words", False),
    ("preamble <think>steps</think><answer>4</answer>", False),
    ("<think>steps<answer>3</answer></think><answer>4</answer>", False),
])
def test_format_ok(text, ok):
    assert format_ok(text) is ok


def test_extract_answer():
    assert extract_answer("no tags") is None
    assert extract_answer("<answer>\n 12 \n</answer>") == "12"


# ---------------------------------------------------------------- determinism and mix
def test_generation_is_deterministic_and_prefix_stable():
    a, b = generate_tasks(60, seed=7), generate_tasks(60, seed=7)
    assert a == b
    assert generate_tasks(25, seed=7) == a[:25]
    assert [t.prompt for t in generate_tasks(60, seed=8)] != [t.prompt for t in a]
    assert len({t.id for t in a}) == 60 and len({t.prompt for t in a}) == 60


def test_one_cycle_covers_every_family_and_difficulty_once():
    tasks = generate_tasks(len(FAMILIES) * len(DIFFICULTIES), seed=0)
    assert Counter((t.family, t.difficulty) for t in tasks) == Counter(ALL)


def test_task_dict_round_trip():
    task = generate_tasks(1, seed=0)[0]
    assert Task.from_dict(task.to_dict()) == task
    with pytest.raises(ValueError, match="answer"):
        Task.from_dict({k: v for k, v in task.to_dict().items() if k != "answer"})


# ---------------------------------------------------------------- preference pairs
@pytest.mark.parametrize("kind", REJECT_KINDS)
def test_rejected_solution_fails_the_check_or_the_format(kind):
    rng = random.Random(3)
    for task in generate_tasks(3 * len(FAMILIES) * len(DIFFICULTIES), seed=2):
        chosen, rejected = make_preference_pair(task, rng, kind=kind)
        assert chosen == task.solution and rejected != chosen
        if kind == "missing_think":
            assert not format_ok(rejected) and check_answer(task, rejected)
        else:  # a complete-looking derivation that ends in the wrong number
            assert format_ok(rejected) and not check_answer(task, rejected), rejected


def test_slip_changes_the_derivation_too():
    task = generate_tasks(1, seed=0, families=["arithmetic"])[0]
    _, rejected = make_preference_pair(task, random.Random(0), kind="arithmetic_slip")
    wrong = extract_answer(rejected)
    think = rejected.split("</think>")[0]
    assert f"So the value is {wrong}." in think


def test_preference_pairs_are_deterministic_for_an_rng_seed():
    tasks = generate_tasks(30, seed=4)
    first = [make_preference_pair(t, random.Random(9)) for t in tasks]
    assert first == [make_preference_pair(t, random.Random(9)) for t in tasks]
    rejected = [make_preference_pair(t, random.Random(i))[1] for i, t in enumerate(tasks)]
    kinds = Counter(r.startswith("<answer>") for r in rejected)
    assert kinds[True] and kinds[False]  # the default draws among the kinds


# ---------------------------------------------------------------- errors name the argument
@pytest.mark.parametrize("call,name", [
    (lambda: generate_tasks(-1, 0), "n"), (lambda: generate_tasks(2.5, 0), "n"),
    (lambda: generate_tasks(1, "zero"), "seed"),
    (lambda: generate_tasks(1, 0, families=["nope"]), "families"),
    (lambda: generate_tasks(1, 0, families="arithmetic"), "families"),
    (lambda: generate_tasks(1, 0, difficulties=["hard"]), "difficulties"),
    (lambda: check_answer(5, "<answer>5</answer>"), "task_or_answer"),
    (lambda: check_answer(" ", "<answer>5</answer>"), "task_or_answer"),
    (lambda: check_answer("5", None), "completion"), (lambda: format_ok(b"x"), "completion"),
    (lambda: extract_answer(3), "completion"), (lambda: same_answer("1", 1), "given"),
    (lambda: make_preference_pair("task", random.Random(0)), "task"),
    (lambda: make_preference_pair(generate_tasks(1, 0)[0], 3), "rng"),
    (lambda: make_preference_pair(generate_tasks(1, 0)[0], random.Random(0), kind="typo"), "kind"),
])
def test_wrong_inputs_raise_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        call()
