"""The one chat/reasoning template: how a prompt and a response become text, and tokens.

SFT, DPO, RL and evaluation all render through here, and ``save_tokenizer`` writes the same
template as the tokenizer's ``chat_template``, so that transformers (and vLLM) render exactly
the prompt our evaluation uses:

    <s><|system|>{system}\n<|user|>{prompt}\n<|assistant|><think>\n...\n</think>\n<answer>...</answer></s>

    text = render_prompt("What is 2 + 3?")                     # ends with <|assistant|>
    ids, n_prompt = encode_example(tok, "What is 2 + 3?", solution)   # loss on ids[n_prompt:]
    tok_hf.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                               add_generation_prompt=True, tokenize=False) == text

A response ends with ``</s>``, so a model learns to stop; generation also stops at
``</answer>``. Every role marker is a special token, so encoding the prompt and the response
apart gives the same tokens as encoding their concatenation (no BPE merge crosses a special).
"""
from __future__ import annotations

from typing import Sequence

from training.tokenizer import BOS, EOS

ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
ASSISTANT = ROLE_TOKENS["assistant"]

# The same rendering in Jinja, for transformers' apply_chat_template; tests check they agree.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def check_messages(messages: Sequence[dict], where: str = "messages") -> list[dict]:
    """Each message a {role, content} with a known role and string content; errors name the index."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}[{i}]: expected {{'role': str, 'content': str}}, got {m!r:.80}")
        if m["role"] not in ROLE_TOKENS:
            raise ValueError(f"{where}[{i}]: unknown role {m['role']!r}; known: {sorted(ROLE_TOKENS)}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def render_messages(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """A conversation as text; with add_generation_prompt it ends where the assistant speaks."""
    parts = [BOS]
    for m in check_messages(messages):
        end = EOS if m["role"] == "assistant" else "\n"
        parts.append(f"{ROLE_TOKENS[m['role']]}{m['content']}{end}")
    if add_generation_prompt:
        parts.append(ASSISTANT)
    return "".join(parts)


def prompt_messages(prompt: str, system: str | None = None, context: Sequence[dict] = ()) -> list[dict]:
    """The messages before the response: an optional system message, earlier turns, the user prompt."""
    head = [{"role": "system", "content": system}] if system else []
    return head + list(context) + [{"role": "user", "content": prompt}]


def render_prompt(prompt: str, system: str | None = None, context: Sequence[dict] = ()) -> str:
    """Everything up to and including <|assistant|>: what a model continues at evaluation."""
    return render_messages(prompt_messages(prompt, system, context), add_generation_prompt=True)


def render_response(response: str) -> str:
    """The assistant's part after <|assistant|>, with the end-of-sequence token."""
    return f"{response}{EOS}"


def encode_prompt(tok, prompt: str, system: str | None = None, context: Sequence[dict] = ()) -> list[int]:
    return tok.encode(render_prompt(prompt, system, context), add_special_tokens=False).ids


def encode_example(tok, prompt: str, response: str, system: str | None = None,
                   context: Sequence[dict] = ()) -> tuple[list[int], int]:
    """(token ids of prompt + response, number of prompt tokens): the loss covers ids[n_prompt:]."""
    prompt_ids = encode_prompt(tok, prompt, system, context)
    response_ids = tok.encode(render_response(response), add_special_tokens=False).ids
    return prompt_ids + response_ids, len(prompt_ids)
