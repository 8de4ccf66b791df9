import inspect
import json

import pytest

from training.tokenizer import (SPECIAL_TOKENS, TokenizerConfig, build_tokenizer, load_tokenizer,
                                save_tokenizer, special_token_ids, train_tokenizer)

TEXT = "Solve: 12 * 7 = ?  <think>12*7 is 84</think><answer>84</answer> café ∑ 😀\n\tindent"


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return [inspect.getsource(m) for m in (json, inspect)]  # offline text, always present


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(corpus, TokenizerConfig(vocab_size=700, min_frequency=2))


def test_round_trip_is_exact(tok):
    ids = tok.encode(TEXT).ids
    assert tok.decode(ids, skip_special_tokens=False) == TEXT
    assert tok.get_vocab_size() == 700
    assert len(ids) < len(TEXT.encode())  # merges were learned


def test_special_tokens_are_single_ids(tok):
    ids = special_token_ids(tok)
    assert list(ids.values()) == list(range(len(SPECIAL_TOKENS)))  # pad 0, bos 1, eos 2, ...
    for token, tid in ids.items():
        assert tok.encode(token).ids == [tid]
    encoded = tok.encode("x<think>y</think><answer>z</answer>").ids
    assert [ids["<think>"], ids["</think>"], ids["<answer>"], ids["</answer>"]] == [
        i for i in encoded if i in ids.values()]


def test_save_load_and_transformers(tok, tmp_path):
    save_tokenizer(tok, tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode(TEXT).ids == tok.encode(TEXT).ids
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert hf(TEXT)["input_ids"] == tok.encode(TEXT).ids
    assert hf.decode(tok.encode(TEXT).ids) == TEXT
    assert set(SPECIAL_TOKENS) <= set(hf.all_special_tokens)


def test_config_path_uses_existing_and_adds_missing_specials(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    foreign = Tokenizer(models.BPE())  # someone else's tokenizer: none of our special tokens
    foreign.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    foreign.train_from_iterator(["hello world " * 50], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    foreign.save(str(tmp_path / "tokenizer.json"))
    tok = build_tokenizer(TokenizerConfig(path=tmp_path / "tokenizer.json"))
    assert tok.encode("hello").ids == foreign.encode("hello").ids  # its own merges are kept
    for token in SPECIAL_TOKENS:
        assert tok.encode(token).ids == [tok.token_to_id(token)]
        assert tok.token_to_id(token) >= foreign.get_vocab_size()  # appended after its vocabulary


def test_config_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        TokenizerConfig(vocab_size=100)
    with pytest.raises(ValueError, match="vocab"):
        TokenizerConfig(vocab_sizes=1000)
    with pytest.raises(ValueError, match="path"):
        build_tokenizer(TokenizerConfig())
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer("/nonexistent/dir")
