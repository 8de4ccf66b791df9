import math

import pytest
import torch

from training.model import MoE, ModelConfig, Transformer, flops_per_token, param_counts, switch_aux_loss


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                n_dense_layers=1, dense_hidden=48, n_experts=4, top_k=2, expert_hidden=16,
                n_shared_experts=1)
    return ModelConfig(**{**base, **kw})


def moe_cfg(**kw) -> ModelConfig:
    return tiny_cfg(**{"d_model": 4, "n_heads": 1, "n_kv_heads": None, "n_shared_experts": 0, **kw})


def test_shapes_and_losses():
    torch.manual_seed(0)
    model = Transformer(tiny_cfg())
    idx = torch.randint(0, 97, (3, 10))
    out = model(idx, idx)
    assert out.logits.shape == (3, 10, 97)
    assert out.aux_loss.shape == () and out.aux_loss > 0
    assert out.loss.shape == () and abs(out.loss.item() - math.log(97)) < 0.5  # near-uniform at init
    (out.loss + out.aux_loss).backward()
    assert model.moe_layers()[1].w_gate.grad is not None


def test_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(init_std=0.2)).eval()
    idx = torch.randint(0, 97, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (idx[:, 7] + 1) % 97
    a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=1e-6, rtol=0)
    assert (a[:, 7] - b[:, 7]).abs().max() > 1e-4


def test_last_only_returns_the_last_position():
    torch.manual_seed(0)
    model = Transformer(tiny_cfg()).eval()
    idx = torch.randint(0, 97, (2, 9))
    full, last = model(idx).logits, model(idx, last_only=True).logits
    assert last.shape == (2, 1, 97)
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="last_only"):
        model(idx, idx, last_only=True)


def test_param_counts_match_the_modules():
    for cfg in (tiny_cfg(), tiny_cfg(n_dense_layers=0, n_shared_experts=3), ModelConfig.from_preset("tiny")):
        model = Transformer(cfg)
        assert param_counts(cfg)["total"] == sum(p.numel() for p in model.parameters())
    cfg = tiny_cfg()
    inactive_experts = (cfg.n_experts - cfg.top_k) * 3 * cfg.d_model * cfg.expert_hidden  # one MoE layer
    assert param_counts(cfg)["total"] - param_counts(cfg)["active"] == inactive_experts
    n = param_counts(cfg)
    assert flops_per_token(cfg, 64) == 6 * (n["active"] - 97 * 32) + 12 * 2 * 32 * 64


def hand_router(moe: MoE, weight: torch.Tensor) -> None:
    with torch.no_grad():
        moe.router.weight.copy_(weight)


def test_expert_token_counts_under_a_fixed_router():
    moe = MoE(moe_cfg())
    hand_router(moe, 10 * torch.eye(4))  # logits = 10 x: a token goes to its two largest features
    pairs = [(0, 1), (0, 1), (0, 2), (3, 2), (3, 1), (0, 3)]
    x = torch.zeros(1, len(pairs), 4)
    for t, (a, b) in enumerate(pairs):
        x[0, t, a], x[0, t, b] = 1.0, 0.5
    moe(x)
    assert moe.last_load.tolist() == [4, 3, 2, 3]


def naive_moe(moe: MoE, x_ND: torch.Tensor) -> torch.Tensor:
    """Per-token reference: what dispatch must equal."""
    probs = (moe.router(x_ND) / moe.cfg.router_temperature).softmax(-1)
    idx, gates = moe.route(probs)
    rows = []
    for t in range(x_ND.shape[0]):
        y = x_ND.new_zeros(x_ND.shape[1])
        for e, g in zip(idx[t].tolist(), gates[t]):
            h = torch.nn.functional.silu(x_ND[t] @ moe.w_gate[e]) * (x_ND[t] @ moe.w_up[e])
            y = y + g * (h @ moe.w_down[e])
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("norm", [True, False])
def test_dispatch_equals_a_per_token_loop(norm):
    torch.manual_seed(0)
    cfg = tiny_cfg(n_shared_experts=0, router_temperature=0.5, norm_topk_prob=norm)
    moe = MoE(cfg)
    for p in (moe.w_gate, moe.w_up, moe.w_down):
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 9, 32)
    y, _ = moe(x)
    torch.testing.assert_close(y.reshape(-1, 32), naive_moe(moe, x.reshape(-1, 32)), atol=1e-5, rtol=1e-5)


def test_aux_loss_on_a_known_routing():
    coef = 0.1
    moe = MoE(moe_cfg(d_model=2, n_heads=1, n_experts=2, top_k=1, aux_loss_coef=coef, norm_topk_prob=False))
    hand_router(moe, torch.eye(2))
    ln3 = math.log(3.0)
    # router probs (0.75, 0.25), (0.75, 0.25), (0.25, 0.75): experts 0, 0, 1
    x = torch.tensor([[[ln3, 0.0], [ln3, 0.0], [0.0, ln3]]])
    _, aux = moe(x)
    f = (2 / 3, 1 / 3)
    p = ((0.75 + 0.75 + 0.25) / 3, (0.25 + 0.25 + 0.75) / 3)
    expected = coef * 2 * (f[0] * p[0] + f[1] * p[1])  # = coef * 9.5 / 9
    assert aux.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(coef * 9.5 / 9)
    uniform = switch_aux_loss(torch.full((8, 4), 0.25), torch.tensor([4, 4, 4, 4]))
    assert uniform.item() == pytest.approx(1.0)  # the balanced floor


