"""Advantage estimators against hand-computed values on tiny batches."""
import math

import pytest
import torch


def close(actual, expected):
    torch.testing.assert_close(actual.float(), torch.as_tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)

from rl.advantages import estimate, informative_groups, token_rewards


def seq_batch(scores, T=4, lengths=None):
    """Rows whose action positions are 1..len; the score on the last one."""
    B = len(scores)
    lengths = lengths or [2] * B
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, 1:1 + n] = True
    return token_rewards(torch.tensor(scores), mask), mask


def per_row(adv_BT, mask):
    """The constant advantage of each row (group estimators give every token the same)."""
    out = []
    for a, m in zip(adv_BT, mask):
        vals = a[m]
        assert torch.allclose(vals, vals[0].expand_as(vals))
        assert (a[~m] == 0).all()
        out.append(float(vals[0]))
    return out


def test_token_rewards_put_the_score_on_the_last_action_and_kl_on_every_action():
    mask = torch.tensor([[False, True, True, False], [False, True, True, True]])
    kl = torch.full((2, 4), 0.5)
    r = token_rewards(torch.tensor([1.0, 2.0]), mask, kl, kl_coef=0.1)
    close(r, [[0, -0.05, 0.95, 0], [0, -0.05, -0.05, 1.95]])


def test_grpo_normalises_each_group_and_sums_to_zero_per_group():
    r, m = seq_batch([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 0.5, 0.5])
    adv = per_row(estimate("grpo", token_rewards_BT=r, mask_BT=m, group_size=4).advantages_BT, m)
    # group 1: mean 0.5, sample std sqrt(1/3)
    s = math.sqrt(1 / 3)
    assert adv[:4] == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], rel=1e-5)
    assert sum(adv[:4]) == pytest.approx(0, abs=1e-6) and sum(adv[4:]) == pytest.approx(0, abs=1e-6)
    # group 2: mean 1.25, std sqrt(0.75)
    assert adv[4] == pytest.approx(0.75 / math.sqrt(0.75), rel=1e-5)


def test_tied_group_has_zero_advantage_and_is_not_informative():
    r, m = seq_batch([1.0, 1.0, 0.0, 1.0])
    adv = per_row(estimate("grpo", token_rewards_BT=r, mask_BT=m, group_size=2).advantages_BT, m)
    assert adv[:2] == [0.0, 0.0]
    assert informative_groups(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2).tolist() == [False, True]


def test_dr_grpo_subtracts_the_mean_only():
    r, m = seq_batch([3.0, 1.0, 0.0, 2.0])
    adv = per_row(estimate("dr_grpo", token_rewards_BT=r, mask_BT=m, group_size=2).advantages_BT, m)
    assert adv == pytest.approx([1.0, -1.0, -1.0, 1.0])


def test_rloo_leaves_one_out():
    r, m = seq_batch([3.0, 0.0, 0.0])
    adv = per_row(estimate("rloo", token_rewards_BT=r, mask_BT=m, group_size=3).advantages_BT, m)
    assert adv == pytest.approx([3.0, -1.5, -1.5])


def test_gae_with_gamma_and_lambda_one_is_returns_minus_values():
    mask = torch.tensor([[False, True, True, True]])
    rewards = torch.tensor([[0.0, 0.5, -0.25, 2.0]])
    values = torch.tensor([[9.0, 0.3, 0.7, 1.1]])  # the value at the prompt position never counts
    out = estimate("gae", token_rewards_BT=rewards, mask_BT=mask, values_BT=values, gamma=1.0, lam=1.0, whiten=False)
    returns = torch.tensor([[0.0, 2.25, 1.75, 2.0]])
    close(out.returns_BT, returns)
    close(out.advantages_BT, returns - values * mask)


def test_gae_by_hand_with_discount():
    mask = torch.tensor([[True, True]])
    rewards, values = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.25]])
    out = estimate("gae", token_rewards_BT=rewards, mask_BT=mask, values_BT=values, gamma=0.9, lam=0.5, whiten=False)
    d1 = 1.0 - 0.25                 # last action: no next value
    d0 = 0.0 + 0.9 * 0.25 - 0.5
    close(out.advantages_BT, [[d0 + 0.9 * 0.5 * d1, d1]])


def test_gae_needs_a_critic():
    r, m = seq_batch([1.0])
    with pytest.raises(ValueError, match="needs a critic"):
        estimate("gae", token_rewards_BT=r, mask_BT=m)


def test_reinforce_pp_whitens_token_returns_over_the_batch():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    rewards = torch.tensor([[-0.1, 1.0, 0.0], [2.0, 0.0, 0.0]])
    adv = estimate("reinforce_pp", token_rewards_BT=rewards, mask_BT=mask).advantages_BT
    returns = torch.tensor([0.9, 1.0, 2.0])  # per masked token, gamma 1
    expected = (returns - returns.mean()) / returns.std(unbiased=False)
    assert adv[mask].tolist() == pytest.approx(expected.tolist(), rel=1e-4)
    assert adv[~mask].tolist() == [0.0, 0.0, 0.0]


def test_unknown_estimator_and_bad_group_are_named():
    r, m = seq_batch([1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo2'"):
        estimate("ppo2", token_rewards_BT=r, mask_BT=m)
    with pytest.raises(ValueError, match="group_size=2"):
        estimate("grpo", token_rewards_BT=r, mask_BT=m, group_size=2)


def test_whitening_over_ranks_equals_whitening_the_whole_batch():
    from rl.advantages import masked_whiten
    torch.manual_seed(0)
    x, mask = torch.randn(4, 5), torch.rand(4, 5) > 0.3
    whole = masked_whiten(x, mask)
    halves = [(x[:2], mask[:2]), (x[2:], mask[2:])]

    def sum_over_ranks(parts):  # what all_sum gives two ranks: both halves' sums
        m = [hm.float() for _, hm in halves]
        sums = [[float((hx * hm).sum()), float((hx * hx * hm).sum()), float(hm.sum())] for (hx, _), hm in zip(halves, m)]
        return [a + b for a, b in zip(*sums)]
    parts = [masked_whiten(hx, hm, sum_over_ranks=sum_over_ranks) for hx, hm in halves]
    close(torch.cat(parts), whole)
    assert float(whole[mask].mean()) == pytest.approx(0, abs=1e-6)
