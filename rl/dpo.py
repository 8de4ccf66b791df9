"""DPO's data path: preference pairs -> tokens -> one padded batch -> per-sequence log-probs.

    pairs, too_long = encode_pairs(rows, tok, seq_len=512)        # rows of the pairs stage
    batch = pair_batch(pairs[:8], pad_id=tok.token_to_id(PAD))   # chosen rows, then rejected rows
    logps = pair_logps(model, batch)                              # PairLogps of rl/losses.py
    loss = preference_loss("sigmoid", logps_with_reference, beta=0.1)

A pair is rendered with the one chat template (training/template.py): the prompt, then each
response; both share the prompt's tokens. The batch holds the B chosen sequences and then the
B rejected ones, right-padded to the longest (a multiple of 8): causal attention keeps the
padding after a sequence's tokens out of its way, so a sequence's log-prob does not depend on
what it is batched with (tested). Only response tokens count: a sequence's log-prob is the sum
of log p(token | prefix) over its response, and its token count is the response's length.

Shape legend: B pairs, T positions.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from rl.losses import PairLogps
from training.logprobs import completion_logprobs
from training.template import encode_example


@dataclass(frozen=True)
class EncodedPair:
    id: str
    chosen: tuple[int, ...]     # prompt + chosen response tokens
    rejected: tuple[int, ...]   # prompt + rejected response tokens
    n_prompt: int               # the prompt's tokens, shared by both
    family: str


def encode_pairs(rows: list[dict], tok, seq_len: int) -> tuple[list[EncodedPair], int]:
    """Pairs whose both sequences fit seq_len + 1 tokens (input and shifted target), and how
    many did not (left out and counted, as SFT does with long examples)."""
    pairs, too_long = [], 0
    for row in rows:
        context = json.loads(row["context"]) if row.get("context") else ()
        chosen, n_prompt = encode_example(tok, row["prompt"], row["chosen"], row.get("system"), context)
        rejected, n_prompt_r = encode_example(tok, row["prompt"], row["rejected"], row.get("system"), context)
        assert n_prompt == n_prompt_r  # the prompt renders the same before either response
        if max(len(chosen), len(rejected)) > seq_len + 1:
            too_long += 1
            continue
        pairs.append(EncodedPair(row["id"], tuple(chosen), tuple(rejected), n_prompt, row.get("family") or "user"))
    return pairs, too_long


def pair_batch(pairs: list[EncodedPair], pad_id: int, multiple: int = 8) -> dict:
    """{"ids": (2B, T), "completion": (2B, T) bool}: chosen rows 0..B-1, rejected rows B..2B-1."""
    if not pairs:
        raise ValueError("pair_batch: no pairs")
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    prompts = [p.n_prompt for p in pairs] * 2
    width = -(-max(map(len, seqs)) // multiple) * multiple
    ids_BT = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    completion_BT = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (seq, n_prompt) in enumerate(zip(seqs, prompts)):
        ids_BT[i, :len(seq)] = torch.tensor(seq)
        completion_BT[i, n_prompt:len(seq)] = True
    return {"ids": ids_BT, "completion": completion_BT}


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed response log-prob, response tokens) per row of the batch; gradients flow when the
    caller allows them."""
    logp_BT, mask_BT = completion_logprobs(model, batch["ids"], batch["completion"])
    return logp_BT.sum(-1), mask_BT.sum(-1)


def pair_logps(model, batch: dict, reference: tuple[torch.Tensor, torch.Tensor] | None = None) -> PairLogps:
    """The policy's PairLogps of a pair batch; reference: the reference's (chosen, rejected)
    log-probs, computed by a frozen model or read from a precomputed pass."""
    logp, n = sequence_logps(model, batch)
    b = logp.shape[0] // 2
    ref_c, ref_r = reference if reference is not None else (None, None)
    return PairLogps(logp[:b], logp[b:], n[:b], n[b:], ref_c, ref_r)


@torch.no_grad()
def reference_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen reference's (chosen, rejected) summed response log-probs of a pair batch."""
    logp, _ = sequence_logps(model, batch)
    b = logp.shape[0] // 2
    return logp[:b], logp[b:]
