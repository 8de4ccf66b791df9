"""Math task families: each turns (rng, difficulty) into a worked ``Draft``.

A family picks its parameters from the difficulty (more operations, larger
numbers, fractional answers), computes the answer exactly with ``Fraction``
and writes the steps a careful person would write. ``tasks.py`` wraps a Draft
into the reasoning format; the helpers here (``fmt_num``, ``fmt_list``) are
the canonical answer spellings that ``tasks.check_answer`` parses back.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction


@dataclass(frozen=True)
class Draft:
    prompt: str
    steps: tuple[str, ...]
    answer: str


def fmt_num(x) -> str:
    """Canonical number: an integer, an exact decimal of <= 6 places, else p/q."""
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    den = x.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den == 1 and len(str(x.denominator)) <= 6:
        return format(Decimal(x.numerator) / Decimal(x.denominator), "f")
    return f"{x.numerator}/{x.denominator}"


def fmt_frac(x: Fraction) -> str:
    """A fraction as p/q (integers stay integers): the natural spelling for fraction tasks."""
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def fmt_list(values) -> str:
    """Lists spell like Python literals so that ``ast.literal_eval`` reads them back."""
    return "[" + ", ".join(repr(v) if isinstance(v, str) else fmt_num(v) for v in values) + "]"


def level(difficulty: str, basic, advanced, expert):
    """Pick the parameter set of a difficulty."""
    return {"basic": basic, "advanced": advanced, "expert": expert}[difficulty]


# ---------------------------------------------------------------- arithmetic
_PREC = {"+": 1, "-": 1, "*": 2}


def _tree(rng: random.Random, n_ops: int, hi: int):
    """A random expression tree; products keep a small leaf on the right so values stay readable."""
    if n_ops == 0:
        return rng.randint(1, hi)
    op = rng.choice("+-*+-")
    if op == "*":
        return (op, _tree(rng, n_ops - 1, hi), rng.randint(2, 12))
    left = rng.randint(0, n_ops - 1)
    return (op, _tree(rng, left, hi), _tree(rng, n_ops - 1 - left, hi))


def _render(t) -> str:
    if isinstance(t, int):
        return str(t) if t >= 0 else f"({t})"
    op, a, b = t
    left, right = _render(a), _render(b)
    if not isinstance(a, int) and _PREC[a[0]] < _PREC[op]:
        left = f"({left})"
    if not isinstance(b, int) and _PREC[b[0]] <= _PREC[op]:
        right = f"({right})"  # keeps the written order equal to the order we reduce in
    return f"{left} {op} {right}"


def _reduce_once(t):
    """Reduce the leftmost innermost operation; return (new tree, (a, op, b, value))."""
    op, a, b = t
    if not isinstance(a, int):
        new_a, info = _reduce_once(a)
        return (op, new_a, b), info
    if not isinstance(b, int):
        new_b, info = _reduce_once(b)
        return (op, a, new_b), info
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return value, (a, op, b, value)


def arithmetic(rng: random.Random, difficulty: str) -> Draft:
    n_ops, hi = level(difficulty, (2, 20), (rng.randint(3, 4), 50), (rng.randint(5, 6), 99))
    tree = _tree(rng, n_ops, hi)
    expr = _render(tree)
    steps = []
    while not isinstance(tree, int):
        tree, (a, op, b, value) = _reduce_once(tree)
        rest = "" if isinstance(tree, int) else f", so the expression becomes {_render(tree)}"
        steps.append(f"{_render(a)} {op} {_render(b)} = {value}{rest}.")
    steps.append(f"So the value is {tree}.")
    prompt = rng.choice(["Evaluate {e}.", "What is the value of {e}?", "Compute {e}."]).format(e=expr)
    return Draft(prompt, tuple(steps), str(tree))


# ---------------------------------------------------------------- linear equations
def _lin(a: int, b: int) -> str:
    """a*x + b written the way people write it."""
    coef = {1: "x", -1: "-x", 0: ""}.get(a, f"{a}x")
    if not coef:
        return str(b)
    return coef if b == 0 else f"{coef} {'+' if b > 0 else '-'} {abs(b)}"


def _paren(n: int) -> str:
    return f"({n})" if n < 0 else str(n)


def _move(value: int, what: str = "") -> str:
    """'Subtract 5 from both sides' or 'Add 5 to both sides', never 'Subtract -5'."""
    shown = _lin(abs(value), 0) if what == "x" else str(abs(value))
    return f"Subtract {shown} from both sides" if value > 0 else f"Add {shown} to both sides"


def linear_equation(rng: random.Random, difficulty: str) -> Draft:
    a = rng.choice([n for n in range(-9, 10) if n not in (0, 1, -1)])
    c = 0 if difficulty == "basic" else rng.choice([n for n in range(-6, 7) if n != a])
    if difficulty == "expert":
        den = abs(a - c) if abs(a - c) > 1 else 1
        return _linear_expanded(rng, a, c, Fraction(rng.randint(-20, 20), den))
    x, b = rng.randint(-12, 12), rng.randint(-20, 20)
    d = a * x + b - c * x
    steps = []
    if c:
        steps.append(f"{_move(c, 'x')}: {_lin(a - c, b)} = {d}.")
    if b:
        steps.append(f"{_move(b)}: {_lin(a - c, 0)} = {d - b}.")
    steps.append(f"Divide both sides by {a - c}: x = {_paren(d - b)} / {_paren(a - c)} = {x}.")
    steps.append(f"Check: with x = {x} the left side is {a * x + b} and the right side is "
                 f"{c * x + d}, which agree.")
    steps.append(f"So x = {x}.")
    return Draft(f"Solve for x: {_lin(a, b)} = {_lin(c, d)}.", tuple(steps), str(x))


def _linear_expanded(rng: random.Random, a: int, c: int, x: Fraction) -> Draft:
    """a(x + k) = cx + d: one more step (expanding) and often a fractional root."""
    k = rng.choice([n for n in range(-9, 10) if n != 0])
    d = a * (x + k) - c * x
    assert d.denominator == 1  # x's denominator divides a - c by construction
    d = int(d)
    inner = f"x {'+' if k > 0 else '-'} {abs(k)}"
    steps = [f"Expand the left side: {a}({inner}) = {_lin(a, a * k)}."]
    if c:
        steps.append(f"{_move(c, 'x')}: {_lin(a - c, a * k)} = {d}.")
    steps += [
        f"{_move(a * k)}: {_lin(a - c, 0)} = {d - a * k}.",
        f"Divide both sides by {a - c}: x = {_paren(d - a * k)} / {_paren(a - c)} = {fmt_frac(x)}.",
        f"Check: the left side is {a} * ({fmt_frac(x + k)}) = {fmt_frac(a * (x + k))}, "
        f"the right side is {c} * ({fmt_frac(x)}) + {d} = {fmt_frac(c * x + d)}.",
        f"So x = {fmt_frac(x)}.",
    ]
    return Draft(f"Solve for x: {a}({inner}) = {_lin(c, d)}.", tuple(steps), fmt_frac(x))


# ---------------------------------------------------------------- fractions
def _rand_frac(rng: random.Random, max_den: int) -> Fraction:
    den = rng.randint(2, max_den)
    return Fraction(rng.choice([n for n in range(1, 2 * den) if n % den]), den)


def _add_steps(x: Fraction, y: Fraction, sign: int) -> tuple[list[str], Fraction]:
    lcd = math.lcm(x.denominator, y.denominator)
    xn, yn = x.numerator * (lcd // x.denominator), y.numerator * (lcd // y.denominator)
    op = "+" if sign > 0 else "-"
    total = x + sign * y
    steps = [f"The common denominator of {fmt_frac(x)} and {fmt_frac(y)} is {lcd}: "
             f"{fmt_frac(x)} = {xn}/{lcd} and {fmt_frac(y)} = {yn}/{lcd}.",
             f"{xn}/{lcd} {op} {yn}/{lcd} = {xn + sign * yn}/{lcd}"
             + (f", which simplifies to {fmt_frac(total)}." if total.denominator != lcd else ".")]
    return steps, total


def _mul_steps(x: Fraction, y: Fraction, divide: bool) -> tuple[list[str], Fraction]:
    steps = []
    if divide:
        steps.append(f"Dividing by {fmt_frac(y)} is multiplying by its reciprocal {fmt_frac(1 / y)}.")
        y = 1 / y
    raw_num, raw_den = x.numerator * y.numerator, x.denominator * y.denominator
    product = x * y
    tail = f", which simplifies to {fmt_frac(product)}" if product.denominator != raw_den else ""
    steps.append(f"{fmt_frac(x)} * {fmt_frac(y)} = {raw_num}/{raw_den}{tail}.")
    return steps, product


def fraction(rng: random.Random, difficulty: str) -> Draft:
    x, y = _rand_frac(rng, 9), _rand_frac(rng, 9)
    if difficulty == "basic":
        steps, value = _add_steps(x, y, 1)
        prompt = f"Add {fmt_frac(x)} + {fmt_frac(y)} and simplify."
    else:
        z = _rand_frac(rng, 9 if difficulty == "advanced" else 12)
        sign = 1 if difficulty == "expert" else -1
        steps, partial = _add_steps(x, y, sign)
        more, value = _mul_steps(partial, z, divide=difficulty == "expert")
        steps += more
        op = "÷" if difficulty == "expert" else "*"
        prompt = (f"Compute ({fmt_frac(x)} {'+' if sign > 0 else '-'} {fmt_frac(y)}) {op} "
                  f"({fmt_frac(z)}) and give the result as a simplified fraction.")
    steps.append(f"So the result is {fmt_frac(value)}.")
    return Draft(prompt, tuple(steps), fmt_frac(value))


# ---------------------------------------------------------------- modular arithmetic
def modular(rng: random.Random, difficulty: str) -> Draft:
    m = rng.randint(*level(difficulty, (3, 12), (5, 19), (7, 47)))
    if difficulty == "basic":
        a = rng.randint(10, 300)
        q, r = divmod(a, m)
        steps = (f"Divide {a} by {m}: {a} = {q} * {m} + {r}.", f"So {a} mod {m} = {r}.")
        return Draft(f"What is {a} mod {m}?", steps, str(r))
    if difficulty == "advanced":
        a, b, c = rng.randint(20, 500), rng.randint(20, 500), rng.randint(1, 99)
        ra, rb, rc = a % m, b % m, c % m
        r = (ra * rb + rc) % m
        steps = (f"Reduce each number first: {a} mod {m} = {ra}, {b} mod {m} = {rb}, {c} mod {m} = {rc}.",
                 f"Then {ra} * {rb} + {rc} = {ra * rb + rc}.",
                 f"{ra * rb + rc} mod {m} = {r}.", f"So the remainder is {r}.")
        return Draft(f"What is ({a} * {b} + {c}) mod {m}?", steps, str(r))
    return _power_mod(rng.randint(2, 30), rng.randint(10, 70), m)


def _power_mod(a: int, e: int, m: int) -> Draft:
    """Square-and-multiply: the squares a^(2^k) mod m, then the product over e's binary digits."""
    bits = [k for k in range(e.bit_length()) if e >> k & 1]
    squares, sq = [], a % m
    steps = [f"Write {e} in binary: {e:b}, so {e} = " + " + ".join(str(1 << k) for k in bits) + "."]
    for k in range(e.bit_length()):
        squares.append(sq)
        steps.append(f"{a}^{1 << k} mod {m} = {sq}.")
        sq = sq * sq % m
    result = 1
    for k in bits:
        new = result * squares[k] % m
        steps.append(f"Multiply in {a}^{1 << k}: {result} * {squares[k]} mod {m} = {new}.")
        result = new
    steps.append(f"So {a}^{e} mod {m} = {result}.")
    return Draft(f"Compute {a}^{e} mod {m}.", tuple(steps), str(result))


