"""Task data for post-training: generated verifiable tasks and user files, as a train split and a
held-out eval split that share no problem.

    cfg = TasksConfig(generator={"train_per_cell": 500, "eval_per_cell": 20})
    eval_rows = generated_split(cfg.generator, "eval", seed=0)               # fixed by (seed, counts)
    user, rejected = read_task_files(cfg.files)                              # rows + rejections with file/line
    train, overlaps = generated_train(cfg.generator, seed, Overlaps(eval_rows, cfg.decontamination))
    index = ContaminationIndex(eval_rows, cfg.decontamination)               # then, per corpus batch:
    hits = index.contaminated(corpus_batch)                                  # Table(doc_id, task_id, containment)

The eval split is drawn first and never changed by what the training data holds: every
training input is filtered against it instead (decontamination), as benchmarks are kept clean.
A training prompt is dropped, with its reason, when it is the same problem as an eval prompt:
  - ``exact``: the same normalised prompt (dedup's normalisation);
  - ``same_numbers``: the same family, the same numbers in the same order and the same answer
    ("Compute 3 + 4." against "What is the value of 3 + 4?");
  - ``near``: a near-duplicate by dedup's MinHash LSH, verified at the Jaccard threshold.
Pretraining documents that contain an eval prompt (shingle containment) are listed for the
pretrain stage to leave out.

A row of the output (TASK_SCHEMA): id, split, source, family, domain, difficulty, prompt,
system, context (JSON list of earlier messages), response (the worked solution, for SFT),
answer and checker (for rewards and evaluation; data_engine.generators.tasks.CHECKERS).
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from data_engine.dedup import DedupConfig
from data_engine.dedup_minhash import cross_edges, normalize_text, shingle_hashes
from data_engine.ingest import InputSpec, file_rows, resolve_files
from data_engine.schema import DIFFICULTIES, Strict
from data_engine.generators.tasks import CHECKERS, FAMILIES, Task, generate_tasks

TASK_SCHEMA = pa.schema([
    ("id", pa.string()), ("split", pa.string()), ("source", pa.string()), ("family", pa.string()),
    ("domain", pa.string()), ("difficulty", pa.string()), ("prompt", pa.string()), ("system", pa.string()),
    ("context", pa.string()), ("response", pa.string()), ("answer", pa.string()), ("checker", pa.string()),
])
TASK_REJECT_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("prompt", pa.string()), ("reason", pa.string()),
    ("detail", pa.string()), ("file", pa.string()), ("line", pa.int64()),
])
SPLITS = ("train", "eval")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


class GeneratorConfig(Strict):
    """The verifiable task generator (data_engine/generators/tasks.py): counts per family and difficulty."""

    enabled: bool = Field(True, description="false: user files only")
    families: list[str] | None = Field(None, description="None: every family of data_engine.generators.tasks.FAMILIES")
    train_per_cell: int = Field(200, ge=0, description="train tasks per (family, difficulty)")
    eval_per_cell: int = Field(10, ge=0, description="held-out tasks per (family, difficulty)")
    train_difficulties: list[str] = Field(default_factory=lambda: list(DIFFICULTIES), description=(
        "levels of the train split"))
    eval_difficulties: list[str] = Field(default_factory=lambda: list(DIFFICULTIES), description=(
        "levels of the eval split"))
    cells: dict[str, int] = Field(default_factory=dict, description=(
        "train counts that differ from train_per_cell: \"family\" or \"family/difficulty\" -> count"))
    seed: int | None = Field(None, description="None: the pipeline's seed")

    @model_validator(mode="after")
    def _known_names(self) -> "GeneratorConfig":
        if self.families is not None:
            _known("families", self.families, FAMILIES)
        _known("train_difficulties", self.train_difficulties, DIFFICULTIES)
        _known("eval_difficulties", self.eval_difficulties, DIFFICULTIES)
        for key, n in self.cells.items():
            family, _, level = key.partition("/")
            if family not in FAMILIES or (level and level not in DIFFICULTIES) or n < 0:
                raise ValueError(f"cells[{key!r}]: expected 'family' or 'family/difficulty' with a count >= 0 "
                                 f"(families: {', '.join(FAMILIES)}; difficulties: {', '.join(DIFFICULTIES)})")
        return self

    @property
    def family_names(self) -> list[str]:
        return list(self.families) if self.families is not None else list(FAMILIES)

    def train_count(self, family: str, difficulty: str) -> int:
        return self.cells.get(f"{family}/{difficulty}", self.cells.get(family, self.train_per_cell))


def _known(key: str, names: list[str], known) -> None:
    unknown = [n for n in names if n not in known]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"{key}: unknown or repeated {unknown or names}; known: {', '.join(known)}")


class TaskFieldMap(Strict):
    """Which fields of a user file hold each part of a task (None: the file has none)."""

    id: str | None = Field("id", description="None or missing: a hash of source, prompt and response")
    prompt: str | None = Field("prompt", description="the user's message (or use `messages`)")
    response: str | None = Field("response", description="the worked solution SFT trains on")
    messages: str | None = Field(None, description=(
        "chat messages [{role, content}]: the last assistant turn is the response"))
    system: str | None = Field(None, description="a system message for the prompt")
    answer: str | None = Field("answer", description="the expected answer rewards and evaluation check against")
    checker: str | None = Field("checker", description="the name of its checker (data_engine.generators.tasks.CHECKERS)")
    family: str | None = Field("family", description=(
        "groups the evaluation table; missing: the file's `family`"))
    difficulty: str | None = Field("difficulty", description="basic / advanced / expert, or missing")


class TaskFileSpec(Strict):
    """A user file of tasks: JSONL, JSON, Parquet or an HF datasets folder (`save_to_disk`)."""

    path: str = Field(description="a file, a folder or a glob")
    format: Literal["auto", "jsonl", "json", "parquet", "hf"] = Field("auto", description=(
        "auto: by extension; hf: a datasets folder"))
    split: Literal["train", "eval"] = Field("train", description=(
        "eval: held out, and every train row is checked against it"))
    fields: TaskFieldMap = TaskFieldMap()
    checker: str = Field("answer", description="for rows with an answer and no checker field")
    family: str = Field("user", description="for rows without a family field")
    source: str | None = Field(None, description="default: the file's stem")

    @field_validator("checker")
    @classmethod
    def _known_checker(cls, name: str) -> str:
        if name not in CHECKERS:
            raise ValueError(f"unknown checker {name!r}; known: {sorted(CHECKERS)}")
        return name


class DecontaminationConfig(Strict):
    """How 'the same problem' is found between the eval split and every training input."""

    ngram: int = Field(5, ge=1, description="word n-grams of the MinHash and of the corpus containment")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations")
    threshold: float = Field(0.7, gt=0, le=1, description="near-duplicate: estimated Jaccard at least this")
    same_numbers: bool = Field(True, description="same family + numbers in order + answer = the same problem")
    corpus_containment: float = Field(0.8, gt=0, le=1, description=(
        "a corpus document holding at least this share of an eval prompt's n-grams is left out of pretraining"))
    corpus_text_column: str = Field("text", description=(
        "the corpus column scanned for eval prompts (pretrain's data.text_column)"))

    def dedup(self) -> DedupConfig:
        # The MinHash estimate, as when the held-out split every figure in BENCHMARKS.md was
        # measured on was drawn: exact Jaccard would move a few borderline prompts across it.
        return DedupConfig(ngram=self.ngram, num_perm=self.num_perm, threshold=self.threshold,
                           jaccard="estimated")


class TasksConfig(Strict):
    """The tasks stage: generated tasks and/or user files, split into train and held-out eval."""

    generator: GeneratorConfig = GeneratorConfig()
    files: list[TaskFileSpec] = Field(default_factory=list, description=(
        "user files, beside or instead of the generator"))
    decontamination: DecontaminationConfig = DecontaminationConfig()

    @model_validator(mode="after")
    def _has_a_source(self) -> "TasksConfig":
        if not self.generator.enabled and not self.files:
            raise ValueError("tasks: the generator is disabled and no `files` are given: nothing to write")
        return self

    def fingerprint_files(self) -> list[Path]:
        """The user files this section reads (globs resolved): their contents are part of the stage's
        fingerprint, so editing an SFT file reruns tasks and what follows."""
        return [Path(f) for spec in self.files for f, _ in resolve_files(InputSpec(path=spec.path, format=spec.format))]


# ---------------------------------------------------------------- generated tasks


def task_row(task: Task, split: str, source: str = "generator") -> dict:
    return {"id": task.id, "split": split, "source": source, "family": task.family, "domain": task.domain,
            "difficulty": task.difficulty, "prompt": task.prompt, "system": None, "context": None,
            "response": task.solution, "answer": task.answer, "checker": "answer"}


def cell_seed(seed: int, split: str, family: str, difficulty: str) -> int:
    """An independent stream per (split, family, difficulty): counts of one cell never move another."""
    return int(hashlib.sha256(f"tasks:{split}:{seed}:{family}:{difficulty}".encode()).hexdigest()[:12], 16)


def generated_split(gen: GeneratorConfig, split: str, seed: int) -> list[dict]:
    """The generator's rows of one split, cell by cell (family x difficulty), no filtering."""
    rows = []
    for family in gen.family_names:
        levels = gen.eval_difficulties if split == "eval" else gen.train_difficulties
        for level in levels:
            n = gen.eval_per_cell if split == "eval" else gen.train_count(family, level)
            tasks = generate_tasks(n, cell_seed(seed, split, family, level), families=[family], difficulties=[level])
            rows += [task_row(t, split) for t in tasks]
    return rows


