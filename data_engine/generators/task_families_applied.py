"""Applied task families: unit conversion, rates, word problems, sorting, counting.

Same contract as ``task_families``: (rng, difficulty) -> Draft with exact
answers. Quantities are chosen so that answers are integers or short decimals
at the lower levels, and may be fractions at ``expert``.
"""
from __future__ import annotations

import itertools
import random
from fractions import Fraction

from data_engine.generators.task_families import Draft, fmt_list, fmt_num, level

NAMES = ("Ava", "Ben", "Chen", "Dara", "Eli", "Farah", "Gus", "Hana", "Ivan", "Jade",
         "Kofi", "Lena", "Mia", "Noah", "Omar", "Priya", "Rosa", "Sam", "Tariq", "Yuki")
ITEMS = (("notebook", "notebooks"), ("pen", "pens"), ("apple", "apples"), ("ticket", "tickets"),
         ("mug", "mugs"), ("book", "books"), ("sandwich", "sandwiches"), ("plant", "plants"))
WORDS = ("fig", "kiwi", "pear", "plum", "apple", "mango", "lemon", "grape", "melon", "cherry",
         "banana", "orange", "papaya", "apricot", "avocado", "coconut", "date", "lime")

# (from unit, to unit, factor): value_in_to = value_in_from * factor
_SIMPLE_UNITS = (("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("hours", "minutes", 60),
                 ("minutes", "seconds", 60), ("L", "mL", 1000), ("cm", "mm", 10), ("days", "hours", 24))


_SINGULAR = {"hours": "hour", "minutes": "minute", "seconds": "second", "days": "day"}


def _times(n: int, word: str = "time") -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _money(x: Fraction) -> str:
    return f"${fmt_num(x)}" if x.denominator == 1 else f"${float(x):.2f}"


# ---------------------------------------------------------------- unit conversion
def unit_conversion(rng: random.Random, difficulty: str) -> Draft:
    if difficulty == "expert":
        return _speed_conversion(rng)
    src, dst, factor = rng.choice(_SIMPLE_UNITS)
    if difficulty == "basic":
        value = Fraction(rng.randint(2, 90), rng.choice([1, 1, 2]))
        result = value * factor
        steps = [f"1 {_SINGULAR.get(src, src)} = {factor} {dst}.",
                 f"{fmt_num(value)} {src} = {fmt_num(value)} * {factor} {dst} = {fmt_num(result)} {dst}."]
        return Draft(f"Convert {fmt_num(value)} {src} to {dst}.", tuple(steps + [
            f"So the answer is {fmt_num(result)}."]), fmt_num(result))
    # advanced: the other direction, so the step is a division with a decimal result
    den = rng.choice([d for d in (1, 2, 4, 5, 10) if factor % d == 0])
    result = Fraction(rng.randint(1, 40 * den), den)
    value = int(result * factor)
    steps = [f"1 {_SINGULAR.get(src, src)} = {factor} {dst}, so to go from {dst} to {src} "
             f"divide by {factor}.",
             f"{value} / {factor} = {fmt_num(result)}.", f"So {value} {dst} is {fmt_num(result)} {src}."]
    return Draft(f"How many {src} are {value} {dst}?", tuple(steps), fmt_num(result))


def _speed_conversion(rng: random.Random) -> Draft:
    """km/h <-> m/s: two factors at once (1000 m per km, 3600 s per h)."""
    if rng.random() < 0.5:
        kmh = 9 * rng.randint(2, 30)  # multiples of 9 keep m/s at halves
        ms = Fraction(kmh * 1000, 3600)
        steps = ["1 km/h = 1000 m / 3600 s = 5/18 m/s.",
                 f"{kmh} * 5/18 = {kmh * 5}/18 = {fmt_num(ms)}.", f"So the speed is {fmt_num(ms)} m/s."]
        return Draft(f"A car travels at {kmh} km/h. What is its speed in m/s?", tuple(steps), fmt_num(ms))
    ms = rng.randint(3, 60)
    kmh = Fraction(ms * 3600, 1000)
    steps = ["1 m/s = 3600 m per hour = 3.6 km/h.",
             f"{ms} * 3.6 = {fmt_num(kmh)}.", f"So the speed is {fmt_num(kmh)} km/h."]
    return Draft(f"A runner moves at {ms} m/s. What is that in km/h?", tuple(steps), fmt_num(kmh))


# ---------------------------------------------------------------- rates
def rate(rng: random.Random, difficulty: str) -> Draft:
    name = rng.choice(NAMES)
    if difficulty == "basic":
        speed, hours = rng.randint(3, 25) * 2, rng.randint(2, 9)
        steps = ("Distance = speed * time.", f"{speed} * {hours} = {speed * hours}.",
                 f"So {name} covers {speed * hours} km.")
        prompt = f"{name} cycles at {speed} km/h for {hours} hours. How many kilometres does {name} cover?"
        return Draft(prompt, steps, str(speed * hours))
    if difficulty == "advanced":
        return _average_speed(rng, name)
    return rng.choice([_work_rate, _meeting_time])(rng)


def _average_speed(rng: random.Random, name: str) -> Draft:
    v1, v2 = rng.sample([20, 30, 40, 45, 60, 75, 80, 90], 2)
    t1, t2 = rng.randint(1, 4), rng.randint(1, 4)
    d1, d2 = v1 * t1, v2 * t2
    avg = Fraction(d1 + d2, t1 + t2)
    steps = (f"The first leg takes {d1} / {v1} = {t1} h and the second {d2} / {v2} = {t2} h.",
             f"Total distance {d1} + {d2} = {d1 + d2} km, total time {t1} + {t2} = {t1 + t2} h.",
             "Average speed is total distance over total time, not the mean of the two speeds.",
             f"{d1 + d2} / {t1 + t2} = {fmt_num(avg)}.", f"So the average speed is {fmt_num(avg)} km/h.")
    prompt = (f"{name} drives {d1} km at {v1} km/h and then {d2} km at {v2} km/h. "
              "What is the average speed for the whole trip, in km/h?")
    return Draft(prompt, steps, fmt_num(avg))


def _work_rate(rng: random.Random) -> Draft:
    a, b = rng.sample(range(2, 13), 2)
    together = Fraction(a * b, a + b)
    steps = (f"Pipe A fills 1/{a} of the tank per hour and pipe B fills 1/{b}.",
             f"Together: 1/{a} + 1/{b} = {b}/{a * b} + {a}/{a * b} = {a + b}/{a * b} of the tank per hour.",
             f"Time = 1 / ({a + b}/{a * b}) = {a * b}/{a + b} = {fmt_num(together)} hours.",
             f"So they need {fmt_num(together)} hours.")
    prompt = (f"Pipe A fills a tank in {a} hours and pipe B fills it in {b} hours. "
              "How many hours do they need working together?")
    return Draft(prompt, steps, fmt_num(together))


def _meeting_time(rng: random.Random) -> Draft:
    v1, v2 = rng.randint(4, 16) * 5, rng.randint(4, 16) * 5
    dist = rng.randint(3, 30) * 10
    t = Fraction(dist, v1 + v2)
    steps = (f"The trains approach each other, so the gap closes at {v1} + {v2} = {v1 + v2} km/h.",
             f"Time = distance / closing speed = {dist} / {v1 + v2} = {fmt_num(t)} hours.",
             f"So they meet after {fmt_num(t)} hours.")
    prompt = (f"Two trains start {dist} km apart and travel toward each other at {v1} km/h and "
              f"{v2} km/h. After how many hours do they meet?")
    return Draft(prompt, steps, fmt_num(t))


# ---------------------------------------------------------------- word problems
def word_problem(rng: random.Random, difficulty: str) -> Draft:
    name = rng.choice(NAMES)
    if difficulty == "basic":
        return _change(rng, name)
    if difficulty == "advanced":
        return _discount(rng, name)
    return _ages(rng, name, rng.choice([n for n in NAMES if n != name]))


def _change(rng: random.Random, name: str) -> Draft:
    (one, many), count, price = rng.choice(ITEMS), rng.randint(2, 9), rng.randint(1, 9)
    bill = next(b for b in (10, 20, 50, 100) if b >= count * price)
    cost = count * price
    steps = (f"Cost: {count} * ${price} = ${cost}.", f"Change: ${bill} - ${cost} = ${bill - cost}.",
             f"So {name} gets ${bill - cost} back.")
    prompt = (f"{name} buys {count} {many} at ${price} each and pays with a ${bill} bill. "
              f"How many dollars of change does {name} get?")
    return Draft(prompt, steps, str(bill - cost))


def _discount(rng: random.Random, name: str) -> Draft:
    (_, many1), (_, many2) = rng.sample(ITEMS, 2)
    n1, p1, n2, p2 = rng.randint(2, 6), rng.randint(2, 15), rng.randint(2, 4), rng.randint(5, 30)
    pct = rng.choice([10, 20, 25, 50])
    subtotal = n1 * p1 + n2 * p2
    total = Fraction(subtotal * (100 - pct), 100)
    steps = (f"{many1.capitalize()}: {n1} * ${p1} = ${n1 * p1}. "
             f"{many2.capitalize()}: {n2} * ${p2} = ${n2 * p2}.",
             f"Subtotal: ${n1 * p1} + ${n2 * p2} = ${subtotal}.",
             f"A {pct}% discount leaves {100 - pct}% of the price: "
             f"{subtotal} * {100 - pct}/100 = {fmt_num(total)}.",
             f"So {name} pays {_money(total)}.")
    prompt = (f"{name} buys {n1} {many1} at ${p1} each and {n2} {many2} at ${p2} each. The shop "
              f"takes {pct}% off the whole bill. How many dollars does {name} pay?")
    return Draft(prompt, steps, fmt_num(total))


def _ages(rng: random.Random, older: str, younger: str) -> Draft:
    k, young, years = rng.randint(2, 5), rng.randint(3, 15), rng.randint(2, 10)
    total = (k + 1) * young + 2 * years
    steps = (f"Let {younger}'s age now be y; then {older} is {k}y.",
             f"In {years} years their ages are y + {years} and {k}y + {years}, which sum to {total}.",
             f"So {k + 1}y + {2 * years} = {total}, giving {k + 1}y = {total - 2 * years}.",
             f"y = {total - 2 * years} / {k + 1} = {young}, so {older} is {k} * {young} = {k * young}.",
             f"So {older} is {k * young} years old now.")
    prompt = (f"{older} is {k} times as old as {younger}. In {years} years the sum of their ages "
              f"will be {total}. How old is {older} now?")
    return Draft(prompt, steps, str(k * young))


# ---------------------------------------------------------------- sorting
def list_sort(rng: random.Random, difficulty: str) -> Draft:
    if difficulty == "expert":
        return _sort_words(rng)
    size, lo, hi = level(difficulty, (5, 0, 50), (7, -50, 50), None)
    values = rng.sample(range(lo, hi + 1), size)
    descending = difficulty == "advanced"
    remaining, steps, out = list(values), [], []
    while remaining:
        pick = max(remaining) if descending else min(remaining)
        remaining.remove(pick)
        out.append(pick)
        steps.append(f"The {'largest' if descending else 'smallest'} of what is left is {pick}; "
                     f"sorted so far: {fmt_list(out)}.")
    steps.append(f"So the sorted list is {fmt_list(out)}.")
    order = "descending" if descending else "ascending"
    return Draft(f"Sort the list {fmt_list(values)} in {order} order.", tuple(steps), fmt_list(out))


def _sort_words(rng: random.Random) -> Draft:
    words = rng.sample(WORDS, 6)
    steps = []
    for size, group in itertools.groupby(sorted(words, key=len), key=len):
        steps.append(f"Length {size}: " + ", ".join(sorted(group)) + " (alphabetical within the length).")
    out = sorted(words, key=lambda w: (len(w), w))
    steps.append(f"So the sorted list is {fmt_list(out)}.")
    prompt = (f"Sort the words {fmt_list(words)} by length, shortest first, breaking ties "
              "alphabetically. Answer with a list.")
    return Draft(prompt, tuple(steps), fmt_list(out))


# ---------------------------------------------------------------- counting
def counting(rng: random.Random, difficulty: str) -> Draft:
    if difficulty == "basic":
        values = [rng.randint(1, 6) for _ in range(rng.randint(8, 12))]
        target = rng.choice(values)
        hits = [i + 1 for i, v in enumerate(values) if v == target]
        steps = (f"Scan the list: {target} appears at position{'s' * (len(hits) > 1)} "
                 f"{', '.join(map(str, hits))}.",
                 f"So {target} appears {_times(len(hits))}.")
        return Draft(f"How many times does {target} appear in {fmt_list(values)}?", steps, str(len(hits)))
    if difficulty == "advanced":
        values, k = [rng.randint(0, 60) for _ in range(10)], rng.randint(10, 40)
        hits = [v for v in values if v % 2 == 0 and v > k]
        steps = (f"Even numbers: {fmt_list([v for v in values if v % 2 == 0])}.",
                 f"Of those, greater than {k}: {fmt_list(hits)}.", f"So the count is {len(hits)}.")
        prompt = f"How many numbers in {fmt_list(values)} are even and greater than {k}?"
        return Draft(prompt, steps, str(len(hits)))
    return _count_pairs(rng)


def _count_pairs(rng: random.Random) -> Draft:
    values = rng.sample(range(1, 20), 8)
    target = rng.choice([a + b for a, b in itertools.combinations(values, 2)])
    pairs = [(a, b) for a, b in itertools.combinations(values, 2) if a + b == target]
    steps = [f"For each number x, look for {target} - x later in the list."]
    steps += [f"{a} + {b} = {target}." for a, b in pairs]
    steps.append(f"So there {'is' if len(pairs) == 1 else 'are'} {_times(len(pairs), 'such pair')}.")
    prompt = (f"How many pairs of different positions in {fmt_list(values)} hold numbers "
              f"that add up to {target}?")
    return Draft(prompt, tuple(steps), str(len(pairs)))


APPLIED_FAMILIES = {
    "unit_conversion": unit_conversion, "rate": rate, "word_problem": word_problem,
    "list_sort": list_sort, "counting": counting,
}