# ---------------------------------------------------------------- gcd / lcm
def _euclid_steps(a: int, b: int) -> tuple[list[str], int]:
    steps = []
    while b:
        steps.append(f"{a} = {a // b} * {b} + {a % b}.")
        a, b = b, a % b
    steps.append(f"The last nonzero remainder is {a}, so the gcd is {a}.")
    return steps, a


def gcd_lcm(rng: random.Random, difficulty: str) -> Draft:
    g = rng.randint(2, level(difficulty, 12, 15, 9))
    a, b = g * rng.randint(2, 20), g * rng.randint(2, 20)
    if difficulty == "basic":
        steps, gcd = _euclid_steps(max(a, b), min(a, b))
        return Draft(f"Find the greatest common divisor of {a} and {b}.", tuple(steps), str(gcd))
    steps, gcd = _euclid_steps(max(a, b), min(a, b))
    lcm = a * b // gcd
    steps.append(f"lcm({a}, {b}) = {a} * {b} / {gcd} = {lcm}.")
    if difficulty == "advanced":
        steps.append(f"So the least common multiple is {lcm}.")
        return Draft(f"Find the least common multiple of {a} and {b}.", tuple(steps), str(lcm))
    c = g * rng.randint(2, 12)
    more, gcd2 = _euclid_steps(max(lcm, c), min(lcm, c))
    total = lcm * c // gcd2
    steps += [f"Now combine {lcm} with {c}."] + more
    steps += [f"lcm({lcm}, {c}) = {lcm} * {c} / {gcd2} = {total}.",
              f"So the least common multiple of {a}, {b} and {c} is {total}."]
    return Draft(f"Find the least common multiple of {a}, {b} and {c}.", tuple(steps), str(total))


