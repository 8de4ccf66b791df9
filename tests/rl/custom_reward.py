"""A user's reward function, given to a recipe by import path (tests/rl/test_rewards.py)."""


def says_please(samples, **params):
    return [1.0 if "please" in s.completion else 0.0 for s in samples]


def wrong_length(samples, **params):
    return [1.0]
