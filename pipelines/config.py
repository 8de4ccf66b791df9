"""One typed config tree for a whole pipeline, loaded from a YAML recipe.

    cfg = load_config("recipes/demo.yaml", overrides=["ingest.chunk_rows=500"])

Every section is a pydantic model with ``extra="forbid"``: an unknown key, a
wrong type or an impossible value is a ``ConfigError`` before any work starts,
and its message names the key path and the file (or the ``--set`` it came from).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from cluster.gang import GangConfig
from data_engine.dedup import DedupConfig
from data_engine.difficulty import DifficultyConfig
from data_engine.domains import DomainsConfig
from data_engine.ingest import IngestConfig
from data_engine.pair_data import PairsConfig
from data_engine.quality import QualityConfig
from data_engine.task_data import TasksConfig
from rl.config import DpoConfig, EvalConfig, PrlConfig, RewardModelConfig, RlConfig
from training.config import PretrainConfig, Strict
from training.config import SftConfig
from training.tokenizer import TokenizerConfig


class ConfigError(ValueError):
    """A recipe or an override is wrong; the message names the key and its origin."""


class WandbConfig(Strict):
    """Weights & Biases: one run per stage execution."""

    mode: Literal["offline", "online", "disabled"] = Field("offline", description=(
        "offline needs no key or network"))
    project: str = Field("r1pipe", description="W&B project")
    entity: str | None = Field(None, description="W&B team or user")
    dir: str | None = Field(None, description="default: <run folder>/wandb")


class RayConfig(Strict):
    """The Ray cluster: an embedded local one, or an address to join."""

    address: str | None = Field(None, description="None: start an embedded local cluster")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of the embedded cluster (default: all)")
    include_dashboard: bool = Field(False, description="~0.7 GiB more RAM locally (NOTES.md)")
    node_ip_address: str = Field("127.0.0.2", description="any 127.x but .1 keeps Ray on loopback")
    data_concurrency: int | None = Field(None, gt=0, description="parallel data tasks per step")


class TokenizerSection(TokenizerConfig):
    """Byte-level BPE on the curated corpus, or `path` to an existing tokenizer.json."""

    max_docs: int | None = Field(None, ge=1, description="train on at most this many documents (None: all)")
    text_column: str = Field("text", description="the Parquet column to train on")


class PretrainSection(PretrainConfig):
    """Curriculum pretraining on a DeepSpeed gang; `gang` says how many workers and where."""

    gang: GangConfig = GangConfig()
    eval: EvalConfig = Field(EvalConfig(), description="held-out evaluation at the end (with a tasks stage)")


class SftSection(SftConfig):
    """Supervised fine-tuning on the tasks stage's worked solutions, on a DeepSpeed gang."""

    init_model: Path | None = Field(None, description=(
        "a model folder to start from; None: the pretrain stage's model/"))
    gang: GangConfig = GangConfig()
    eval: EvalConfig = Field(EvalConfig(), description="held-out evaluation at the end")


class DpoSection(DpoConfig):
    """Preference optimisation on the pairs stage's pairs, on a DeepSpeed gang."""

    init_model: Path | None = Field(None, description=(
        "the policy's start and the reference; None: the sft stage's model/"))
    gang: GangConfig = GangConfig()
    eval: EvalConfig = Field(EvalConfig(), description="held-out evaluation at the end")


class RewardModelSection(RewardModelConfig):
    """A reward model trained on the pairs stage's pairs, on a DeepSpeed gang."""

    init_model: Path | None = Field(None, description=(
        "the trunk's start (a model folder); None: the sft stage's model/"))
    gang: GangConfig = GangConfig()


class PrlStageSection(RlConfig):
    """One PRL stage as the runner sees it: its resolved RL settings, the gang and the evaluation."""

    init_model: Path | None = Field(None, description=(
        "prl_1 only: the policy's start; None: dpo's model/ (or sft's)"))
    gang: GangConfig = GangConfig()
    eval: EvalConfig = EvalConfig()


