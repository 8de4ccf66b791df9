"""Preference pairs for DPO and the reward model: (prompt, chosen, rejected) rows.

    rows = offline_pairs(task_rows, OfflinePairsConfig(), split="train", seed=0)   # from generated tasks
    user, rejected = read_pair_files(cfg.files)                                  # rows + rejections with file/line

Offline pairs come from the generator's tasks (the `tasks` stage's rows): the worked solution is
chosen, and data_engine.generators.tasks.make_preference_pair writes the rejected response (an arithmetic slip
carried into the answer, a wrong final answer, or a right answer with no reasoning). Pairs of the
eval split are held out: DPO reports its preference accuracy on them and never trains on them.

User files hold `prompt`, `chosen` and `rejected`, as strings or, as in HF preference data sets,
as chat messages: a prompt list ending with the user's turn and chosen/rejected lists ending with
the assistant's, or chosen/rejected whole conversations that share every turn but the last.

A row of the output (PAIR_SCHEMA): id, split, source, kind, task_id, family, difficulty, prompt,
system, context (JSON list of earlier messages), chosen, rejected.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Iterable, Literal

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from data_engine.ingest import InputSpec, resolve_files
from data_engine.schema import DIFFICULTIES, Strict
from data_engine.task_data import TASK_REJECT_SCHEMA, RowError, Where, from_messages, read_user_files, scalar_field
from data_engine.generators.tasks import REJECT_KINDS, Task, make_preference_pair

PAIR_SCHEMA = pa.schema([
    ("id", pa.string()), ("split", pa.string()), ("source", pa.string()), ("kind", pa.string()),
    ("task_id", pa.string()), ("family", pa.string()), ("difficulty", pa.string()), ("prompt", pa.string()),
    ("system", pa.string()), ("context", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
])
PAIR_REJECT_SCHEMA = TASK_REJECT_SCHEMA


class OfflinePairsConfig(Strict):
    """Pairs made from the generator's tasks: the worked solution against a plausible wrong one."""

    enabled: bool = Field(True, description="false: user files only")
    kinds: list[str] = Field(default_factory=lambda: list(REJECT_KINDS), description="drawn uniformly per pair")
    per_task: int = Field(1, ge=1, description="pairs per task (each with its own drawn rejected response)")
    max_train: int | None = Field(None, ge=0, description=(
        "at most this many train pairs (a seeded sample); None: all"))
    max_eval: int | None = Field(None, ge=0, description="held-out pairs, from the eval split's tasks")

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, kinds: list[str]) -> list[str]:
        unknown = [k for k in kinds if k not in REJECT_KINDS]
        if unknown or not kinds or len(set(kinds)) != len(kinds):
            raise ValueError(f"kinds: unknown, repeated or none {unknown or kinds}; known: {', '.join(REJECT_KINDS)}")
        return kinds


class OnPolicyPairsConfig(Strict):
    """Pairs sampled from a model (the sft stage's): k responses per train prompt, scored by the
    task's checker and the format check, the best against the worst; all-tied prompts skipped."""

    enabled: bool = Field(False, description="true: add these pairs to the training split")
    model: Path | None = Field(None, description="the model folder to sample; None: the sft stage's model/")
    k: int = Field(4, ge=2, description="samples per prompt")
    max_prompts: int | None = Field(256, ge=1, description=(
        "train prompts sampled (spread over families); None: all"))
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    max_new_tokens: int = Field(256, ge=1, description="longest response")
    batch_size: int = Field(32, ge=1, description="sequences decoded together (prompts x k)")
    use_gpu: bool = Field(False, description="one GPU per sampling worker")


