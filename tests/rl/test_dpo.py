"""DPO's data path on a tiny model: sequence log-probs count only response tokens, do not depend
on how pairs are batched or padded, and DPO at step 0 (policy = reference) is ln 2 for every pair."""
import math

import pytest
import torch

from rl.dpo import encode_pairs, pair_batch, pair_logps, reference_logps
from rl.losses import preference_loss
from training.model import ModelConfig, Transformer
from training.template import encode_prompt, render_response
from training.tokenizer import PAD, TokenizerConfig, train_tokenizer

ROWS = [{"id": "a", "prompt": "What is 2 + 3?", "chosen": "<think>2 + 3 = 5</think><answer>5</answer>",
         "rejected": "<answer>6</answer>", "family": "arithmetic"},
        {"id": "b", "prompt": "Sort [3, 1, 2].", "system": "Be brief.",
         "chosen": "<think>smallest first: 1, 2, 3</think><answer>[1, 2, 3]</answer>",
         "rejected": "<think>1, 3, 2</think><answer>[1, 3, 2]</answer>"},
        {"id": "c", "prompt": "A much longer question about the many numbers 12, 13, 14, 15 and 16?",
         "chosen": "<think>sum them</think><answer>70</answer>", "rejected": "<think>no</think><answer>71</answer>"}]


@pytest.fixture(scope="module")
def tok():
    text = " ".join(r["prompt"] + r["chosen"] + r["rejected"] for r in ROWS)
    return train_tokenizer([text] * 20, TokenizerConfig(vocab_size=300, split_digits=True))


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                      max_seq_len=128, n_dense_layers=1, dense_hidden=48, n_experts=4, top_k=2, expert_hidden=16,
                      init_std=0.1)
    return Transformer(cfg).eval()


def naive_logp(model, ids: list[int], n_prompt: int) -> float:
    """Alone, unpadded: the sum of log softmax at each response position."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logsm = torch.log_softmax(logits, -1)
    return sum(float(logsm[t - 1, ids[t]]) for t in range(n_prompt, len(ids)))


def test_encoding_shares_the_prompt_and_counts_long_pairs(tok):
    pairs, too_long = encode_pairs(ROWS, tok, seq_len=128)
    assert too_long == 0 and [p.id for p in pairs] == ["a", "b", "c"]
    b = pairs[1]
    assert b.chosen[:b.n_prompt] == b.rejected[:b.n_prompt] == tuple(encode_prompt(tok, ROWS[1]["prompt"], "Be brief."))
    assert b.family == "user" and pairs[0].family == "arithmetic"
    response = tok.encode(render_response(ROWS[1]["rejected"]), add_special_tokens=False).ids
    assert b.rejected[b.n_prompt:] == tuple(response)
    limit = len(pairs[2].chosen) - 2
    short, too_long = encode_pairs(ROWS, tok, seq_len=limit)
    fits = [p.id for p in pairs if max(len(p.chosen), len(p.rejected)) <= limit]
    assert [p.id for p in short] == fits and too_long == 3 - len(fits) and "c" not in fits


def test_sequence_logps_equal_the_naive_sum_over_response_tokens_in_any_batch(tok, model):
    pairs, _ = encode_pairs(ROWS, tok, seq_len=128)
    pad = tok.token_to_id(PAD)
    batch = pair_batch(pairs, pad)
    assert batch["ids"].shape[0] == 6 and batch["ids"].shape[1] % 8 == 0
    with torch.no_grad():
        lp = pair_logps(model, batch)
    for i, p in enumerate(pairs):
        assert lp.policy_chosen_B[i].item() == pytest.approx(naive_logp(model, list(p.chosen), p.n_prompt), abs=1e-4)
        assert lp.policy_rejected_B[i].item() == pytest.approx(naive_logp(model, list(p.rejected), p.n_prompt), abs=1e-4)
        assert lp.chosen_tokens_B[i] == len(p.chosen) - p.n_prompt
        assert lp.rejected_tokens_B[i] == len(p.rejected) - p.n_prompt
    # batched with others, alone, or padded wider: the same numbers
    with torch.no_grad():
        alone = pair_logps(model, pair_batch(pairs[1:2], pad))
        wide = pair_logps(model, pair_batch(pairs[1:2], pad, multiple=64))
    for other in (alone, wide):
        assert other.policy_chosen_B[0].item() == pytest.approx(lp.policy_chosen_B[1].item(), abs=1e-5)
        assert other.policy_rejected_B[0].item() == pytest.approx(lp.policy_rejected_B[1].item(), abs=1e-5)


def test_dpo_is_ln2_at_step_0_and_its_gradient_reaches_the_policy_only(tok, model):
    pairs, _ = encode_pairs(ROWS, tok, seq_len=128)
    batch = pair_batch(pairs, tok.token_to_id(PAD))
    reference = reference_logps(model, batch)   # the same weights, frozen
    policy = Transformer(model.cfg)
    policy.load_state_dict(model.state_dict())
    lp = pair_logps(policy, batch, reference)
    out = preference_loss("sigmoid", lp, beta=0.1)
    torch.testing.assert_close(out.losses_B.detach(), torch.full((3,), math.log(2)), atol=1e-6, rtol=0)
    assert preference_loss("ipo", lp, beta=0.1).losses_B.detach().allclose(torch.full((3,), 25.0), atol=1e-4)
    out.losses_B.mean().backward()
    assert sum(float(p.grad.abs().sum()) for p in policy.parameters() if p.grad is not None) > 0
    assert not reference[0].requires_grad and all(p.grad is None for p in model.parameters())


def test_on_policy_pairs_set_the_best_sample_against_the_worst_and_count_ties():
    from rl.dpo import on_policy_pairs, sample_score
    rows = {t: {"id": t, "family": "f", "difficulty": "basic", "prompt": f"p{t}", "system": None, "context": None}
            for t in ("a", "b", "c", "d")}
    records = [
        {"id": "a", "texts": ["w1", "right", "bare"], "correct_each": [False, True, True], "format_each": [True, True, False]},
        {"id": "b", "texts": ["x", "y"], "correct_each": [True, True], "format_each": [True, True]},      # all tied
        {"id": "c", "texts": ["ok", "no"], "correct_each": [False, False], "format_each": [True, False]},  # format only
        {"id": "d", "samples": 4, "prompt_too_long": True, "n": 4, "c": 0}]                              # nothing sampled
    pairs, ties = on_policy_pairs(rows, records)
    assert ties == 2 and [(p["task_id"], p["chosen"], p["rejected"]) for p in pairs] == [("a", "right", "w1"),
                                                                                        ("c", "ok", "no")]
    assert pairs[0]["prompt"] == "pa" and pairs[0]["source"] == pairs[0]["kind"] == "on_policy"
    assert sample_score(True, False) > sample_score(False, True) > sample_score(False, False)