class PrlSection(PrlConfig):
    """Progressive RL on the tasks stage's train prompts: shared settings and `stages`, each run
    as the run store's stage prl_1, prl_2, ... on a DeepSpeed gang, each ending with the held-out
    evaluation. List `prl` in the recipe's stages to run them all."""

    init_model: Path | None = Field(None, description=(
        "the first stage's start; None: the dpo stage's model/ (or sft's)"))
    gang: GangConfig = GangConfig()
    eval: EvalConfig = Field(EvalConfig(), description="held-out evaluation at the end of every PRL stage")

    def stage_section(self, k: int) -> PrlStageSection:
        rl = self.stage_config(k).model_dump()
        return PrlStageSection.model_validate({**rl, "init_model": self.init_model if k == 1 else None,
                                               "gang": self.gang, "eval": self.eval})


# The data stages' sections: the library's settings, plus the error budget, which is the
# pipeline's: a stage that rejects more than this share of its rows fails, naming the worst files.
def _error_budget(default: float, note: str = "") -> Any:
    return Field(default, ge=0.0, le=1.0, description=f"error budget: the stage fails above this share of "
                 f"its rows rejected{note}")


class IngestSection(IngestConfig):
    """Read the inputs into validated Parquet shards; bad rows go to rejected/."""

    max_reject_fraction: float = _error_budget(0.5)


class DedupSection(DedupConfig):
    """Dedup settings. ``bands``/``rows`` are derived from ``threshold`` when not given."""

    max_reject_fraction: float = _error_budget(0.9)


class QualitySection(QualityConfig):
    """Every threshold of the quality stage; ``None`` disables that rule."""

    max_reject_fraction: float = _error_budget(0.9, ", a guard against a misconfigured rule (Gopher/C4 "
                                                    "rules drop 30-60% of raw web text)")


class DomainsSection(DomainsConfig):
    """Domain tagging; tagging keeps every row unless asked to drop unconfident ones."""

    reject_below_min_score: bool = Field(False, description="reject rows whose domain_score < min_score")
    max_reject_fraction: float = _error_budget(0.5)


class DifficultySection(DifficultyConfig):
    """KenLM perplexity grading; keeps every row unless max_ppl is set."""

    max_ppl: float | None = Field(None, gt=0.0, description="reject rows above this perplexity")
    max_reject_fraction: float = _error_budget(0.5)


class TasksSection(TasksConfig):
    """The tasks stage: generated tasks and/or user files, split into train and held-out eval."""

    max_reject_fraction: float = _error_budget(0.5, " (over user-file rows)")


class PairsSection(PairsConfig):
    """The pairs stage: offline pairs from the generated tasks and/or user files, train and held out."""

    max_reject_fraction: float = _error_budget(0.5, " (over user-file rows)")


class PipelineConfig(Strict):
    name: str = Field("r1pipe", description="the default run id")
    seed: int = Field(0, description="global seed; part of every stage's fingerprint")
    runs_dir: str = Field("runs", description="where runs live: a folder, or object storage such as "
                          "s3://bucket/runs (credentials from the environment); --runs-dir overrides")
    cache_dir: str | None = Field(None, description="runs on object storage: the node-local mirror stages "
                                  "work in (default $R1PIPE_CACHE_DIR, else ~/.cache/r1pipe/runs)")
    stages: list[str] = Field(default_factory=lambda: ["ingest"], description="the stages to run, in order")
    wandb: WandbConfig = WandbConfig()
    ray: RayConfig = RayConfig()
    ingest: IngestSection | None = None
    dedup: DedupSection | None = None
    quality: QualitySection | None = None
    domains: DomainsSection | None = None
    difficulty: DifficultySection | None = None
    tokenizer: TokenizerSection | None = None
    tasks: TasksSection | None = None
    pretrain: PretrainSection | None = None
    sft: SftSection | None = None
    pairs: PairsSection | None = None
    dpo: DpoSection | None = None
    reward_model: RewardModelSection | None = None
    prl: PrlSection | None = None

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, stages: list[str]) -> list[str]:
        from pipelines.graph import STAGES
        unknown = [s for s in stages if s not in STAGES and s != "prl"]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; known: {list(STAGES)}")
        if len(set(stages)) != len(stages):
            raise ValueError("a stage is listed twice")
        return stages

    @model_validator(mode="after")
    def _expand_prl(self) -> "PipelineConfig":
        """`prl` in stages stands for prl_1 .. prl_N, N the prl section's stages."""
        listed = [s for s in self.stages if s == "prl" or s.startswith("prl_")]
        if listed and self.prl is None:
            raise ValueError(f"stages lists {listed[0]!r} but the recipe has no `prl:` section")
        n = len(self.prl.stages) if self.prl is not None else 0
        if "prl" in self.stages:
            i = self.stages.index("prl")
            self.stages = self.stages[:i] + [f"prl_{k}" for k in range(1, n + 1)] + self.stages[i + 1:]
            if len(set(self.stages)) != len(self.stages):
                raise ValueError("stages: list `prl` or its prl_<k> stages, not both")
        beyond = [s for s in self.stages if s.startswith("prl_") and int(s[4:]) > n]
        if beyond:
            raise ValueError(f"stages lists {beyond} but prl.stages has {n} stage(s)")
        return self

    @model_validator(mode="after")
    def _training_stages_have_a_start(self) -> "PipelineConfig":
        if "prl_1" in self.stages and self.prl.init_model is None and not {"dpo", "sft"} & set(self.stages):
            raise ValueError("prl.init_model: give a model folder to start from, or put `dpo` or `sft` in stages")
        for stage, previous in (("sft", "pretrain"), ("dpo", "sft"), ("reward_model", "sft")):
            section = getattr(self, stage)
            if stage in self.stages and section is not None and section.init_model is None \
                    and previous not in self.stages:
                raise ValueError(f"{stage}.init_model: give a model folder to start from, or put `{previous}` in stages")
        return self

    def section(self, stage: str) -> BaseModel:
        """The config section a stage runs with; error if the recipe lacks it."""
        if stage.startswith("prl_") and self.prl is not None:
            return self.prl.stage_section(int(stage[4:]))
        value = getattr(self, stage, None)
        if value is None:
            raise ConfigError(f"stage {stage!r} is selected but the recipe has no `{stage}:` section")
        return value


