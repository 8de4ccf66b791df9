"""Verifiable reasoning tasks with worked solutions, for SFT, DPO and RL.

A task is a prompt, a worked ``solution`` in the reasoning format
(``<think>steps</think>`` then ``<answer>value</answer>``) and the canonical
``answer`` that rewards check a model's completion against:

    from data_engine.generators.tasks import generate_tasks, check_answer, format_ok
    tasks = generate_tasks(200, seed=0)            # same seed, same tasks
    check_answer(tasks[0], completion)             # the <answer> matches?
    format_ok(completion)                          # one think block, then one answer block
    chosen, rejected = make_preference_pair(tasks[0], random.Random(0))   # for DPO

Families and their generators live in ``task_families*.py``; every family
makes basic / advanced / expert variants from its own parameters.
"""
from __future__ import annotations

import ast
import hashlib
import json
import math
import random
import re
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from pathlib import Path

from data_engine.schema import ANSWER_CLOSE, ANSWER_OPEN, DIFFICULTIES, THINK_CLOSE, THINK_OPEN
from data_engine.generators.task_families import MATH_FAMILIES, fmt_frac, fmt_num
from data_engine.generators.task_families_applied import APPLIED_FAMILIES
from data_engine.generators.task_families_code import CODE_FAMILIES

# family name -> (generator, domain)
FAMILIES = {**{n: (f, "math") for n, f in {**MATH_FAMILIES, **APPLIED_FAMILIES}.items()},
            **{n: (f, "code") for n, f in CODE_FAMILIES.items()}}
REJECT_KINDS = ("arithmetic_slip", "wrong_answer", "missing_think")
REL_TOL = 1e-4  # for non-integer answers: 3.3333 passes for 10/3, 3.33 does not
_MAX_ATTEMPTS = 8  # redraws to avoid a repeated prompt within one call
_MAX_LITERAL = 2000  # longer answers are compared as text, never parsed


@dataclass(frozen=True)
class Task:
    id: str
    family: str
    prompt: str
    solution: str
    answer: str
    difficulty: str
    domain: str

    def to_dict(self) -> dict:
        return asdict(self)

    def as_text(self) -> str:
        """The task as one training document: prompt, then the worked solution."""
        return f"{self.prompt}\n\n{self.solution}"

    @classmethod
    def from_dict(cls, row: dict) -> "Task":
        if not isinstance(row, dict):
            raise ValueError(f"task row must be an object, got {type(row).__name__}")
        for f in fields(cls):
            if not isinstance(row.get(f.name), str):
                raise ValueError(f"task row {row.get('id')!r}: field {f.name!r} missing or not a string")
        return cls(**{f.name: row[f.name] for f in fields(cls)})


