"""Code task families: evaluate a small Python expression, trace a small program.

The answers are worked out by hand here (the steps need the intermediate
values anyway) and spelled as Python would print them: ``repr`` for an
expression's value, the printed line for a program. The tests run the same
code with the real interpreter to keep the two in agreement.
"""
from __future__ import annotations

import random

from data_engine.generators.task_families import Draft
from data_engine.generators.task_families_applied import WORDS

_EVAL_PROMPT = "What does this Python expression evaluate to?\n\n```python\n{code}\n```"
_TRACE_PROMPT = "What does this Python program print?\n\n```python\n{code}\n```"


def _draft(prompt: str, code: str, steps: list[str], value) -> Draft:
    steps.append(f"So the result is {value!r}.")
    return Draft(prompt.format(code=code), tuple(steps), repr(value))


# ---------------------------------------------------------------- expressions
def _floor_mod(rng: random.Random):
    a, b, c, d = rng.randint(10, 99), rng.randint(2, 9), rng.randint(10, 99), rng.randint(2, 9)
    steps = [f"{a} // {b} = {a // b} (floor division drops the remainder).",
             f"{c} % {d} = {c % d} (the remainder of {c} divided by {d}).",
             f"{a // b} + {c % d} = {a // b + c % d}."]
    return f"{a} // {b} + {c} % {d}", steps, a // b + c % d


def _len_mul(rng: random.Random):
    word, k = rng.choice(WORDS), rng.randint(2, 7)
    steps = [f"len({word!r}) counts {len(word)} characters.", f"{len(word)} * {k} = {len(word) * k}."]
    return f"len({word!r}) * {k}", steps, len(word) * k


def _power(rng: random.Random):
    a, e, b = rng.randint(2, 9), rng.randint(2, 3), rng.randint(1, 50)
    steps = [f"** binds tighter than -, so first {a} ** {e} = {a ** e}.", f"{a ** e} - {b} = {a ** e - b}."]
    return f"{a} ** {e} - {b}", steps, a ** e - b


def _sum_squares(rng: random.Random):
    n = rng.randint(4, 8)
    squares = [x * x for x in range(1, n)]
    steps = [f"range(1, {n}) gives 1 to {n - 1}; their squares are {', '.join(map(str, squares))}.",
             f"Their sum is {' + '.join(map(str, squares))} = {sum(squares)}."]
    return f"sum(x * x for x in range(1, {n}))", steps, sum(squares)


def _filter_comp(rng: random.Random):
    a, k = rng.randint(0, 10), rng.randint(2, 5)
    b = a + rng.randint(8, 16)
    kept = [x for x in range(a, b) if x % k == 0]
    steps = [f"range({a}, {b}) runs from {a} to {b - 1}; the last value is excluded.",
             f"Keep the multiples of {k}: {kept}."]
    return f"[x for x in range({a}, {b}) if x % {k} == 0]", steps, kept


def _slice(rng: random.Random):
    word = rng.choice([w for w in WORDS if len(w) >= 5])
    i, j = rng.randint(0, 2), rng.randint(3, len(word))
    chars = ", ".join(f"{n}:{ch}" for n, ch in enumerate(word))
    steps = [f"Index the characters: {chars}.",
             f"[{i}:{j}] takes indices {i} up to but not including {j}: {word[i:j]!r}."]
    return f"{word!r}[{i}:{j}]", steps, word[i:j]


def _sorted_pick(rng: random.Random):
    values = rng.sample(range(1, 60), 6)
    ordered = sorted(values, reverse=True)
    steps = [f"sorted(..., reverse=True) gives {ordered}.", f"Index 1 is the second item: {ordered[1]}."]
    return f"sorted({values}, reverse=True)[1]", steps, ordered[1]


def _distinct_chars(rng: random.Random):
    word = rng.choice(["mississippi", "banana", "bookkeeper", "committee", "balloon", "parallel",
                       "tennessee", "successes", "assessment", "coffee"])
    distinct = sorted(set(word))
    steps = [f"set({word!r}) keeps each character once: {', '.join(distinct)}.",
             f"That is {len(distinct)} characters."]
    return f"len(set({word!r}))", steps, len(distinct)


def _max_key(rng: random.Random):
    words = rng.sample(WORDS, 5)
    lengths = ", ".join(f"{w}={len(w)}" for w in words)
    best = max(words, key=len)
    steps = [f"Lengths: {lengths}.",
             f"max with key=len returns the first word of the greatest length: {best!r}."]
    return f"max({words}, key=len)", steps, best


def _double_sum(rng: random.Random):
    a, b = rng.randint(3, 6), rng.randint(3, 6)
    sa, sb = sum(range(1, a)), sum(range(1, b))
    steps = ["The double sum of i * j factors into (sum of i) * (sum of j).",
             f"i runs over 1..{a - 1}, summing to {sa}; j runs over 1..{b - 1}, summing to {sb}.",
             f"{sa} * {sb} = {sa * sb}."]
    return f"sum(i * j for i in range(1, {a}) for j in range(1, {b}))", steps, sa * sb