class PairFieldMap(Strict):
    """Which fields of a user file hold each part of a pair (None: the file has none)."""

    id: str | None = Field("id", description="None or missing: a hash of source, prompt, chosen and rejected")
    prompt: str | None = Field("prompt", description=(
        "a string, or chat messages ending with the user's turn; None: implicit"))
    chosen: str = Field("chosen", description="a string, or chat messages ending with the assistant's turn")
    rejected: str = Field("rejected", description="the dispreferred response, in the same shape as chosen")
    system: str | None = Field(None, description="a system message, when the prompt is a string")
    family: str | None = Field("family", description="groups the figures; missing: the file's `family`")
    difficulty: str | None = Field("difficulty", description="basic / advanced / expert, or missing")


class PairFileSpec(Strict):
    """A user file of preference pairs: JSONL, JSON, Parquet or an HF datasets folder."""

    path: str = Field(description="a file, a folder or a glob")
    format: Literal["auto", "jsonl", "json", "parquet", "hf"] = Field("auto", description=(
        "auto: by extension; hf: a datasets folder"))
    split: Literal["train", "eval"] = Field("train", description="eval: held out for the preference accuracy")
    fields: PairFieldMap = PairFieldMap()
    family: str = Field("user", description="for rows without a family field")
    source: str | None = Field(None, description="default: the file's stem")


# ---------------------------------------------------------------- offline pairs


def offline_pairs(task_rows: Iterable[dict], cfg: OfflinePairsConfig, split: str, seed: int) -> list[dict]:
    """Pairs from the generated tasks among task_rows (rows of the tasks stage); user tasks have no
    worked solution of the generator's shape and are left to on-policy pairs. The rejected response
    of each pair is drawn from a generator seeded by (seed, task id, copy), so a pair does not depend
    on which other tasks are present."""
    rows = []
    for row in task_rows:
        if row["source"] != "generator" or row["response"] is None or row["answer"] is None:
            continue
        task = Task(id=row["id"], family=row["family"], prompt=row["prompt"], solution=row["response"],
                    answer=row["answer"], difficulty=row["difficulty"], domain=row["domain"])
        for copy in range(cfg.per_task):
            rng = random.Random(f"{seed}/{task.id}/{copy}")
            kind = rng.choice(cfg.kinds)
            chosen, rejected = make_preference_pair(task, rng, kind)
            rows.append({"id": f"{task.id}/p{copy}", "split": split, "source": "offline", "kind": kind,
                         "task_id": task.id, "family": task.family, "difficulty": task.difficulty,
                         "prompt": task.prompt, "system": row.get("system"), "context": row.get("context"),
                         "chosen": chosen, "rejected": rejected})
    limit = cfg.max_train if split == "train" else cfg.max_eval
    if limit is not None and limit < len(rows):
        picked = sorted(random.Random(f"{seed}/{split}/sample").sample(range(len(rows)), limit))
        rows = [rows[i] for i in picked]
    return rows


# ---------------------------------------------------------------- user files


def read_pair_files(specs: Iterable[PairFileSpec]) -> tuple[list[dict], list[dict]]:
    """Pairs of every user file, and the rows that cannot be used with their reason, file and line."""
    return read_user_files(specs, pair_from_raw)


def pair_from_raw(raw, spec: PairFileSpec, where: Where) -> dict:
    """One user row as a pair row; raises RowError with the reason it cannot be used."""
    if not isinstance(raw, dict):
        raise RowError("not_a_record", f"row is {type(raw).__name__}, not an object")
    f = spec.fields
    chosen_ctx, chosen = _response(raw, f.chosen, "chosen")
    rejected_ctx, rejected = _response(raw, f.rejected, "rejected")
    if chosen_ctx != rejected_ctx:
        raise RowError("prompt_mismatch", f"fields {f.chosen!r} and {f.rejected!r} differ before their last turn")
    prompt, system, context = _prompt(raw, f, chosen_ctx)
    if chosen == rejected:
        raise RowError("identical_responses", f"fields {f.chosen!r} and {f.rejected!r} hold the same response")
    values = {name: scalar_field(raw, getattr(f, name)) for name in ("id", "family", "difficulty")}
    if values["difficulty"] is not None and values["difficulty"] not in DIFFICULTIES:
        raise RowError("bad_difficulty", f"difficulty {values['difficulty']!r}; expected one of {DIFFICULTIES}")
    key = "\x00".join([where.source, prompt, chosen, rejected])
    row_id = values["id"] or "u" + hashlib.sha256(key.encode()).hexdigest()[:24]
    return {"id": row_id, "split": spec.split, "source": where.source, "kind": "user", "task_id": None,
            "family": values["family"] or spec.family, "difficulty": values["difficulty"], "prompt": prompt,
            "system": system, "context": json.dumps(context) if context else None,
            "chosen": chosen, "rejected": rejected}