def test_bias_balancing_lowers_load_imbalance():
    torch.manual_seed(0)
    moe = MoE(moe_cfg(d_model=8, n_experts=4, top_k=1, balance="bias", bias_update_rate=0.02)).train()
    hand_router(moe, torch.randn(4, 8))
    gen = torch.Generator().manual_seed(1)
    skew = torch.zeros(8)
    skew[:4] = 1.5 * moe.router.weight[0, :4].sign()  # pushes most tokens to expert 0

    def step() -> float:
        moe(torch.randn(1, 256, 8, generator=gen) + skew)
        load = moe.load_since_update.clone().float()
        moe.apply_bias_update(load)
        return (load.max() / load.mean()).item()

    moe(torch.randn(1, 256, 8, generator=gen) + skew)
    hot = int(moe.last_load.argmax())
    moe.load_since_update.zero_()
    first = [step() for _ in range(5)]
    for _ in range(150):
        step()
    last = [step() for _ in range(20)]  # a fixed-step sign update oscillates: average it
    assert sum(first) / 5 > 2.0  # strongly imbalanced at the start (max/mean load)
    assert sum(last) / 20 < 1.35
    assert moe.expert_bias[hot] < 0  # the overloaded expert was pushed down


def test_bias_selects_but_never_weights():
    moe = MoE(moe_cfg(n_experts=4, top_k=1, balance="bias", norm_topk_prob=False))
    hand_router(moe, torch.zeros(4, 4))  # every expert prob 0.25
    moe.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    x = torch.randn(1, 3, 4)
    idx, gates = moe.route(torch.full((3, 4), 0.25))
    assert idx.flatten().tolist() == [3, 3, 3]
    assert torch.equal(gates, torch.full((3, 1), 0.25))
    moe(x)
    assert moe.last_load.tolist() == [0, 0, 0, 3]


def test_update_router_bias_reduces_loads_and_resets_them():
    model = Transformer(tiny_cfg(balance="bias", bias_update_rate=0.5)).train()
    model(torch.randint(0, 97, (2, 8)))
    seen = []
    model.update_router_bias(all_reduce=lambda t: seen.append(t.shape))
    assert seen == [(1, 4)]  # one collective for all layers
    moe = model.moe_layers()[1]
    assert moe.load_since_update.sum() == 0
    assert set(moe.expert_bias.abs().tolist()) <= {0.0, 0.5}


def test_balancing_state_survives_a_bf16_cast():
    model = Transformer(tiny_cfg(balance="bias")).bfloat16().train()
    moe = model.moe_layers()[1]
    assert moe.w_gate.dtype == torch.bfloat16
    assert moe.expert_bias.dtype == torch.float32  # +-rate steps would vanish in bf16
    model(torch.randint(0, 97, (2, 8)))
    assert moe.load_since_update.dtype == torch.long and moe.load_since_update.sum() == 2 * 8 * 2


def test_capacity_drops_overflow_in_training_only():
    moe = MoE(moe_cfg(n_experts=2, top_k=1, capacity_factor=1.0, norm_topk_prob=False))
    hand_router(moe, torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]))
    x = torch.zeros(1, 4, 4)
    x[0, :, 0] = 1.0  # all four tokens prefer expert 0; capacity = ceil(1.0 * 4 / 2) = 2
    torch.nn.init.normal_(moe.w_down, std=1.0)
    y_train, _ = moe.train()(x)
    assert (y_train[0].abs().sum(-1) > 0).tolist() == [True, True, False, False]
    y_eval, _ = moe.eval()(x)
    assert (y_eval[0].abs().sum(-1) > 0).all()


def test_padding_is_routed_but_not_counted_and_loses_capacity_first():
    torch.manual_seed(0)
    moe = MoE(moe_cfg(n_experts=4, top_k=2)).train()
    x = torch.randn(1, 6, 4)
    real = torch.tensor([[True, True, True, True, False, False]])
    _, aux_real = moe(x[:, :4])
    load_real = moe.last_load.clone()
    moe.load_since_update.zero_()
    _, aux_padded = moe(x, real)
    assert torch.equal(moe.last_load, load_real) and moe.load_since_update.sum() == 4 * 2
    torch.testing.assert_close(aux_padded, aux_real)
    # capacity: padding that comes first in the batch still yields to the real tokens
    cap = MoE(moe_cfg(n_experts=2, top_k=1, capacity_factor=1.0, norm_topk_prob=False)).train()
    hand_router(cap, torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]))
    torch.nn.init.normal_(cap.w_down, std=1.0)
    x = torch.zeros(1, 4, 4)
    x[0, :, 0] = 1.0  # all four prefer expert 0; capacity 2
    y, _ = cap(x, torch.tensor([[False, False, True, True]]))
    assert (y[0].abs().sum(-1) > 0).tolist() == [False, False, True, True]


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="top_k"):
        tiny_cfg(top_k=5)
    with pytest.raises(ValueError, match="n_kv_heads"):
        tiny_cfg(n_kv_heads=3)
    with pytest.raises(ValueError, match="d_modell"):
        tiny_cfg(d_modell=3)
    with pytest.raises(ValueError, match="preset"):
        ModelConfig.from_preset("huge")
    with pytest.raises(ValueError, match="max_seq_len"):
        Transformer(tiny_cfg(max_seq_len=4))(torch.zeros(1, 5, dtype=torch.long))