def _upper_filter(rng: random.Random):
    words, n = rng.sample(WORDS, 5), rng.randint(4, 5)
    kept = [w.upper() for w in words if len(w) > n]
    steps = [f"Keep the words longer than {n} characters: {[w for w in words if len(w) > n]}.",
             f"Upper-case each: {kept}."]
    return f"[w.upper() for w in {words} if len(w) > {n}]", steps, kept


_EXPRESSIONS = {
    "basic": (_floor_mod, _len_mul, _power),
    "advanced": (_sum_squares, _filter_comp, _slice, _sorted_pick),
    "expert": (_distinct_chars, _max_key, _double_sum, _upper_filter),
}


def python_eval(rng: random.Random, difficulty: str) -> Draft:
    code, steps, value = rng.choice(_EXPRESSIONS[difficulty])(rng)
    return _draft(_EVAL_PROMPT, code, steps, value)


# ---------------------------------------------------------------- programs
def _accumulate(rng: random.Random):
    if rng.random() < 0.3:  # a factorial: few variants, so it is the rarer branch
        start, a, b, step, op = 1, 1, rng.randint(4, 7), 1, "*"
    else:
        start, a, step, op = rng.randint(0, 10), rng.randint(0, 5), rng.randint(1, 3), "+"
        b = a + rng.randint(6, 15)
    rng_text = f"range({a}, {b})" if step == 1 else f"range({a}, {b}, {step})"
    code = f"total = {start}\nfor i in {rng_text}:\n    total {op}= i\nprint(total)"
    total, steps = start, [f"{rng_text} gives {', '.join(map(str, range(a, b, step)))}."]
    for i in range(a, b, step):
        new = total + i if op == "+" else total * i
        steps.append(f"i = {i}: total = {total} {op} {i} = {new}.")
        total = new
    steps.append(f"The loop ends and prints {total}.")
    return code, steps, str(total)


def _reverse(rng: random.Random):
    word = rng.choice(WORDS)
    code = f'out = ""\nfor ch in {word!r}:\n    out = ch + out\nprint(out)'
    out, steps = "", ["Each character is put in front of what was built so far."]
    for ch in word:
        steps.append(f"ch = {ch!r}: out = {ch + out!r}.")
        out = ch + out
    steps.append(f"print shows the string without quotes: {out}.")
    return code, steps, out


def _branchy(rng: random.Random):
    values, k, bonus = [rng.randint(1, 20) for _ in range(6)], rng.randint(2, 3), rng.randint(2, 5)
    code = (f"score = 0\nfor x in {values}:\n    if x % {k} == 0:\n        score += x\n"
            f"    else:\n        score -= {bonus}\nprint(score)")
    score, steps = 0, []
    for x in values:
        if x % k == 0:
            steps.append(f"x = {x} is divisible by {k}: score = {score} + {x} = {score + x}.")
            score += x
        else:
            steps.append(f"x = {x} is not divisible by {k}: score = {score} - {bonus} = {score - bonus}.")
            score -= bonus
    steps.append(f"After the loop it prints {score}.")
    return code, steps, str(score)


def _collatz(rng: random.Random):
    n = rng.choice([3, 5, 6, 7, 9, 10, 12, 13, 17, 20, 24, 40])
    code = ("n = {n}\nsteps = 0\nwhile n != 1:\n    if n % 2 == 0:\n        n = n // 2\n"
            "    else:\n        n = 3 * n + 1\n    steps += 1\nprint(steps)").format(n=n)
    path = [n]
    while path[-1] != 1:
        path.append(path[-1] // 2 if path[-1] % 2 == 0 else 3 * path[-1] + 1)
    steps = ["Even n is halved, odd n becomes 3n + 1, until n is 1.",
             "n goes " + " -> ".join(map(str, path)) + ".",
             f"That is {len(path) - 1} updates, so steps is {len(path) - 1}."]
    return code, steps, str(len(path) - 1)


def _euclid_loop(rng: random.Random):
    g = rng.randint(2, 9)
    a, b = g * rng.randint(3, 15), g * rng.randint(2, 12)
    code = f"a, b = {a}, {b}\ncount = 0\nwhile b:\n    a, b = b, a % b\n    count += 1\nprint(a, count)"
    steps, count = [], 0
    while b:
        steps.append(f"a, b = {b}, {a} % {b}, so a = {b} and b = {a % b}.")
        a, b = b, a % b
        count += 1
    steps.append(f"b is 0 after {count} rounds; print shows a and count separated by a space: {a} {count}.")
    return code, steps, f"{a} {count}"


_PROGRAMS = {
    "basic": (_accumulate, _accumulate, _reverse),
    "advanced": (_branchy,),
    "expert": (_collatz, _euclid_loop),
}


def python_trace(rng: random.Random, difficulty: str) -> Draft:
    code, steps, printed = rng.choice(_PROGRAMS[difficulty])(rng)
    steps.append(f"So the program prints {printed}.")
    return Draft(_TRACE_PROMPT.format(code=code), tuple(steps), printed)


CODE_FAMILIES = {"python_eval": python_eval, "python_trace": python_trace}