# ---------------------------------------------------------------- generation
def generate_tasks(n: int, seed: int, families=None, difficulties=None) -> list[Task]:
    """``n`` tasks cycling through the families, then the difficulties; deterministic.

    Task ``i`` depends only on (seed, i) and the prompts before it, so a longer
    list extends a shorter one with the same arguments.
    """
    _require_int("n", n, minimum=0)
    _require_int("seed", seed)
    fams = _choose("families", families, tuple(FAMILIES))
    diffs = _choose("difficulties", difficulties, DIFFICULTIES)
    tasks, seen = [], set()
    for i in range(n):
        family, difficulty = fams[i % len(fams)], diffs[(i // len(fams)) % len(diffs)]
        tasks.append(_make_task(family, difficulty, seed, i, seen))
    return tasks


def _make_task(family: str, difficulty: str, seed: int, index: int, seen: set) -> Task:
    make, domain = FAMILIES[family]
    for attempt in range(_MAX_ATTEMPTS):
        draft = make(random.Random(f"{seed}:{index}:{attempt}"), difficulty)
        if draft.prompt not in seen:
            break  # small basic families can run out of fresh prompts; then a repeat is kept
    seen.add(draft.prompt)
    digest = hashlib.sha256(f"{seed}:{index}:{draft.prompt}".encode()).hexdigest()[:12]
    solution = render_solution(draft.steps, draft.answer)
    return Task(f"{family}-{digest}", family, draft.prompt, solution, draft.answer, difficulty, domain)


def render_solution(steps, answer: str) -> str:
    think = "\n".join(steps)
    return f"{THINK_OPEN}\n{think}\n{THINK_CLOSE}\n{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


def _require_int(name: str, value, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _choose(name: str, wanted, known: tuple[str, ...]) -> tuple[str, ...]:
    if wanted is None:
        return known
    if isinstance(wanted, str) or not wanted:
        raise ValueError(f"{name} must be a non-empty list of names, got {wanted!r}")
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise ValueError(f"{name}: unknown {unknown}; known: {', '.join(known)}")
    return tuple(dict.fromkeys(wanted))


def load_tasks(path: str | Path) -> list[Task]:
    """Read a task file written by ``demo_corpus.write_task_file``; errors name the line."""
    tasks = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                tasks.append(Task.from_dict(json.loads(line)))
            except (json.JSONDecodeError, ValueError) as err:
                raise ValueError(f"{path}:{line_no}: {err}") from err
    return tasks


# ---------------------------------------------------------------- format and answers
_FORMAT = re.compile(r"\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.S)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)


def format_ok(completion: str) -> bool:
    """Exactly one non-empty think block, then exactly one non-empty answer block."""
    _require_str("completion", completion)
    m = _FORMAT.fullmatch(completion)
    if not m:
        return False
    parts = (m["think"], m["answer"])
    return all(p.strip() and not any(t in p for t in _TAGS) for p in parts)


def extract_answer(completion: str) -> str | None:
    """The text of the last ``<answer>`` block, stripped; None when there is none."""
    _require_str("completion", completion)
    found = _ANSWER.findall(completion)
    return found[-1].strip() if found else None


def check_answer(task_or_answer, completion: str) -> bool:
    """True when the completion's ``<answer>`` equals the expected answer canonically."""
    if isinstance(task_or_answer, Task):
        expected = task_or_answer.answer
    elif isinstance(task_or_answer, str):
        expected = task_or_answer
    else:
        raise ValueError(f"task_or_answer must be a Task or an answer string, "
                         f"got {type(task_or_answer).__name__}")
    if not expected.strip():
        raise ValueError("task_or_answer: the expected answer is empty")
    given = extract_answer(completion)
    return bool(given) and same_answer(expected, given)


def exact_answer(expected: str, completion: str) -> bool:
    """The completion's ``<answer>`` text equals the expected text exactly (after stripping)."""
    _require_str("expected", expected)
    given = extract_answer(completion)
    return given is not None and given == expected.strip()


# name -> checker(expected answer, completion): what a task's `checker` column names. Checkers
# read the completion as text; none of them ever executes it (python_* tasks are checked
# against their known answer).
CHECKERS = {"answer": check_answer, "exact": exact_answer}


def check(checker: str, expected: str, completion: str) -> bool:
    """Score a completion with the named checker."""
    if checker not in CHECKERS:
        raise ValueError(f"unknown checker {checker!r}; known: {sorted(CHECKERS)}")
    return CHECKERS[checker](expected, completion)


def same_answer(expected: str, given: str) -> bool:
    """Compare two answer texts: numbers within tolerance, lists item by item, text normalised."""
    _require_str("expected", expected)
    _require_str("given", given)
    return _same(_parse(expected), _parse(given))


def _require_str(name: str, value) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a str, got {type(value).__name__}")


# Exponents and digit counts are capped: "1e999999999" from a model must not build a huge int.
_NUMBER = re.compile(r"[-+]?(\d{1,400}\.?\d{0,400}|\.\d{1,400})([eE][-+]?\d{1,3})?")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?")
_FRACTION = re.compile(r"([-+]?\d{1,400})\s*/\s*([-+]?\d{1,400})")
_VARIABLE = re.compile(r"^[A-Za-z]\s*=\s*(?!=)")
_UNIT = re.compile(r"\s+[A-Za-z][A-Za-z/²³]*$")


def _parse(text: str):
    """Answer text -> (kind, value) with kind in num / seq / str / bool / text."""
    text = " ".join(text.split()).rstrip(".").strip()
    text = _VARIABLE.sub("", text) or text  # "x = 4" answers 4
    number = _parse_number(text)
    if number is None and _UNIT.search(text):
        number = _parse_number(_UNIT.sub("", text))  # "1700 cm", "12 km/h"
    if number is not None:
        return "num", number
    if len(text) <= _MAX_LITERAL:
        try:
            return _from_literal(ast.literal_eval(text))
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass
    return "text", text


def _parse_number(text: str) -> Fraction | None:
    text = text.removeprefix("$").strip()
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    if _NUMBER.fullmatch(text):
        return Fraction(text)
    m = _FRACTION.fullmatch(text)
    if m and int(m[2]) != 0:
        return Fraction(int(m[1]), int(m[2]))
    return None


def _from_literal(value):
    if isinstance(value, bool):
        return "bool", value
    if isinstance(value, (int, float)) and math.isfinite(value):
        return "num", Fraction(value)
    if isinstance(value, str):
        return "str", value
    if isinstance(value, (list, tuple)):
        return "seq", tuple(_from_literal(v) for v in value)
    return "text", repr(value)


def _same(expected, given) -> bool:
    (ek, ev), (gk, gv) = expected, given
    if ek == "num" and gk == "num":
        return ev == gv or (ev.denominator != 1 and abs(ev - gv) <= REL_TOL * max(1, abs(ev)))
    if ek == "seq" and gk == "seq":
        return len(ev) == len(gv) and all(_same(a, b) for a, b in zip(ev, gv))
    if {ek, gk} <= {"str", "text"}:
        # bare text compares case-blind; a quoted Python string keeps its case
        return ev.casefold() == gv.casefold() if ek == gk == "text" else ev == gv
    if ek == "bool" and gk in ("bool", "text"):
        return str(ev).casefold() == str(gv).casefold()
    return False


# ---------------------------------------------------------------- preference pairs
def make_preference_pair(task: Task, rng: random.Random, kind: str | None = None) -> tuple[str, str]:
    """(chosen, rejected): the worked solution, and a plausible wrong one.

    ``kind`` (default: drawn from ``rng``) is one of REJECT_KINDS: an
    arithmetic slip carried into the final answer, a right derivation with a
    wrong final answer, or a right answer with no reasoning (fails format_ok).
    """
    if not isinstance(task, Task):
        raise ValueError(f"task must be a Task, got {type(task).__name__}")
    if not isinstance(rng, random.Random):
        raise ValueError(f"rng must be a random.Random, got {type(rng).__name__}")
    kind = rng.choice(REJECT_KINDS) if kind is None else kind
    if kind not in REJECT_KINDS:
        raise ValueError(f"kind must be one of {REJECT_KINDS}, got {kind!r}")
    if kind == "missing_think":
        return task.solution, f"{ANSWER_OPEN}{task.answer}{ANSWER_CLOSE}"
    wrong = wrong_answer(task.answer, rng)
    think = task.solution[:task.solution.rindex(THINK_CLOSE)]
    if kind == "arithmetic_slip":
        think = _slip(think, task.answer, wrong)
    return task.solution, f"{think}{THINK_CLOSE}\n{ANSWER_OPEN}{wrong}{ANSWER_CLOSE}"


def _slip(think: str, answer: str, wrong: str) -> str:
    """Put the wrong value where the last two steps state the answer, as if miscomputed there."""
    lines = think.split("\n")
    pattern = re.compile(r"(?<![\w.])" + re.escape(answer) + r"(?![\w]|\.\d)")
    for i in range(max(0, len(lines) - 3), len(lines)):
        hits = list(pattern.finditer(lines[i]))
        if hits:
            last = hits[-1]
            lines[i] = lines[i][:last.start()] + wrong + lines[i][last.end():]
    return "\n".join(lines)


def wrong_answer(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer of the same shape (number, list, string, printed text)."""
    kind, value = _parse(answer)
    for _ in range(20):
        candidate = _perturb(kind, value, answer, rng)
        if candidate.strip() and not same_answer(answer, candidate):
            return candidate
    return answer + " 1"  # the shapes above almost always differ; this one always does


def _perturb(kind: str, value, answer: str, rng: random.Random) -> str:
    if kind == "num":
        spell = fmt_frac if "/" in answer else fmt_num
        if value.denominator != 1 and rng.random() < 0.4:
            return spell(Fraction(value.numerator + rng.choice([-1, 1]), value.denominator))
        return spell(rng.choice([value + rng.choice([-2, -1, 1, 2, 10]), value * 2, -value, value - 1]))
    if kind == "seq" and not value:
        return "[0]"
    if kind == "seq" and len(value) > 1:
        items = list(ast.literal_eval(answer))
        i, j = rng.sample(range(len(items)), 2)
        items[i], items[j] = items[j], items[i]
        return repr(tuple(items)) if answer.lstrip().startswith("(") else repr(items)
    if kind == "str" and value:
        cut = rng.randrange(len(value))
        return repr(value[:cut] + value[cut + 1:] if rng.random() < 0.5 else value + value[-1])
    if kind == "bool":
        return str(not value)
    numbers = re.findall(r"-?\d+", answer)
    if numbers:
        target = rng.choice(numbers)
        return answer.replace(target, str(int(target) + rng.choice([-1, 1])), 1)
    return answer + rng.choice([" not", "s", " 0"])
