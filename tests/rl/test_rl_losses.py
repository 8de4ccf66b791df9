"""RL losses against hand-computed values: PPO clip (clip-higher, dual clip), GSPO, aggregation,
KL estimators, value clipping, entropy."""
import math

import pytest
import torch


def close(actual, expected):
    torch.testing.assert_close(actual.float(), torch.as_tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)

from rl.losses import aggregate, aggregate_parts, entropy_from_logits, kl_penalty, policy_loss, value_loss


def ratio_logps(ratios):
    old = torch.zeros(1, len(ratios))
    return torch.log(torch.tensor([ratios])).requires_grad_(True), old


def test_ppo_clip_values_and_zero_gradient_where_clipped():
    logp, old = ratio_logps([1.5, 0.5, 1.1, 0.7])
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    out = policy_loss("ppo", logp, old, adv, mask, eps_low=0.2, eps_high=0.2)
    # -min(r A, clip(r) A): 1.5 -> clipped at 1.2; 0.5 with A<0 -> clipped at 0.8; 1.1 and 0.7 (A>0) unclipped
    close(out.loss_BT, [[-1.2, 0.8, -1.1, -0.7]])
    assert out.clipped_high_BT.tolist() == [[True, False, False, False]]
    assert out.clipped_low_BT.tolist() == [[False, True, False, False]]
    out.loss_BT.sum().backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] == 0
    assert logp.grad[0, 2] == pytest.approx(-1.1) and logp.grad[0, 3] == pytest.approx(-0.7)


def test_clip_higher_widens_only_the_upper_bound():
    logp, old = ratio_logps([1.25, 0.75])
    adv = torch.tensor([[1.0, -1.0]])
    out = policy_loss("ppo", logp, old, adv, torch.ones(1, 2, dtype=torch.bool), eps_low=0.2, eps_high=0.28)
    close(out.loss_BT, [[-1.25, 0.8]])


def test_dual_clip_caps_the_loss_of_negative_advantages():
    logp, old = ratio_logps([5.0, 5.0])
    adv = torch.tensor([[-1.0, 1.0]])
    out = policy_loss("ppo", logp, old, adv, torch.ones(1, 2, dtype=torch.bool), dual_clip=3.0)
    close(out.loss_BT, [[3.0, -1.2]])


def test_gspo_uses_the_sequence_ratio():
    logp = torch.log(torch.tensor([[2.0, 0.5, 1.0]])).requires_grad_(True)
    old = torch.zeros(1, 3)
    mask = torch.tensor([[True, True, False]])
    adv = torch.tensor([[1.0, 1.0, 0.0]])
    out = policy_loss("gspo", logp, old, adv, mask, eps_low=0.5, eps_high=0.5)
    # geometric mean of 2 and 0.5 is 1: every token's ratio is 1, the loss -A
    assert out.ratio_BT[mask].tolist() == pytest.approx([1.0, 1.0])
    close(out.loss_BT, [[-1.0, -1.0, 0.0]])
    out.loss_BT.sum().backward()
    assert logp.grad[0, :2].tolist() == pytest.approx([-1.0, -1.0])


def test_aggregations_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert float(aggregate(loss, mask, "token-mean")) == pytest.approx(10 / 4)
    assert float(aggregate(loss, mask, "seq-mean-token-mean")) == pytest.approx((2 + 4) / 2)
    assert float(aggregate(loss, mask, "seq-mean-token-sum-norm", norm_length=5)) == pytest.approx((6 / 5 + 4 / 5) / 2)
    num, den = aggregate_parts(loss, mask, "token-mean")
    assert (float(num), den) == (10.0, 4.0)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate(loss, mask, "mean")


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    x = -1.0  # log ref - log pi
    assert float(kl_penalty(logp, ref, "k1")) == pytest.approx(1.0)
    assert float(kl_penalty(logp, ref, "k2")) == pytest.approx(0.5)
    assert float(kl_penalty(logp, ref, "k3")) == pytest.approx(math.exp(x) - x - 1)
    assert float(kl_penalty(ref, ref, "k3")) == 0.0


def test_value_loss_clipping_takes_the_larger_loss():
    v, old, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    # token 1: V moved +1 from 0 -> clipped at 0.2: max(1, 0.04) / 2; token 2: V=0 stays: 0.5
    close(value_loss(v, old, ret, mask, clip=0.2), [[0.5, 0.5]])
    v2 = torch.tensor([[0.0, 0.9]])  # toward the return: clipped at 0.2 is farther -> (0.8)^2 / 2
    assert value_loss(v2, old, ret, mask, clip=0.2)[0, 1] == pytest.approx(0.32)
    assert value_loss(v2, old, ret, mask, clip=None)[0, 1] == pytest.approx(0.005)


def test_entropy_of_uniform_and_peaked_logits():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    ent = entropy_from_logits(logits, chunk_rows=1)
    close(ent, [[math.log(4), 0.0]])