# ---------------------------------------------------------------- sequences
def sequence(rng: random.Random, difficulty: str) -> Draft:
    kind = level(difficulty, "arithmetic", rng.choice(["geometric", "quadratic"]),
                 rng.choice(["fibonacci", "quadratic"]))
    terms, steps, nxt = _SEQUENCES[kind](rng, difficulty)
    steps.append(f"So the next term is {nxt}.")
    shown = ", ".join(str(t) for t in terms)
    prompt = rng.choice(["What is the next term of the sequence {s}, ...?",
                         "Find the next number in the sequence: {s}, ?"]).format(s=shown)
    return Draft(prompt, tuple(steps), str(nxt))


def _arith_seq(rng, difficulty):
    start, diff = rng.randint(-20, 40), rng.choice([n for n in range(-9, 12) if n])
    terms = [start + diff * i for i in range(5)]
    steps = [f"The differences between consecutive terms are all {diff}.",
             f"Add {diff} to the last term: {terms[-1]} {'+' if diff > 0 else '-'} {abs(diff)} = "
             f"{terms[-1] + diff}."]
    return terms, steps, terms[-1] + diff


def _geom_seq(rng, difficulty):
    start, ratio = rng.randint(1, 9), rng.choice([2, 3, -2, 4])
    terms = [start * ratio ** i for i in range(5)]
    steps = [f"Each term is {ratio} times the one before: {terms[1]} / {terms[0]} = {ratio}.",
             f"Multiply the last term by {ratio}: {terms[-1]} * {ratio} = {terms[-1] * ratio}."]
    return terms, steps, terms[-1] * ratio


