"""Preference losses against values worked out by hand (math, not torch) on tiny inputs."""
import math

import pytest
import torch

from rl.losses import PREFERENCE_LOSSES, PairLogps, bradley_terry, chosen_nll, preference_loss


def softplus(x: float) -> float:  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


def pair(pc=-10.0, pr=-14.0, rc=-11.0, rr=-12.0, nc=4, nr=7, requires_grad=False) -> PairLogps:
    t = lambda v: torch.tensor([v], dtype=torch.float64, requires_grad=requires_grad)  # noqa: E731
    return PairLogps(t(pc), t(pr), torch.tensor([nc]), torch.tensor([nr]), t(rc), t(rr))


def test_at_step_0_policy_equals_reference_and_the_losses_have_their_known_values():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(16, generator=g, dtype=torch.float64) * 50
    other = -torch.rand(16, generator=g, dtype=torch.float64) * 50
    n = torch.randint(1, 40, (16,), generator=g)
    lp = PairLogps(logp, other, n, n + 3, logp.clone(), other.clone())
    for beta in (0.05, 0.1, 0.5):
        torch.testing.assert_close(preference_loss("sigmoid", lp, beta=beta).losses_B, torch.full_like(logp, math.log(2)))
        torch.testing.assert_close(preference_loss("cdpo", lp, beta=beta, label_smoothing=0.2).losses_B,
                                   torch.full_like(logp, math.log(2)))
        torch.testing.assert_close(preference_loss("ipo", lp, beta=beta).losses_B, torch.full_like(logp, 1 / (4 * beta ** 2)))
        out = preference_loss("sigmoid", lp, beta=beta)
        assert out.chosen_rewards_B.abs().max() == 0 and out.metrics(lp)["rewards/accuracies"] == 0


def test_dpo_and_cdpo_by_hand():
    # z = (-10 - -14) - (-11 - -12) = 3; beta z = 0.3
    assert preference_loss("sigmoid", pair(), beta=0.1).losses_B.item() == pytest.approx(softplus(-0.3), abs=1e-12)
    assert preference_loss("cdpo", pair(), beta=0.1, label_smoothing=0.1).losses_B.item() == pytest.approx(
        0.9 * softplus(-0.3) + 0.1 * softplus(0.3), abs=1e-12)
    out = preference_loss("sigmoid", pair(), beta=0.1)
    m = out.metrics(pair())
    assert m["rewards/chosen"] == pytest.approx(0.1) and m["rewards/rejected"] == pytest.approx(-0.2)
    assert m["rewards/margins"] == pytest.approx(0.3) and m["rewards/accuracies"] == 1.0
    assert m["logps/chosen"] == -10 and m["logps/rejected"] == -14


def test_the_dpo_gradient_is_beta_sigmoid_of_minus_beta_z():
    lp = pair(requires_grad=True)
    preference_loss("sigmoid", lp, beta=0.1).losses_B.sum().backward()
    want = 0.1 / (1 + math.exp(0.3))  # d/d(policy_chosen) of -log sigmoid(beta z) = -beta sigmoid(-beta z)
    assert lp.policy_chosen_B.grad.item() == pytest.approx(-want, abs=1e-12)
    assert lp.policy_rejected_B.grad.item() == pytest.approx(want, abs=1e-12)


def test_ipo_by_hand_uses_per_token_averages():
    # z' = (-10/4 - -14/7) - (-11/4 - -12/7) = -0.5 + 1.0357142857 = 0.5357142857
    z = (-10 / 4 + 14 / 7) - (-11 / 4 + 12 / 7)
    assert preference_loss("ipo", pair(), beta=0.1).losses_B.item() == pytest.approx((z - 5.0) ** 2, abs=1e-12)


def test_simpo_by_hand_needs_no_reference():
    lp = pair()
    lp.ref_chosen_B = lp.ref_rejected_B = None
    # beta 2: chosen 2 * -10/4 = -5, rejected 2 * -14/7 = -4; z = -5 + 4 - 0.5 = -1.5
    out = preference_loss("simpo", lp, beta=2.0, gamma=0.5)
    assert out.losses_B.item() == pytest.approx(softplus(1.5), abs=1e-12)
    assert out.chosen_rewards_B.item() == -5 and out.rejected_rewards_B.item() == -4
    with pytest.raises(ValueError, match="reference"):
        preference_loss("sigmoid", lp, beta=0.1)


def test_bad_names_and_parameters_are_named():
    with pytest.raises(ValueError, match="unknown preference loss 'dpo2'.*'cdpo', 'ipo', 'sigmoid', 'simpo'"):
        preference_loss("dpo2", pair(), beta=0.1)
    with pytest.raises(ValueError, match="label_smoothing=0.6"):
        preference_loss("sigmoid", pair(), beta=0.1, label_smoothing=0.6)
    with pytest.raises(ValueError, match="cdpo needs label_smoothing > 0"):
        preference_loss("cdpo", pair(), beta=0.1, label_smoothing=0.0)
    assert set(PREFERENCE_LOSSES) == {"sigmoid", "cdpo", "ipo", "simpo"}


def test_bradley_terry_is_ln2_for_equal_scores_and_falls_with_the_margin():
    s = torch.tensor([0.3, -1.2, 4.0])
    torch.testing.assert_close(bradley_terry(s, s), torch.full((3,), math.log(2)))
    assert bradley_terry(torch.tensor([2.0]), torch.tensor([0.5])).item() == pytest.approx(softplus(-1.5), abs=1e-6)


def test_chosen_nll_is_the_chosen_tokens_mean_negative_log_likelihood():
    lp = PairLogps(torch.tensor([-10.0, -2.0]), torch.tensor([-1.0, -1.0]), torch.tensor([4, 1]), torch.tensor([3, 3]))
    assert chosen_nll(lp).item() == pytest.approx(12.0 / 5)  # (10 + 2) nats over 4 + 1 tokens; rejected ignored