def load_config(path: str | Path, overrides: list[str] | None = None, *,
                check_files: bool = True) -> PipelineConfig:
    """The validated recipe. ``check_files=False`` (``r1pipe submit``) leaves the files it names
    as written: they are checked where the job runs, which may see other files than here."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such recipe")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    origins = {}
    for item in overrides or []:
        key = apply_override(raw, item)
        origins[key] = item
    cfg = validate(raw, str(path), origins)
    if check_files:
        resolve_input_files(cfg, str(path), origins)
    return cfg


def input_files(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, BaseModel, str, Path]]:
    """(key, owning section, field, path) for every file a config names: its Path-valued keys
    (a blocklist, a seed set, a tokenizer). Data globs (ingest inputs) are strings, not Paths."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path):
            yield f"{prefix}{name}", model, name, value
        elif isinstance(value, BaseModel):
            yield from input_files(value, f"{prefix}{name}.")


def resolve_input_files(cfg: PipelineConfig, origin: str, overrides: dict[str, str]) -> None:
    """Make every named file absolute (workers may run elsewhere) and check it exists now,
    before any stage runs; relative paths are taken from the current directory."""
    for key, section, field, path in input_files(cfg):
        absolute = path.expanduser().absolute()
        if not absolute.exists():  # a file, or a folder where the key takes one (tokenizer.path)
            where = next((f"--set {v}" for k, v in overrides.items() if key == k), origin)
            raise ConfigError(f"{where}: {key}: no such file {str(path)!r} (resolved to {absolute})")
        setattr(section, field, absolute)


def validate(raw: dict, origin: str, overrides: dict[str, str] | None = None) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, origin, overrides or {})) from None


def apply_override(raw: dict, item: str) -> str:
    """Apply ``a.b.c=value`` to a raw dict in place; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. ingest.chunk_rows=500")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty part in key {key!r}")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: i + 1]), item)
    last = parts[-1]
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(node, list):
        node[_index(node, last, key, item)] = value
    else:
        node[last] = value
    return key


def _child(node: Any, part: str, path: str, item: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, path, item)]
    if not isinstance(node, dict):
        raise ConfigError(f"--set {item!r}: {path} is a value, not a section")
    if node.get(part) is None:
        node[part] = {}
    return node[part]


def _index(node: list, part: str, path: str, item: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {item!r}: {path}: no list item {part!r}")
    return int(part)


def _describe(err: ValidationError, origin: str, overrides: dict[str, str]) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        where = next((f"--set {v}" for k, v in overrides.items()
                      if key == k or key.startswith(k + ".")), origin)
        lines.append(f"{where}: {key}: {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)


def dump_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
