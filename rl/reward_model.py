"""A learned reward: the start model's trunk with a linear head, trained on preference pairs.

    scorer = RewardScorer.from_folder("runs/r1/reward_model/model")
    scores = scorer.score(prompts, responses)            # one float per (prompt, response)

The score of a (prompt, response) is the head applied to the trunk's final hidden state at the
last token of the rendered chat (the one template of training/template.py, so the end of the
response). The head starts at zero, so every score is 0 at init and the Bradley-Terry loss
-log sigmoid(s_chosen - s_rejected) is ln 2 for every pair; the trunk starts from the sft model
(or reward_model.init_model), without its lm_head. Training goes through the shared loop and
gang runner like every stage; the held-out figures are pair accuracy (s_chosen > s_rejected) and
the mean score margin.

A reward model folder holds model.safetensors (trunk.* and head.*), reward_model.json (the trunk's
ModelConfig and how the score is read) and the tokenizer files. It is not a language model:
r1pipe export and eval refuse it by name.

Shape legend: B pairs (2B sequences), T positions, D model width.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rl.config import RewardModelConfig
from rl.dpo import PairJob, held_out_pairs, load_pairs, run_pair_job
from rl.losses import bradley_terry
from training.engine import Engine, ensure_process_group, to_device
from training.export import REWARD_CONFIG, WEIGHTS, load_model
from training.loop import Hooks, paths_from_payload
from training.model import ModelConfig, Transformer
from training.tokenizer import PAD, load_tokenizer
from training.template import encode_example


class RewardModel(nn.Module):
    """trunk (a Transformer without lm_head) + head (D -> 1) read at each sequence's last real token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.trunk = Transformer(cfg)
        self.trunk.lm_head = None  # not part of the reward model: no weights, no gradients
        self.head = nn.Linear(cfg.d_model, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_lm(cls, lm: Transformer) -> "RewardModel":
        """The trunk of a language model (its weights, not its lm_head) and a zero head."""
        model = cls(lm.cfg)
        weights = {k: v for k, v in lm.state_dict().items() if not k.startswith("lm_head.")}
        model.trunk.load_state_dict(weights, strict=True)
        return model

    def forward(self, ids_BT: torch.Tensor, real_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (B,) float32, the MoE balance loss); real_BT marks each row's tokens (right padding)."""
        h_BTD, aux = self.trunk.hidden(ids_BT, real_BT=real_BT)
        last_B = real_BT.sum(-1) - 1
        if (last_B < 0).any():
            raise ValueError("RewardModel: a row without tokens")
        h_BD = h_BTD[torch.arange(ids_BT.shape[0], device=ids_BT.device), last_B]
        return self.head(h_BD).squeeze(-1).float(), aux

    # what the loop's metrics and balancing call on a model, and activation checkpointing walks
    @property
    def blocks(self) -> nn.ModuleList:
        return self.trunk.blocks

    def expert_loads(self) -> dict[int, torch.Tensor]:
        return self.trunk.expert_loads()

    def update_router_bias(self, all_reduce=None) -> None:
        self.trunk.update_router_bias(all_reduce)

    # ---- a folder of its own

    def save(self, folder: str | Path) -> Path:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
        meta = {"kind": "reward_model", "score": "head(final hidden state at the last token of prompt + response)",
                "model": self.cfg.model_dump()}
        (out / REWARD_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> "RewardModel":
        folder = Path(folder)
        if not (folder / REWARD_CONFIG).is_file() or not (folder / WEIGHTS).is_file():
            raise ValueError(f"{folder}: not a reward model folder (needs {REWARD_CONFIG} and {WEIGHTS}; "
                             f"a reward_model stage writes one under model/)")
        meta = json.loads((folder / REWARD_CONFIG).read_text())
        model = cls(ModelConfig.model_validate(meta["model"]))
        model.load_state_dict(load_file(str(folder / WEIGHTS), device=str(device)), strict=True)
        return model.to(device).eval()


def pair_scores(model: RewardModel, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen scores (B,), rejected scores (B,), balance loss) of a pair_batch."""
    scores, aux = model(batch["ids"], batch["real"])
    b = scores.shape[0] // 2
    return scores[:b], scores[b:], aux


# ----------------------------------------------------------------------------- scoring API


class RewardEncoder:
    """(prompt, response) texts -> the token ids a reward model scores, and the batches they go in.

    Each pair is rendered with the chat template as in training. A rendering longer than the
    model's max_seq_len keeps its last max_seq_len tokens (the score is read at the end) and is
    counted in `truncated`. Batches hold sequences of similar length, for speed.
    """

    def __init__(self, tokenizer, max_seq_len: int):
        self.tok, self.max_seq_len, self.truncated = tokenizer, max_seq_len, 0

    @classmethod
    def from_folder(cls, folder: str | Path) -> "RewardEncoder":
        """A reward model folder's tokenizer and context, without loading its weights."""
        folder = Path(folder)
        if not (folder / REWARD_CONFIG).is_file():
            raise ValueError(f"{folder}: not a reward model folder (needs {REWARD_CONFIG}; a reward_model stage "
                             "writes one under model/)")
        meta = json.loads((folder / REWARD_CONFIG).read_text())
        return cls(load_tokenizer(folder), ModelConfig.model_validate(meta["model"]).max_seq_len)

    def encode(self, prompts: list[str], responses: list[str], systems: list[str | None] | None = None) -> list[list[int]]:
        if len(prompts) != len(responses) or (systems is not None and len(systems) != len(prompts)):
            raise ValueError(f"score: {len(prompts)} prompts, {len(responses)} responses"
                             + (f", {len(systems)} systems" if systems is not None else "") + "; they must match")
        seqs = []
        for p, r, s in zip(prompts, responses, systems or [None] * len(prompts)):
            ids, _ = encode_example(self.tok, p, r, s)
            if len(ids) > self.max_seq_len:
                self.truncated += 1
                ids = ids[-self.max_seq_len:]
            seqs.append(ids)
        return seqs

    @staticmethod
    def batches(seqs: list[list[int]], batch_size: int) -> list[list[int]]:
        """Indices of seqs, batch by batch, shortest first."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        return [order[lo:lo + batch_size] for lo in range(0, len(order), batch_size)]

    def score(self, prompts: list[str], responses: list[str], systems: list[str | None] | None, batch_size: int,
              score_batches: Callable[[list[list[list[int]]]], list[list[float]]]) -> list[float]:
        """One score per (prompt, response), in order: encoded, batched, and the batches handed to
        score_batches all at once (one process scores them in turn, a Ray group spreads them)."""
        seqs = self.encode(prompts, responses, systems)
        batches = self.batches(seqs, batch_size)
        out = [0.0] * len(seqs)
        for index, scores in zip(batches, score_batches([[seqs[i] for i in index] for index in batches])):
            for i, s in zip(index, scores):
                out[i] = s
        return out


class RewardScorer:
    """Scores (prompt, response) texts with a trained reward model; RL's optional learned reward term.

        scorer.score(prompts, responses)          # encode, batch, score: one float per pair, in order
        scorer.score_ids(seqs)                    # one batch of encoded pairs (what a Ray worker runs)
    """

    def __init__(self, model: RewardModel, tokenizer, device: str | torch.device = "cpu"):
        self.model, self.device = model.to(device).eval(), torch.device(device)
        self.encoder = RewardEncoder(tokenizer, model.cfg.max_seq_len)
        self.pad_id = tokenizer.token_to_id(PAD)

    @classmethod
    def from_folder(cls, folder: str | Path, device: str | torch.device = "cpu") -> "RewardScorer":
        return cls(RewardModel.load(folder, device), load_tokenizer(folder), device)

    @property
    def truncated(self) -> int:
        return self.encoder.truncated

    @torch.no_grad()
    def score_ids(self, seqs: list[list[int]]) -> list[float]:
        """Scores of one batch of encoded pairs, right-padded together."""
        width = max(len(ids) for ids in seqs)
        ids_BT = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        real_BT = torch.zeros((len(seqs), width), dtype=torch.bool)
        for row, ids in enumerate(seqs):
            ids_BT[row, :len(ids)] = torch.tensor(ids)
            real_BT[row, :len(ids)] = True
        scores, _ = self.model(ids_BT.to(self.device), real_BT.to(self.device))
        return scores.tolist()

    def score(self, prompts: list[str], responses: list[str], systems: list[str | None] | None = None,
              batch_size: int = 16) -> list[float]:
        """One score per (prompt, response), in order."""
        return self.encoder.score(prompts, responses, systems, batch_size,
                                  lambda batches: [self.score_ids(b) for b in batches])


# ----------------------------------------------------------------------------- the trainer


@dataclass
class RewardModelPaths:
    train_files: list[Path]     # the pairs stage's train split
    val_files: list[Path]       # its held-out split
    init_model: Path            # the trunk's start (a language model folder)
    work: Path
    checkpoints: Path
    out: Path                   # model/ goes here (rank 0)


class RewardModelJob(PairJob):
    summary_keys = ("rm_loss", "accuracy", "margin")

    def __init__(self, cfg: RewardModelConfig, pairs, val, model_cfg, pad_id: int, seed: int):
        super().__init__(cfg, pairs, val, model_cfg, pad_id, seed)
        self.flops_per_token -= 6 * model_cfg.vocab_size * model_cfg.d_model  # no lm_head

    def loss_fn(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        chosen_B, rejected_B, aux = pair_scores(model, batch)
        bt = bradley_terry(chosen_B, rejected_B).mean()
        loss = bt + aux
        if self.cfg.center_coef:
            loss = loss + self.cfg.center_coef * ((chosen_B + rejected_B) ** 2).mean()
        margin = (chosen_B - rejected_B).detach()
        return loss, {"rm_loss": bt.detach(), "accuracy": (margin > 0).float().mean(), "margin": margin.mean(),
                      "scores/chosen": chosen_B.detach().mean(), "scores/rejected": rejected_B.detach().mean(),
                      "aux_loss": aux}

    @torch.no_grad()
    def evaluate(self, engine: Engine) -> dict:
        """Held-out pairs: Bradley-Terry loss, accuracy (s_chosen > s_rejected) overall and per kind
        of pair, mean margin; all ranks."""
        def score(batch: dict):
            c, r, _ = pair_scores(engine.module, to_device(batch, engine.device))
            return bradley_terry(c, r), c, r
        engine.module.eval()
        figures = held_out_pairs(self.val, self.cfg.data.micro_batch, lambda chunk: self._batch(chunk, "val"), score)
        engine.module.train()
        names = {"loss": "loss", "accuracies": "accuracy", "margins": "margin"}
        return {"val/" + names.get(k, k.replace("accuracies/", "accuracy/")): v for k, v in figures.items()}

    def final_model(self, weights: dict[str, torch.Tensor]) -> RewardModel:
        model = RewardModel(self.model_cfg)
        model.load_state_dict(weights)
        return model

    def save_final(self, model: RewardModel, folder: Path) -> Path:
        return model.save(folder)


def train_reward_model(cfg: RewardModelConfig, paths: RewardModelPaths, *, seed: int,
                       hooks: Hooks | None = None) -> dict:
    """Train to cfg.steps (resuming from the newest good checkpoint); rank 0's summary."""
    ensure_process_group()
    model_cfg, tok, train_pairs, val_pairs, too_long = load_pairs(cfg, paths, "reward_model")
    job = RewardModelJob(cfg, train_pairs, val_pairs, model_cfg, tok.token_to_id(PAD), seed)
    return run_pair_job(cfg, paths, job, tok, too_long, lambda: RewardModel.from_lm(load_model(paths.init_model)),
                        hooks)


def worker(payload: dict, hooks: Hooks) -> dict:
    """The gang's entry point (cluster/train.py): JSON payload in, rank 0's summary out."""
    paths = RewardModelPaths(**paths_from_payload(payload["paths"]))
    return train_reward_model(RewardModelConfig.model_validate(payload["config"]), paths, seed=payload["seed"],
                              hooks=hooks)
