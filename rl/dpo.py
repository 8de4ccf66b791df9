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

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from rl.config import DpoConfig
from rl.losses import NEEDS_REFERENCE, PairLogps, chosen_nll, preference_loss
from training.distributed import all_gather, all_sum, on_rank0, rank_slice, rank_world
from training.engine import Engine, FrozenModel, StepResult, ensure_process_group, to_device
from training.export import load_model
from training.loop import Hooks, SamplerJob, paths_from_payload, train
from training.model import flops_per_token
from training.pretrain import expert_metrics
from training.pretrain_data import CurriculumSampler
from training.sft import check_model
from training.sft_data import ExamplePool
from training.tokenizer import PAD, load_tokenizer
from training.logprobs import IGNORE, shift_targets, token_logprobs
from training.template import encode_example


@dataclass(frozen=True)
class EncodedPair:
    id: str
    chosen: tuple[int, ...]     # prompt + chosen response tokens
    rejected: tuple[int, ...]   # prompt + rejected response tokens
    n_prompt: int               # the prompt's tokens, shared by both
    family: str
    difficulty: str = "basic"
    kind: str = "user"          # how the pair was made (wrong_answer, on_policy, ...): held-out figures per kind


def encode_pairs(rows: list[dict], tok, seq_len: int) -> tuple[list[EncodedPair], int]:
    """Pairs whose both sequences fit seq_len tokens (the whole sequence goes through the model),
    and how many did not (left out and counted, as SFT does with long examples)."""
    pairs, too_long = [], 0
    for row in rows:
        context = json.loads(row["context"]) if row.get("context") else ()
        chosen, n_prompt = encode_example(tok, row["prompt"], row["chosen"], row.get("system"), context)
        rejected, n_prompt_r = encode_example(tok, row["prompt"], row["rejected"], row.get("system"), context)
        assert n_prompt == n_prompt_r  # the prompt renders the same before either response
        if max(len(chosen), len(rejected)) > seq_len:
            too_long += 1
            continue
        pairs.append(EncodedPair(row["id"], tuple(chosen), tuple(rejected), n_prompt, row.get("family") or "user",
                                 row.get("difficulty") or "basic", row.get("kind") or "user"))
    return pairs, too_long


def pair_batch(pairs: list[EncodedPair], pad_id: int, multiple: int = 8, max_width: int | None = None) -> dict:
    """{"ids", "completion", "real"}, each (2B, T): chosen rows 0..B-1, rejected rows B..2B-1;
    `real` keeps the padding out of the MoE's load and balance loss. T is the longest sequence
    rounded up to a multiple of 8, but never past max_width (the run's seq_len)."""
    if not pairs:
        raise ValueError("pair_batch: no pairs")
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    prompts = [p.n_prompt for p in pairs] * 2
    longest = max(map(len, seqs))
    width = -(-longest // multiple) * multiple
    if max_width is not None:
        width = max(min(width, max_width), longest)
    ids_BT = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    completion_BT = torch.zeros((len(seqs), width), dtype=torch.bool)
    real_BT = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (seq, n_prompt) in enumerate(zip(seqs, prompts)):
        ids_BT[i, :len(seq)] = torch.tensor(seq)
        completion_BT[i, n_prompt:len(seq)] = True
        real_BT[i, :len(seq)] = True
    return {"ids": ids_BT, "completion": completion_BT, "real": real_BT}


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed response log-prob, response tokens) per row of the batch, and the MoE balance
    loss of the forward; gradients flow when the caller allows them."""
    targets_BT = shift_targets(batch["ids"], batch["completion"])
    out = model(batch["ids"], real_BT=batch.get("real"))
    logp_BT = token_logprobs(out.logits, targets_BT)
    return logp_BT.sum(-1), (targets_BT != IGNORE).sum(-1), out.aux_loss


def pair_logps(model, batch: dict, reference: tuple[torch.Tensor, torch.Tensor] | None = None) -> PairLogps:
    """The policy's PairLogps of a pair batch; reference: the reference's (chosen, rejected)
    log-probs, computed by a frozen model or read from a precomputed pass."""
    logp, n, _ = sequence_logps(model, batch)
    return as_pairs(logp, n, reference)


def as_pairs(logp: torch.Tensor, n: torch.Tensor, reference=None) -> PairLogps:
    """Per-row log-probs and token counts of a pair batch (chosen rows, then rejected) as PairLogps,
    the reference's moved to the policy's device."""
    b = logp.shape[0] // 2
    ref_c, ref_r = (None if r is None else r.to(logp.device) for r in reference) if reference else (None, None)
    return PairLogps(logp[:b], logp[b:], n[:b], n[b:], ref_c, ref_r)


def rank_chunks(n: int, size: int) -> list[list[int]]:
    """This rank's share of range(n) in chunks of at most size; every rank gets the same number of
    chunks (a short share ends with empty ones), since ZeRO-3 forwards are collective."""
    rank, world = rank_world()
    per_rank = math.ceil(n / world) if n else 0
    mine = list(range(n))[rank * per_rank:(rank + 1) * per_rank]
    return [mine[lo:lo + size] for lo in range(0, per_rank, size)]


@torch.no_grad()
def reference_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen reference's (chosen, rejected) summed response log-probs of a pair batch."""
    logp, _, _ = sequence_logps(model, batch)
    b = logp.shape[0] // 2
    return logp[:b].float(), logp[b:].float()


