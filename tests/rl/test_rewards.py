"""Each reward term on crafted completions; weights; a custom term by import path."""
import pytest

from rl.rewards import RewardParams, Rewards, Sample, conciseness, overlong, safety

GOOD = "<think>\n3 + 4 = 7\n</think>\n<answer>7</answer>"


def sample(completion, answer="7", group=0, n_tokens=10, checker="answer"):
    return Sample("What is 3 + 4?", completion, answer, checker, group=group, n_tokens=n_tokens)


def test_accuracy_and_format_read_the_text():
    r = Rewards({"accuracy": 1.0, "format": 0.5})
    scored = r.score([sample(GOOD), sample("<answer>7</answer>"), sample("<think>x</think><answer>8</answer>"),
                      sample("print(7)")])
    assert scored.terms["accuracy"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert scored.terms["format"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert scored.total_B.tolist() == [1.5, 1.0, 0.5, 0.0]


def test_python_eval_answer_is_compared_never_executed(tmp_path):
    marker = tmp_path / "ran"
    code = f"<think>x</think><answer>__import__('pathlib').Path({str(marker)!r}).write_text('x')</answer>"
    scored = Rewards({"accuracy": 1.0}).score([sample(code, answer="42")])
    assert scored.terms["accuracy"].tolist() == [0.0]
    assert not marker.exists()


def test_conciseness_is_length_against_the_budget():
    out = conciseness([sample(GOOD, n_tokens=n) for n in (0, 50, 100, 300)], length_budget=100)
    assert out == [1.0, 0.5, 0.0, -1.0]


def test_gated_conciseness_pays_only_right_answers_for_being_short():
    wrong = "<think>x</think><answer>8</answer>"
    batch = [sample(GOOD, n_tokens=50), sample(wrong, n_tokens=50), sample(wrong, n_tokens=300),
             sample(GOOD, n_tokens=300)]
    assert conciseness(batch, length_budget=100, conciseness_gate="correct") == [0.5, 0.0, -1.0, -1.0]
    assert conciseness(batch, length_budget=100) == [0.5, 0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="conciseness_gate='right'"):
        conciseness(batch, conciseness_gate="right")
    scored = Rewards({"accuracy": 1.0, "conciseness": 0.2}, RewardParams(length_budget=100, conciseness_gate="correct")
                     ).score(batch)
    assert scored.terms["conciseness"].tolist() == [0.5, 0.0, -1.0, -1.0]
    assert scored.total_B.tolist() == pytest.approx([1.1, 0.0, -0.2, 0.8])


def test_overlong_penalty_ramps_over_the_buffer():
    out = overlong([sample(GOOD, n_tokens=n) for n in (90, 96, 104, 128)], max_new_tokens=128, overlong_buffer=32)
    assert out == [0.0, 0.0, -0.25, -1.0]


def test_safety_flags_blocklist_and_pii():
    out = safety([sample(GOOD), sample("<think>mail me at jane.doe@example.com</think><answer>7</answer>"),
                  sample("<think>call +1 415 555 0132 now</think><answer>7</answer>"),
                  sample("<think>here are pipe bomb instructions</think><answer>7</answer>")])
    assert out == [0.0, -1.0, -1.0, -1.0]


def test_novelty_counts_ngrams_unseen_in_the_group_and_the_history():
    r = Rewards({"novelty": 1.0}, RewardParams(novelty_n=2))
    a, b = "alpha beta gamma", "alpha beta delta"
    scored = r.score([sample(a, group=0), sample(b, group=0), sample(a, group=1)])
    # a vs b: bigrams {alpha beta, beta gamma} / {alpha beta, beta delta}: half new each; group 1 alone: all new
    assert scored.terms["novelty"].tolist() == [0.5, 0.5, 1.0]
    r.remember([a])
    again = r.score([sample(a, group=0), sample("epsilon zeta eta", group=1)])
    assert again.terms["novelty"].tolist() == [0.0, 1.0]
    state = r.novelty.state_dict()
    fresh = Rewards({"novelty": 1.0}, RewardParams(novelty_n=2))
    fresh.novelty.load_state_dict(state)
    assert fresh.score([sample(a)]).terms["novelty"].tolist() == [0.0]


def test_every_term_is_logged_even_at_weight_zero_and_weights_combine():
    r = Rewards({"accuracy": 2.0, "conciseness": 0.0}, RewardParams(length_budget=10))
    scored = r.score([sample(GOOD, n_tokens=5)])
    assert scored.total_B.tolist() == [2.0]
    m = scored.metrics()
    assert m["reward/accuracy/mean"] == 1.0 and m["reward/format/mean"] == 1.0 and m["reward/conciseness/mean"] == 0.5


def test_custom_reward_by_import_path():
    r = Rewards({"tests.rl.custom_reward:says_please": 1.0})
    scored = r.score([sample("please " + GOOD), sample(GOOD)])
    assert scored.terms["tests.rl.custom_reward:says_please"].tolist() == [1.0, 0.0]


def test_bad_terms_are_named():
    with pytest.raises(ValueError, match="unknown reward term"):
        Rewards({"kindness": 1.0})
    with pytest.raises(ValueError, match="cannot import 'no_such_pkg.mod'"):
        Rewards({"no_such_pkg.mod:f": 1.0})
    with pytest.raises(ValueError, match="has no function 'nope'"):
        Rewards({"tests.rl.custom_reward:nope": 1.0})
    with pytest.raises(ValueError, match="must return one finite number per sample"):
        Rewards({"tests.rl.custom_reward:wrong_length": 1.0}).score([sample(GOOD), sample(GOOD)])
    with pytest.raises(ValueError, match="needs a reward model folder"):
        Rewards({"reward_model": 1.0})
