"""Which prompts RL trains on: the uniform pass and the learnability curriculum, which draws the
family x difficulty cells the policy half solves most often, still visits the others, and resumes
where it stopped."""
from collections import Counter

import pytest

from rl.sampling import LearnabilitySampler, PromptSampler

# 30 tasks in three cells of unequal size
CELLS = ["easy/basic"] * 5 + ["half/basic"] * 10 + ["hard/advanced"] * 15
ACCURACY = {"easy/basic": 1.0, "half/basic": 0.5, "hard/advanced": 0.0}


def drawn_cells(sampler, n):
    return Counter(CELLS[i] for _ in range(n) for i in sampler.take(8))


def teach(sampler, rounds=40):
    """Observe each drawn group with its cell's accuracy, as the RL loop does after scoring."""
    for _ in range(rounds):
        tasks = sampler.take(8)
        sampler.observe(tasks, [ACCURACY[CELLS[t]] for t in tasks])


def test_the_uniform_pass_draws_every_prompt_once_per_pass_and_resumes():
    s = PromptSampler(30, seed=1)
    first = s.take(30)
    assert sorted(first) == list(range(30))
    state = s.state_dict()
    again = PromptSampler(30, seed=1)
    again.load_state_dict(state)
    assert again.take(12) == s.take(12)


def test_cells_start_alike_whatever_their_size():
    counts = drawn_cells(LearnabilitySampler(CELLS, seed=0), 300)  # 2,400 draws, no observation yet
    assert all(abs(counts[c] / 2400 - 1 / 3) < 0.04 for c in ACCURACY)


def test_half_solved_cells_are_drawn_most_and_the_others_still_visited():
    s = LearnabilitySampler(CELLS, seed=0)
    teach(s)
    assert s.accuracy[s.names.index("easy/basic")] > 0.95 and s.accuracy[s.names.index("hard/advanced")] < 0.05
    counts = drawn_cells(s, 300)
    # weights p(1-p) floored at 0.02: 0.25 for the half-solved cell against ~0.02 for the others
    assert counts["half/basic"] / 2400 > 0.8
    assert counts["easy/basic"] > 0 and counts["hard/advanced"] > 0
    assert s.metrics()["curriculum/top_quarter_share"] > 0.8
    # a cell that starts being solved comes back: its weight rises as its accuracy moves to 0.5
    s.observe([15] * 5, [0.5] * 5)  # task 15 is in hard/advanced
    assert s.weights()[s.names.index("hard/advanced")] > 0.1


def test_every_prompt_of_a_cell_comes_before_any_repeats():
    s = LearnabilitySampler(CELLS, seed=3)
    half = [t for _ in range(200) for t in s.take(8) if CELLS[t] == "half/basic"]
    assert len(half) >= 10 and sorted(half[:10]) == list(range(5, 15))


def test_a_resumed_sampler_draws_what_the_uninterrupted_one_draws():
    a = LearnabilitySampler(CELLS, seed=7)
    teach(a, rounds=10)
    state = a.state_dict()
    b = LearnabilitySampler(CELLS, seed=7)
    b.load_state_dict(state)
    for _ in range(20):
        ta, tb = a.take(8), b.take(8)
        assert ta == tb
        outcome = [ACCURACY[CELLS[t]] for t in ta]
        a.observe(ta, outcome)
        b.observe(tb, outcome)
    assert a.accuracy == b.accuracy


@pytest.mark.parametrize("floor", [0.0, 0.3])
def test_a_floor_outside_its_range_is_refused(floor):
    from rl.config import RlConfig
    with pytest.raises(ValueError, match="curriculum_floor"):
        RlConfig.model_validate({"rollout": {"curriculum": "learnability", "curriculum_floor": floor}})