def generated_train(gen: GeneratorConfig, seed: int, overlaps: "Overlaps") -> tuple[list[dict], list[dict], dict]:
    """Train rows with none overlapping the eval split: each cell draws further along its own
    stream until it has its count (or 4x + 100 candidates were seen: a small cell may run out).
    Returns (kept, rejected overlaps, shortfall per cell)."""
    kept, rejected, short = [], [], {}
    for family in gen.family_names:
        for level in gen.train_difficulties:
            want = gen.train_count(family, level)
            rows, dropped = _clean_cell(family, level, want, cell_seed(seed, "train", family, level), overlaps)
            kept += rows
            rejected += dropped
            if len(rows) < want:
                short[f"{family}/{level}"] = want - len(rows)
    return kept, rejected, short


def _clean_cell(family: str, level: str, want: int, seed: int, overlaps: "Overlaps") -> tuple[list[dict], list[dict]]:
    """The first `want` rows of the cell's stream that overlap no eval problem, and the overlapping
    rows met before them (rows past the last one taken were never part of the split)."""
    if want == 0:
        return [], []
    n = want + max(8, want // 8)
    while True:
        rows = [task_row(t, "train") for t in generate_tasks(n, seed, families=[family], difficulties=[level])]
        found = overlaps.find(rows)
        clean_at = [i for i, r in enumerate(rows) if r["id"] not in found]
        if len(clean_at) >= want or n >= 4 * want + 100:
            used = rows[:clean_at[want - 1] + 1] if len(clean_at) >= want else rows
            return ([r for r in used if r["id"] not in found],
                    [_overlap_reject(r, found[r["id"]]) for r in used if r["id"] in found])
        n = min(2 * n, 4 * want + 100)


def _overlap_reject(row: dict, hit: tuple[str, str, float]) -> dict:
    kind, eval_id, score = hit
    return row_reject(row, "overlaps_eval", {"kind": kind, "eval_id": eval_id, "score": round(score, 4)})


# ---------------------------------------------------------------- overlap with the eval split


def numbers_key(row: dict) -> tuple | None:
    """(family, numbers in order, answer): the problem without its wording; None without both."""
    numbers = tuple(_NUMBER.findall(row["prompt"]))
    if not numbers or not row.get("answer"):
        return None
    return row["family"], numbers, row["answer"].strip()


class Overlaps:
    """Finds training rows that pose an eval problem (exact, same numbers, or near-duplicate)."""

    def __init__(self, eval_rows: list[dict], cfg: DecontaminationConfig):
        self.cfg, self.dedup_cfg = cfg, cfg.dedup()
        self.exact = {normalize_text(r["prompt"], self.dedup_cfg): r["id"] for r in eval_rows}
        self.numbers = {k: r["id"] for r in eval_rows if (k := numbers_key(r)) is not None}
        self.eval_table = pa.table({"id": [r["id"] for r in eval_rows], "text": [r["prompt"] for r in eval_rows]},
                                   schema=pa.schema([("id", pa.string()), ("text", pa.string())]))

    def find(self, rows: list[dict]) -> dict[str, tuple[str, str, float]]:
        """id -> (kind, eval id, score) for every row that overlaps the eval split."""
        found: dict[str, tuple[str, str, float]] = {}
        for r in rows:
            hit = self.exact.get(normalize_text(r["prompt"], self.dedup_cfg))
            if hit is not None:
                found[r["id"]] = ("exact", hit, 1.0)
            elif self.cfg.same_numbers and (key := numbers_key(r)) in self.numbers:
                found[r["id"]] = ("same_numbers", self.numbers[key], 1.0)
        rest = [r for r in rows if r["id"] not in found]
        if rest and self.eval_table.num_rows:
            table = pa.table({"id": [r["id"] for r in rest], "text": [r["prompt"] for r in rest]})
            for edge in cross_edges(table, self.eval_table, self.dedup_cfg).to_pylist():
                if edge["a"] not in found:
                    found[edge["a"]] = ("near", edge["b"], edge["jaccard"])
        return found


class ContaminationIndex:
    """Eval prompts by their n-gram hashes: which pretraining documents contain one of them.

    A prompt shorter than `ngram` words is one shingle of its own length, so documents are
    shingled at that length too (one extra pass per distinct short length)."""

    def __init__(self, eval_rows: list[dict], cfg: DecontaminationConfig):
        self.cfg, self.dedup_cfg = cfg, cfg.dedup()
        self.ids = [r["id"] for r in eval_rows]
        self.sizes: list[int] = []
        self.index: dict[int, dict[int, list[int]]] = {}  # shingle length -> hash -> prompt indices
        for i, r in enumerate(eval_rows):
            words = normalize_text(r["prompt"], self.dedup_cfg).split()
            n = min(cfg.ngram, len(words))
            hashes = set(shingle_hashes(" ".join(words), n)) if n else set()
            self.sizes.append(len(hashes))
            for h in hashes:
                self.index.setdefault(n, {}).setdefault(h, []).append(i)

    def contaminated(self, batch: pa.Table, text_column: str = "text") -> pa.Table:
        """Table(doc_id, task_id, containment): documents of an (id, text) batch that hold at least
        corpus_containment of an eval prompt's n-grams, one row per (document, prompt)."""
        out = {"doc_id": [], "task_id": [], "containment": []}
        cache: dict[str, int] = {}
        for doc_id, text in zip(batch.column("id").to_pylist(), batch.column(text_column).to_pylist()):
            normal = normalize_text(text, self.dedup_cfg)
            hits: Counter = Counter()
            for n, table in self.index.items():
                for h in set(shingle_hashes(normal, n, cache)):
                    for i in table.get(h, ()):
                        hits[i] += 1
            for i, k in sorted(hits.items()):
                share = k / self.sizes[i]
                if share >= self.cfg.corpus_containment:
                    out["doc_id"].append(str(doc_id))
                    out["task_id"].append(self.ids[i])
                    out["containment"].append(share)
        return pa.table(out, schema=pa.schema([("doc_id", pa.string()), ("task_id", pa.string()),
                                               ("containment", pa.float64())]))


# ---------------------------------------------------------------- user files


@dataclass
class Where:
    file: str
    line: int
    source: str


class RowError(Exception):
    """A user row that cannot be used: (reason, message)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def read_task_files(specs: Iterable[TaskFileSpec]) -> tuple[list[dict], list[dict]]:
    """Rows of every user file, and the rows that cannot be used with their reason, file and line.
    Kept rows carry their file and line too (not written), so a later rejection can name them."""
    return read_user_files(specs, task_from_raw)


def read_user_files(specs: Iterable, row_fn: Callable) -> tuple[list[dict], list[dict]]:
    """row_fn(raw, spec, where) over every row of every spec's files (a spec has path, format,
    source, fields.id and fields.prompt): (rows with their file and line, rejections)."""
    kept, rejected = [], []
    for spec in specs:
        for path, fmt in resolve_files(InputSpec(path=spec.path, format=spec.format)):
            source = spec.source or Path(path).stem
            for line, raw, error in file_rows(path, fmt, source):
                where = Where(path, line, source)
                try:
                    if error is not None:
                        raise RowError(*error)
                    kept.append({**row_fn(raw, spec, where), "file": path, "line": line})
                except RowError as bad:
                    rejected.append(file_reject(where, raw, spec, bad.reason, bad.message))
    return kept, rejected


def task_from_raw(raw, spec: TaskFileSpec, where: Where) -> dict:
    """One user row as a task row; raises RowError with the reason it cannot be used."""
    if not isinstance(raw, dict):
        raise RowError("not_a_record", f"row is {type(raw).__name__}, not an object")
    f = spec.fields
    prompt, response, system, context = _prompt_and_response(raw, f)
    values = {name: scalar_field(raw, getattr(f, name)) for name in ("answer", "checker", "family", "difficulty", "id")}
    checker = values["checker"] or spec.checker
    if checker not in CHECKERS:
        raise RowError("unknown_checker", f"checker {checker!r}; known: {sorted(CHECKERS)}")
    if values["difficulty"] is not None and values["difficulty"] not in DIFFICULTIES:
        raise RowError("bad_difficulty", f"difficulty {values['difficulty']!r}; expected one of {DIFFICULTIES}")
    if spec.split == "eval" and values["answer"] is None:
        raise RowError("no_answer", "an eval row needs an answer to check against")
    if response is None and values["answer"] is None:
        raise RowError("no_response_or_answer", "a train row needs a response (SFT) or an answer (RL)")
    row_id = values["id"] or "u" + hashlib.sha256(f"{where.source}\x00{prompt}\x00{response}".encode()).hexdigest()[:24]
    return {"id": row_id, "split": spec.split, "source": where.source, "family": values["family"] or spec.family,
            "domain": None, "difficulty": values["difficulty"], "prompt": prompt, "system": system,
            "context": json.dumps(context) if context else None, "response": response,
            "answer": values["answer"], "checker": checker if values["answer"] is not None else None}


def scalar_field(raw: dict, key: str | None) -> str | None:
    """A short field (id, answer, checker, ...) as text; numbers are accepted and spelled as given."""
    value = raw.get(key) if key else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowError("wrong_type", f"field {key!r} is {type(value).__name__}, not a string")
    return str(value) if str(value).strip() else None


def _prompt_and_response(raw: dict, f: TaskFieldMap) -> tuple[str, str | None, str | None, list[dict]]:
    """(prompt, response, system, earlier messages) from plain fields or from chat messages."""
    if f.messages:
        return from_messages(raw.get(f.messages), f.messages)
    texts = {}
    for name in ("prompt", "response", "system"):
        key = getattr(f, name)
        value = raw.get(key) if key else None
        if value is not None and not isinstance(value, str):
            raise RowError("wrong_type", f"field {key!r} is {type(value).__name__}, not a string")
        texts[name] = value if value is None or value.strip() else None
    if texts["prompt"] is None:
        present = bool(f.prompt) and raw.get(f.prompt) is not None
        raise RowError("empty_prompt" if present else "missing_prompt", f"no text in field {f.prompt!r}")
    return texts["prompt"], texts["response"], texts["system"], []


def from_messages(messages, key: str) -> tuple[str, str | None, str | None, list[dict]]:
    if isinstance(messages, str):  # chat data stored as a JSON string
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as err:
            raise RowError("bad_messages", f"field {key!r} is not a JSON list: {err}") from None
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant")
        for m in messages)
    if not ok:
        raise RowError("bad_messages", f"field {key!r}: expected a list of {{role: system|user|assistant, content: str}}")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    response = messages.pop()["content"] if messages[-1]["role"] == "assistant" else None
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise RowError("bad_messages", f"field {key!r}: the turn before the response must be a non-empty user message")
    system = messages.pop(0)["content"] if messages[0]["role"] == "system" else None
    prompt = messages.pop()["content"]
    return prompt, response if response and response.strip() else None, system, messages


def file_reject(where: Where, raw, spec: TaskFileSpec, reason: str, message: str) -> dict:
    prompt = raw.get(spec.fields.prompt) if isinstance(raw, dict) and spec.fields.prompt else None
    rid = raw.get(spec.fields.id) if isinstance(raw, dict) and spec.fields.id else None
    return {"id": None if rid is None else str(rid), "source": where.source,
            "prompt": prompt if isinstance(prompt, str) else None, "reason": reason,
            "detail": json.dumps({"file": where.file, "line": where.line, "error": message}),
            "file": where.file, "line": where.line}


def row_reject(row: dict, reason: str, detail: dict) -> dict:
    """A row that was read (a user row carries its file and line) but is dropped later."""
    return {"id": row["id"], "source": row["source"], "prompt": row["prompt"], "reason": reason,
            "detail": json.dumps(detail), "file": row.get("file"), "line": row.get("line")}


def repeated_ids(rows: list[dict]) -> Iterator[tuple[dict, str]]:
    """Rows whose id an earlier row already has, with the first one's place."""
    first: dict[str, dict] = {}
    for r in rows:
        if r["id"] in first:
            yield r, first[r["id"]]["id"]
        else:
            first[r["id"]] = r


def tables(rows: list[dict], rejected: list[dict]) -> tuple[pa.Table, pa.Table]:
    return (pa.Table.from_pylist(rows, schema=TASK_SCHEMA),
            pa.Table.from_pylist(rejected, schema=TASK_REJECT_SCHEMA))