# ----------------------------------------------------------------------------- on-policy pairs


def sample_score(correct: bool, well_formed: bool) -> float:
    """The verifiable reward of one sample: a right answer counts most, a well-formed one next."""
    return float(correct) + 0.5 * float(well_formed)


def on_policy_pairs(task_rows: dict[str, dict], records: list[dict]) -> tuple[list[dict], int]:
    """Pairs of the best and the worst of each task's samples (records of cluster.eval.sample_on_ray),
    and how many tasks were skipped because all their samples scored the same (or none fit)."""
    pairs, ties = [], 0
    for rec in records:
        scores = [sample_score(c, f) for c, f in zip(rec.get("correct_each", []), rec.get("format_each", []))]
        if not scores or max(scores) == min(scores):
            ties += 1
            continue
        best, worst = scores.index(max(scores)), scores.index(min(scores))
        row = task_rows[rec["id"]]
        pairs.append({"id": f"{row['id']}/on_policy", "split": "train", "source": "on_policy", "kind": "on_policy",
                      "task_id": row["id"], "family": row["family"], "difficulty": row["difficulty"],
                      "prompt": row["prompt"], "system": row.get("system"), "context": row.get("context"),
                      "chosen": rec["texts"][best], "rejected": rec["texts"][worst]})
    return pairs, ties


# ----------------------------------------------------------------------------- the trainer


@dataclass
class DpoPaths:
    train_files: list[Path]     # the pairs stage's train split
    val_files: list[Path]       # its held-out split
    init_model: Path            # the policy's start and the reference (a model folder)
    work: Path                  # the precomputed reference log-probs
    checkpoints: Path
    out: Path                   # model/ goes here (rank 0)


def read_pairs(files: list[Path]) -> list[dict]:
    rows = []
    for path in sorted(Path(f) for f in files):
        table = pq.read_table(path)
        missing = [c for c in ("id", "prompt", "chosen", "rejected") if c not in table.column_names]
        if missing:
            raise ValueError(f"{path}: preference pairs need columns {missing}; it has {table.column_names}")
        rows += table.to_pylist()
    return rows


class PairPools:
    """Pairs grouped by (family, difficulty), as the curriculum sampler wants them."""

    def __init__(self, pairs: list[EncodedPair]):
        groups: dict[tuple[str, str], list[int]] = {}
        for i, p in enumerate(pairs):
            groups.setdefault((p.family, p.difficulty), []).append(i)
        self.train = [ExamplePool(f, d, [[i] for i in members], [1] * len(members))
                      for (f, d), members in sorted(groups.items())]


class PairJob(SamplerJob):
    """What the jobs that learn from pairs (DPO, the reward model) share: the curriculum sampler over
    the pairs, the batches, the router bias update and the expert metrics."""

    def __init__(self, cfg, pairs: list[EncodedPair], val: list[EncodedPair], model_cfg, pad_id: int, seed: int):
        self.cfg, self.pairs, self.val, self.model_cfg, self.pad_id = cfg, pairs, val, model_cfg, pad_id
        self.pools = PairPools(pairs)
        self.sampler = CurriculumSampler(self.pools, cfg.data, cfg.steps, seed, weights={},
                                         weights_key="data.family_weights")
        self.rank, self.world = rank_world()
        self.flops_per_token = flops_per_token(model_cfg, cfg.data.seq_len)

    def _batch(self, index: list[int], split: str) -> dict:
        pairs = self.pairs if split == "train" else self.val
        batch = pair_batch([pairs[i] for i in index], self.pad_id, max_width=self.cfg.data.seq_len)
        batch["index"] = torch.tensor(index)
        batch["split"] = split
        return batch

    def next_step(self) -> tuple[list, dict]:
        ids = self.sampler.next_batch()  # the same global batch on every rank
        index = [self.pools.train[p].rows[s][0] for p, s in ids]
        mine = rank_slice(index, self.rank, self.world)
        micro = self.cfg.data.micro_batch
        tokens = sum(len(self.pairs[i].chosen) + len(self.pairs[i].rejected) - 2 for i in index)
        return [self._batch(mine[i:i + micro], "train") for i in range(0, len(mine), micro)], {"tokens": tokens}

    def after_step(self, engine: Engine, result: StepResult) -> dict:
        if not result.skipped:
            engine.module.update_router_bias(dist.all_reduce if self.world > 1 else None)
        return expert_metrics(engine.module)


