"""Per-token log-probabilities: the pure function against a naive per-position loop, and the
frozen model (no optimizer, no gradients, eval mode) under the DeepSpeed seam."""
import pytest
import torch

from training.config import EngineConfig
from training.engine import FrozenModel
from training.export import save_model
from training.logprobs import IGNORE, completion_logprobs, shift_targets, token_logprobs
from training.model import ModelConfig, Transformer


def tiny_model(seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny", vocab_size=61, d_model=32, n_layers=2, n_heads=2,
                                               n_kv_heads=1, dense_hidden=48, expert_hidden=16, max_seq_len=32,
                                               init_std=0.2))


def naive_completion_logprobs(model, ids, mask):
    """One forward per position: log p(ids[t+1] | ids[:t+1]) for every masked next token."""
    B, T = ids.shape
    out = torch.zeros(B, T)
    for b in range(B):
        for t in range(T - 1):
            if mask[b, t + 1]:
                logits = model(ids[b:b + 1, :t + 1]).logits[0, -1].double()
                out[b, t] = (logits.log_softmax(-1)[ids[b, t + 1]]).float()
    return out


def test_token_logprobs_equal_log_softmax_and_ignore_gives_zero():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    targets[1, 3] = IGNORE
    got = token_logprobs(logits, targets, chunk_rows=3)  # chunks that do not divide the rows
    want = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    want[1, 3] = 0.0
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    logits[1, 3, 0] = float("-inf")  # an ignored position may hold anything, even -inf at index 0
    assert token_logprobs(logits, targets)[1, 3] == 0
    with pytest.raises(ValueError, match="must agree"):
        token_logprobs(logits, targets[:, :4])


def test_completion_logprobs_match_a_naive_loop():
    model = tiny_model().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 61, (3, 9), generator=g)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, 4:] = True   # prompt of 4, completion of 5
    mask[1, 2:7] = True  # completion followed by padding
    mask[2, 8:] = True   # a one-token completion
    logp, counted = completion_logprobs(model, ids, mask)
    want = naive_completion_logprobs(model, ids, mask)
    torch.testing.assert_close(logp, want, atol=2e-5, rtol=0)
    assert counted.tolist() == (shift_targets(ids, mask) != IGNORE).tolist()
    assert counted.sum().item() == 5 + 5 + 1
    assert (logp[~counted] == 0).all() and (logp[counted] < 0).all()


def test_completion_logprobs_carry_gradients_for_a_trained_policy():
    model = tiny_model().train()
    ids = torch.randint(3, 61, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    logp, counted = completion_logprobs(model, ids, mask)
    (logp * counted).sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_frozen_model_from_a_folder_is_eval_mode_without_grad(tmp_path, zero_stage):
    model = tiny_model()
    folder = save_model(model, tmp_path / "model")
    frozen = FrozenModel.from_folder(folder, EngineConfig(zero_stage=zero_stage))
    assert not frozen.module.training
    assert not any(p.requires_grad for p in frozen.module.parameters())
    # no optimizer: nothing at ZeRO-0, and at ZeRO-3 only DeepSpeed's parameter-offload holder
    assert frozen.ds.optimizer is None if zero_stage == 0 else type(frozen.ds.optimizer).__name__ == "DeepSpeedZeRoOffload"
    ids = torch.randint(3, 61, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    got, _ = completion_logprobs(frozen, ids, mask)
    want, _ = completion_logprobs(model.eval(), ids, mask)
    assert not got.requires_grad
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert frozen.local_numel() == sum(p.numel() for p in model.parameters())  # a group of one: whole
