"""The one chat/reasoning template: our rendering and transformers' apply_chat_template agree,
token for token, on the folder r1pipe export writes."""
import pytest
import torch

from training.export import export_hf
from training.model import ModelConfig, Transformer
from training.template import (CHAT_TEMPLATE, encode_example, encode_prompt, render_messages, render_prompt,
                               render_response)
from training.tokenizer import TokenizerConfig, train_tokenizer

SOLUTION = "<think>\n12 + 16 = 28.\nSo the value is 28.\n</think>\n<answer>28</answer>"
TEXTS = ["Evaluate 12 + 16.", SOLUTION, "You are a careful solver.", "What does this print?\n\n```python\nprint(1)\n```"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS * 20, TokenizerConfig(vocab_size=400, split_digits=True))


@pytest.fixture(scope="module")
def hf_tok(tok, tmp_path_factory):
    from transformers import AutoTokenizer
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=448, d_model=32, n_layers=1, n_heads=2,
                                                n_kv_heads=1, dense_hidden=32, expert_hidden=16))
    folder = export_hf(model, tmp_path_factory.mktemp("export") / "hf", tokenizer=tok)
    return AutoTokenizer.from_pretrained(str(folder))


def test_prompt_and_response_render_in_the_reasoning_format():
    assert render_prompt("Evaluate 12 + 16.") == "<s><|user|>Evaluate 12 + 16.\n<|assistant|>"
    assert render_prompt("Q", system="S") == "<s><|system|>S\n<|user|>Q\n<|assistant|>"
    assert render_response(SOLUTION).endswith("</answer></s>")
    with pytest.raises(ValueError, match=r"messages\[1\]: unknown role 'tool'"):
        render_messages([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])
    with pytest.raises(ValueError, match="non-empty list"):
        render_messages([])


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Evaluate 12 + 16."}],
    [{"role": "system", "content": "You are a careful solver."}, {"role": "user", "content": TEXTS[3]}],
    [{"role": "user", "content": "Evaluate 12 + 16."}, {"role": "assistant", "content": SOLUTION},
     {"role": "user", "content": "And 12 + 17?"}],
])
def test_transformers_renders_exactly_our_prompt(hf_tok, tok, messages):
    ours = render_messages(messages, add_generation_prompt=True)
    assert hf_tok.chat_template == CHAT_TEMPLATE
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == ours
    hf_ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    hf_ids = hf_ids["input_ids"] if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys") else hf_ids
    *context, last = messages
    system = context.pop(0)["content"] if context and context[0]["role"] == "system" else None
    assert list(hf_ids) == encode_prompt(tok, last["content"], system=system, context=context)


def test_a_whole_conversation_renders_the_same_in_transformers(hf_tok):
    messages = [{"role": "user", "content": "Evaluate 12 + 16."}, {"role": "assistant", "content": SOLUTION}]
    assert hf_tok.apply_chat_template(messages, tokenize=False) == render_messages(messages)


def test_prompt_and_response_encoded_apart_equal_the_whole_text(tok):
    ids, n_prompt = encode_example(tok, "Evaluate 12 + 16.", SOLUTION)
    whole = tok.encode(render_prompt("Evaluate 12 + 16.") + render_response(SOLUTION), add_special_tokens=False).ids
    assert ids == whole
    assert tok.decode(ids[n_prompt:], skip_special_tokens=False).startswith("<think>")
    assert tok.id_to_token(ids[n_prompt - 1]) == "<|assistant|>" and tok.id_to_token(ids[-1]) == "</s>"
    assert [tok.id_to_token(i) for i in tok.encode("1656", add_special_tokens=False).ids] == ["1", "6", "5", "6"]