def _response(raw: dict, key: str, role: str) -> tuple[list[dict], str]:
    """(the turns before the response, the response) of a string or a message list; role is
    "chosen" or "rejected", whatever the file calls the field."""
    value = raw.get(key)
    if value is None:
        raise RowError(f"missing_{role}", f"no field {key!r}")
    if isinstance(value, str):
        if not value.strip():
            raise RowError(f"empty_{role}", f"field {key!r} is empty")
        return [], value
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        raise RowError("wrong_type", f"field {key!r} is {type(value).__name__}, not a string or a message list")
    messages = [{"role": m.get("role"), "content": m.get("content")} for m in value]
    last = messages[-1]
    if last["role"] != "assistant" or not isinstance(last["content"], str) or not last["content"].strip():
        raise RowError("bad_messages", f"field {key!r}: the last message must be a non-empty assistant turn")
    return messages[:-1], last["content"]


def _prompt(raw: dict, f: PairFieldMap, turns_before: list[dict]) -> tuple[str, str | None, list[dict]]:
    """(prompt, system, earlier messages): from the prompt field, or from the turns the responses share."""
    value = raw.get(f.prompt) if f.prompt else None
    if value is None and not turns_before:
        raise RowError("missing_prompt", f"no field {f.prompt!r} and no shared turns before the responses")
    if value is not None and turns_before:
        raise RowError("prompt_twice", f"field {f.prompt!r} is given and the responses carry their own turns too")
    if isinstance(value, str):
        if not value.strip():
            raise RowError("empty_prompt", f"field {f.prompt!r} is empty")
        system = scalar_field(raw, f.system)
        return value, system, []
    messages = turns_before if value is None else value
    prompt, response, system, context = from_messages(messages, f.prompt or f.chosen)
    if response is not None:
        raise RowError("bad_messages", f"field {f.prompt!r}: the prompt must end with the user's turn")
    return prompt, system, context


def tables(rows: list[dict], rejected: list[dict]) -> tuple[pa.Table, pa.Table]:
    return (pa.Table.from_pylist(rows, schema=PAIR_SCHEMA),
            pa.Table.from_pylist(rejected, schema=PAIR_REJECT_SCHEMA))


class PairsConfig(Strict):
    """The pairs stage: offline pairs from the generated tasks and/or user files, train and held out."""

    offline: OfflinePairsConfig = OfflinePairsConfig()
    on_policy: OnPolicyPairsConfig = Field(OnPolicyPairsConfig(), description=(
        "training pairs sampled from the SFT model"))
    files: list[PairFileSpec] = Field(default_factory=list, description=(
        "user files, beside or instead of offline pairs"))

    @model_validator(mode="after")
    def _has_a_source(self) -> "PairsConfig":
        if not self.offline.enabled and not self.on_policy.enabled and not self.files:
            raise ValueError("pairs: offline and on-policy pairs are disabled and no `files` are given: nothing to write")
        return self

    def fingerprint_files(self) -> list[Path]:
        """The user files this section reads: their contents are part of the stage's fingerprint."""
        return [Path(f) for spec in self.files for f, _ in resolve_files(InputSpec(path=spec.path, format=spec.format))]
