import pytest
import torch

from training.generate import generate, left_pad, sample_next
from training.model import ModelConfig, Transformer

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [30, 31, 32, 33]]


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    # a large init_std gives peaked logits, so greedy never hinges on a near-tie
    cfg = ModelConfig(vocab_size=101, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                      n_dense_layers=1, dense_hidden=48, n_experts=4, top_k=2, expert_hidden=16,
                      n_shared_experts=1, init_std=0.2)
    return Transformer(cfg)


def test_greedy_with_cache_equals_without(model):
    cached = generate(model, PROMPTS, max_new_tokens=24, use_cache=True)
    plain = generate(model, PROMPTS, max_new_tokens=24, use_cache=False)
    assert cached.tokens.shape == (3, 24)
    assert torch.equal(cached.tokens, plain.tokens)


def test_a_row_in_a_padded_batch_equals_the_row_alone(model):
    batched = generate(model, PROMPTS, max_new_tokens=12)
    for row, prompt in enumerate(PROMPTS):
        assert torch.equal(generate(model, [prompt], max_new_tokens=12).tokens[0], batched.tokens[row])


def test_rows_stop_on_their_stop_id_and_pad_after(model):
    free = generate(model, PROMPTS, max_new_tokens=16).tokens
    stop = int(free[1, 3])  # row 1 emits it at step 3 (and maybe others earlier)
    out = generate(model, PROMPTS, max_new_tokens=16, stop_ids=[stop], pad_id=0)
    for row in range(3):
        hits = (free[row] == stop).nonzero().flatten().tolist()
        n = hits[0] + 1 if hits else 16
        assert out.lengths[row] == n
        assert torch.equal(out.tokens[row, :n], free[row, :n])
        assert (out.tokens[row, n:] == 0).all()


def test_sampling_controls(model):
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    assert sample_next(logits).item() == 1
    assert sample_next(logits, temperature=5.0, top_k=1).item() == 1
    assert sample_next(logits, temperature=5.0, top_p=0.01).item() == 1
    gen = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_k=2, generator=gen).item() for _ in range(200)}
    assert draws == {1, 3}
    a = generate(model, PROMPTS, max_new_tokens=8, temperature=0.9, top_p=0.9,
                 generator=torch.Generator().manual_seed(3))
    b = generate(model, PROMPTS, max_new_tokens=8, temperature=0.9, top_p=0.9,
                 generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.tokens, b.tokens)


def test_left_pad_and_errors(model):
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, PROMPTS, max_new_tokens=60)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, PROMPTS, max_new_tokens=2, temperature=1.0, top_p=0.0)
    model.train()
    generate(model, PROMPTS, max_new_tokens=2)
    assert model.training  # generation runs in eval mode and restores the caller's mode
