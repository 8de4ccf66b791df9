"""Byte-level BPE tokenizer with the reasoning-format and chat-role special tokens.

Trained with HF `tokenizers` from any iterable of strings, saved as `tokenizer.json` plus the
two small files that let `transformers.PreTrainedTokenizerFast.from_pretrained(dir)` load it.

    tok = build_tokenizer(TokenizerConfig(vocab_size=8192), texts)   # or TokenizerConfig(path=...)
    save_tokenizer(tok, "runs/r1/tokenizer/model")
    tok = load_tokenizer("runs/r1/tokenizer/model")
    ids = special_token_ids(tok)   # {"<think>": 6, "</answer>": 9, ...}

Encoding adds no special token by itself: the data loaders place `<s>`/`</s>` where they want
them, so the same tokenizer serves pretraining, chat SFT and RL prompts.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from pydantic import Field, model_validator
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from training.config import Strict

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLES = ("<|system|>", "<|user|>", "<|assistant|>")
REASONING = ("<think>", "</think>", "<answer>", "</answer>")
# pad/bos/eos first, so a fresh tokenizer has pad=0, bos=1, eos=2
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLES, *REASONING)
N_BYTES = 256  # a byte-level alphabet always holds every byte


class TokenizerConfig(Strict):
    vocab_size: int = Field(8192, description="including the byte alphabet and special tokens")
    min_frequency: int = Field(2, ge=1, description="merges seen fewer times are not learned")
    split_digits: bool = Field(False, description="every digit its own token (as LLaMA's tokenizer): "
                                                  "numbers are spelled the same way wherever they occur")
    path: Path | None = Field(None, description="an existing tokenizer.json to use instead of training")

    @model_validator(mode="after")
    def _check_vocab(self) -> "TokenizerConfig":
        floor = N_BYTES + len(SPECIAL_TOKENS)
        if self.vocab_size <= floor:
            raise ValueError(f"vocab_size={self.vocab_size} must exceed {floor} (bytes + special tokens)")
        return self


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """Learn BPE merges over bytes, so no text is ever out of vocabulary."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if cfg.split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def build_tokenizer(cfg: TokenizerConfig, texts: Iterable[str] | None = None) -> Tokenizer:
    """The tokenizer stage: load cfg.path if given, else train on texts."""
    if cfg.path is not None:
        return load_tokenizer(cfg.path)
    if texts is None:
        raise ValueError("tokenizer: no `path` set and no texts given to train on")
    return train_tokenizer(texts, cfg)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer.json (or a folder holding one); special tokens it lacks are appended."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"tokenizer path {str(path)!r}: no tokenizer.json there")
    tok = Tokenizer.from_file(str(file))
    # a special must be an added token (matched before BPE), not merely a string in the vocab
    added = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    missing = [t for t in SPECIAL_TOKENS if t not in added]
    if missing:
        tok.add_special_tokens(missing)
    return tok


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


def save_tokenizer(tok: Tokenizer, out_dir: str | Path, model_max_length: int | None = None) -> Path:
    """Write tokenizer.json, tokenizer_config.json (with the chat template) and
    special_tokens_map.json into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    extra = [t for t in SPECIAL_TOKENS if t not in (PAD, BOS, EOS)]
    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": extra}
    from training.template import CHAT_TEMPLATE  # the one template (training/template.py)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "chat_template": CHAT_TEMPLATE,
        "extra_special_tokens": extra,  # the name transformers 5 reads; 4.x reads additional_*
        "clean_up_tokenization_spaces": False,  # byte-level decoding is already exact
        "add_bos_token": False,
        "add_eos_token": False,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    _write_json(out / "special_tokens_map.json", special_map)
    _write_json(out / "tokenizer_config.json", config)
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