class DpoJob(PairJob):
    summary_keys = ("dpo_loss", "rewards/accuracies", "rewards/margins")

    def __init__(self, cfg: DpoConfig, pairs: list[EncodedPair], val: list[EncodedPair], model_cfg,
                 pad_id: int, reference: "ReferenceLogps"):
        super().__init__(cfg, pairs, val, model_cfg, pad_id, reference.seed)
        self.reference = reference

    def loss_fn(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        logp, n, aux = sequence_logps(model, batch)
        lp = as_pairs(logp, n, self.reference.of(batch))
        out = preference_loss(self.cfg.loss.name, lp, **self.cfg.loss.params())
        loss = out.losses_B.mean()
        metrics = out.metrics(lp)
        metrics["dpo_loss"] = metrics.pop("loss")
        if self.cfg.loss.rpo_alpha:
            nll = chosen_nll(lp)
            loss = loss + self.cfg.loss.rpo_alpha * nll
            metrics["nll_loss"] = nll.detach()
        return loss + aux, {**metrics, "aux_loss": aux}

    @torch.no_grad()
    def evaluate(self, engine: Engine) -> dict:
        """The loss and implicit-reward figures on held-out pairs, overall and per kind of pair."""
        def score(batch: dict):
            lp = pair_logps(engine.module, to_device(batch, engine.device), self.reference.of(batch))
            out = preference_loss(self.cfg.loss.name, lp, **self.cfg.loss.params())
            return out.losses_B, out.chosen_rewards_B, out.rejected_rewards_B
        engine.module.eval()
        figures = held_out_pairs(self.val, self.cfg.data.micro_batch, lambda chunk: self._batch(chunk, "val"), score)
        engine.module.train()
        return {f"val/{name}" if name == "loss" else f"val/rewards/{name}": v for name, v in figures.items()}


def held_out_pairs(val: list[EncodedPair], micro: int, make_batch, score) -> dict:
    """Held-out figures of a pair scorer: mean loss, accuracy (chosen scores above rejected),
    margin, and each kind's accuracy (`accuracies/<kind>`). score(batch) -> (losses, chosen,
    rejected) per pair; every rank calls it the same number of times (ZeRO-3 forwards are collective)."""
    if not val:
        return {}
    kinds = sorted({p.kind for p in val})
    sums = torch.zeros(4 + 2 * len(kinds), dtype=torch.float64)  # loss, right, margin, pairs; per kind right, pairs
    for chunk in rank_chunks(len(val), micro):
        losses, chosen, rejected = (t.double().cpu() for t in score(make_batch(chunk or [0])))
        if not chunk:
            continue
        right = chosen > rejected
        sums[:4] += torch.stack([losses.sum(), right.double().sum(), (chosen - rejected).sum(),
                                 torch.tensor(float(len(chunk)), dtype=torch.float64)])
        for i, ok in zip(chunk, right.tolist()):
            k = 4 + 2 * kinds.index(val[i].kind)
            sums[k:k + 2] += torch.tensor([float(ok), 1.0], dtype=torch.float64)
    total = all_sum(sums.tolist())
    n = total[3]
    out = {"loss": total[0] / n, "accuracies": total[1] / n, "margins": total[2] / n}
    out.update({f"accuracies/{kind}": total[4 + 2 * j] / total[5 + 2 * j] for j, kind in enumerate(kinds)})
    return out


class ReferenceLogps:
    """The reference's (chosen, rejected) log-probs of a batch: read from the precomputed table,
    or scored by a frozen copy of the initial model at each call; none for a reference-free loss."""

    def __init__(self, cfg: DpoConfig, paths: DpoPaths, pairs: dict[str, list[EncodedPair]], pad_id: int, seed: int,
                 on_work_file: Callable[[Path], None] = lambda path: None):
        self.cfg, self.seed, self.paths, self.on_work_file = cfg, seed, paths, on_work_file
        self.mode = "none" if not NEEDS_REFERENCE[cfg.loss.name] else cfg.reference
        self._frozen: FrozenModel | None = None
        self.table: dict[str, torch.Tensor] = {}
        if self.mode == "precomputed":
            model_digest = hashlib.sha256((paths.init_model / "model.safetensors").read_bytes()).digest()
            self.table = {split: self._precompute(model_digest, split, rows, pad_id) for split, rows in pairs.items()}
            self._frozen = None  # not needed any more: free its memory

    @property
    def frozen(self) -> FrozenModel:
        """The start model, frozen; built on first use (a resumed run that finds the stored
        log-probs never builds it)."""
        if self._frozen is None:
            self._frozen = FrozenModel.from_folder(self.paths.init_model, self.cfg.engine,
                                                   micro_batch=self.cfg.data.micro_batch)
        return self._frozen

    def of(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        if self.mode == "none":  # SimPO: reference-free
            return None, None
        if self.mode == "precomputed":
            rows = self.table[batch["split"]][batch["index"].cpu()]
            return rows[:, 0], rows[:, 1]
        return reference_logps(self.frozen, to_device(batch, self.frozen.device))

    def _precompute(self, model_digest: bytes, split: str, pairs: list[EncodedPair], pad_id: int) -> torch.Tensor:
        """(n, 2) float32: computed once over the ranks, stored under work/, reused on resume."""
        h = hashlib.sha256(model_digest)
        h.update(json.dumps([[p.id, p.chosen, p.rejected] for p in pairs]).encode())
        path = Path(self.paths.work) / f"reference-{split}-{h.hexdigest()[:16]}.safetensors"
        # every rank takes the file, or none: a node without it (it went up to the object store after
        # this gang's nodes fetched the work folder) would otherwise compute alone, collectives and all
        if all_sum([float(path.is_file())])[0] == rank_world()[1]:
            return load_file(path)["logps"]
        out = []
        for chunk in rank_chunks(len(pairs), self.cfg.data.micro_batch):
            batch = pair_batch([pairs[i] for i in chunk or [0]], pad_id, max_width=self.cfg.data.seq_len)
            c, r = reference_logps(self.frozen, to_device(batch, self.frozen.device))
            if chunk:
                out += torch.stack([c, r], 1).cpu().tolist()
        table = torch.tensor([row for part in all_gather(out) for row in part], dtype=torch.float32).view(-1, 2)

        def save() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            save_file({"logps": table}, tmp)
            tmp.replace(path)
            self.on_work_file(path)  # a run on object storage: a resumed stage on another node finds it
        on_rank0(save)
        return table


def load_pairs(cfg, paths, stage: str) -> tuple:
    """(start model's config, tokenizer, train pairs, held-out pairs, train pairs too long) of a run
    that learns from pairs; errors name the stage's keys."""
    model_cfg = check_model(cfg, paths.init_model, key=f"{stage}.data.seq_len")
    tok = load_tokenizer(paths.init_model)
    train_pairs, too_long = encode_pairs(read_pairs(paths.train_files), tok, cfg.data.seq_len)
    val_pairs, _ = encode_pairs(read_pairs(paths.val_files), tok, cfg.data.seq_len)
    if not train_pairs:
        raise ValueError(f"{stage}: no training pairs in {[str(f) for f in paths.train_files]}" if not too_long else
                         f"{stage}: none of the {too_long} training pairs fits {stage}.data.seq_len={cfg.data.seq_len}")
    return model_cfg, tok, train_pairs, val_pairs[:cfg.data.val_max_pairs], too_long


def run_pair_job(cfg, paths, job: PairJob, tok, too_long: int, make_model, hooks: Hooks | None) -> dict:
    """Train a job that learns from pairs to cfg.steps (resuming), save its model with the
    tokenizer, and return rank 0's summary with the pair counts ({} on the other ranks)."""
    loop = train(cfg, job, checkpoints=paths.checkpoints, hooks=hooks, make_model=make_model,
                 micro_batch=cfg.data.micro_batch, global_batch=cfg.data.global_batch)
    loop.save_model(Path(paths.out) / "model", tok, model_max_length=job.model_cfg.max_seq_len)
    if job.rank != 0:
        return {}
    return {**loop.summary(), "pairs": len(job.pairs), "pairs_too_long": too_long, "val_pairs": len(job.val)}


def dpo(cfg: DpoConfig, paths: DpoPaths, *, seed: int, hooks: Hooks | None = None) -> dict:
    """Train the policy to cfg.steps (resuming from the newest good checkpoint); rank 0's summary."""
    ensure_process_group()
    model_cfg, tok, train_pairs, val_pairs, too_long = load_pairs(cfg, paths, "dpo")
    pad_id = tok.token_to_id(PAD)
    reference = ReferenceLogps(cfg, paths, {"train": train_pairs, "val": val_pairs}, pad_id, seed,
                               on_work_file=(hooks or Hooks()).on_work_file)
    job = DpoJob(cfg, train_pairs, val_pairs, model_cfg, pad_id, reference)
    summary = run_pair_job(cfg, paths, job, tok, too_long, lambda: load_model(paths.init_model), hooks)
    return summary and {**summary, "loss_name": cfg.loss.name, "reference": cfg.reference}


def worker(payload: dict, hooks: Hooks) -> dict:
    """The gang's entry point (cluster/train.py): JSON payload in, rank 0's summary out."""
    paths = DpoPaths(**paths_from_payload(payload["paths"]))
    return dpo(DpoConfig.model_validate(payload["config"]), paths, seed=payload["seed"], hooks=hooks)