def _quad_seq(rng, difficulty):
    a, b, c = rng.randint(1, 4), rng.randint(-5, 6), rng.randint(-10, 10)
    n_terms = 5 if difficulty == "advanced" else 6
    terms = [a * n * n + b * n + c for n in range(1, n_terms + 1)]
    diffs = [y - x for x, y in zip(terms, terms[1:])]
    nxt_diff = diffs[-1] + 2 * a
    steps = [f"First differences: {', '.join(map(str, diffs))}.",
             f"The second differences are all {2 * a}, so the next first difference is "
             f"{diffs[-1]} + {2 * a} = {nxt_diff}.",
             f"Add it to the last term: {terms[-1]} + {nxt_diff} = {terms[-1] + nxt_diff}."]
    return terms, steps, terms[-1] + nxt_diff


def _fib_seq(rng, difficulty):
    terms = [rng.randint(1, 9), rng.randint(1, 9)]
    while len(terms) < 7:
        terms.append(terms[-1] + terms[-2])
    steps = [f"Each term is the sum of the two before it: {terms[0]} + {terms[1]} = {terms[2]}, "
             f"{terms[1]} + {terms[2]} = {terms[3]}.",
             f"The next term is {terms[-2]} + {terms[-1]} = {terms[-2] + terms[-1]}."]
    return terms, steps, terms[-2] + terms[-1]


_SEQUENCES = {"arithmetic": _arith_seq, "geometric": _geom_seq,
              "quadratic": _quad_seq, "fibonacci": _fib_seq}

MATH_FAMILIES = {
    "arithmetic": arithmetic, "linear_equation": linear_equation, "fraction": fraction,
    "modular": modular, "gcd_lcm": gcd_lcm, "sequence": sequence,
}
