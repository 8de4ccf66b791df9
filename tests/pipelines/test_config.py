import hashlib
from pathlib import Path

import pytest

from pipelines.config import ConfigError, PipelineConfig, load_config

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "recipes" / "demo.yaml"


def test_demo_recipe_validates():
    cfg = load_config(DEMO)
    assert cfg.stages[0] == "ingest"
    assert cfg.wandb.mode == "offline"


def test_unknown_override_key_is_named():
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, ["ingest.no_such_key=1"])
    assert "ingest.no_such_key" in str(err.value)
    assert "unknown key" in str(err.value)
    assert "--set ingest.no_such_key=1" in str(err.value)


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages: [ingest]\nwandb: {mode: offline, colour: red}\n")
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    assert "wandb.colour" in str(err.value) and str(recipe) in str(err.value)


@pytest.mark.parametrize("override, key", [
    ("seed=abc", "seed"),
    ("ingest.chunk_rows=0", "ingest.chunk_rows"),
    ("ingest.inputs.0.format=xml", "ingest.inputs.0.format"),
    ("wandb.mode=loud", "wandb.mode"),
    ("stages=[ingest, nope]", "stages"),
])
def test_wrong_type_or_value_names_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [override])
    assert f": {key}:" in str(err.value)


def test_override_parses_yaml_values():
    cfg = load_config(DEMO, ["ingest.chunk_rows=500", "ray.include_dashboard=true"])
    assert cfg.ingest.chunk_rows == 500 and cfg.ray.include_dashboard is True


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(DEMO, ["ingest.chunk_rows"])
    with pytest.raises(ConfigError, match="no list item"):
        load_config(DEMO, ["ingest.inputs.7.path=x"])


def test_missing_recipe_names_file(tmp_path):
    with pytest.raises(ConfigError, match="no such recipe"):
        load_config(tmp_path / "nope.yaml")


def test_input_needs_path_or_demo(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages: [ingest]\ningest: {inputs: [{format: jsonl}]}\n")
    with pytest.raises(ConfigError, match="ingest.inputs.0"):
        load_config(recipe)


def test_every_config_key_says_what_it_means():
    from pipelines.config_reference import rows
    silent = [key for key, _type, _default, meaning in rows(PipelineConfig) if not meaning.strip()]
    assert not silent, f"keys with no help (give the field a Field(description=...)): {silent}"


def test_config_reference_is_current():
    from pipelines.config_reference import render
    assert (REPO / "docs" / "config.md").read_text() == render(), \
        "regenerate: python -m pipelines.config_reference > docs/config.md"


def test_every_registered_stage_has_a_config_section():
    from pipelines.config import PipelineConfig
    from pipelines.graph import STAGES
    # prl_1 .. prl_N are the prl section's stages
    assert {s if not s.startswith("prl_") else "prl" for s in STAGES} <= set(PipelineConfig.model_fields)


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe):
    cfg = load_config(recipe)
    order = [s for s in cfg.stages if s in ("tasks", "pretrain", "sft", "pairs", "dpo")]
    assert order[:3] == ["tasks", "pretrain", "sft"] or order[:2] == ["pretrain", "sft"]  # every recipe trains
    if recipe.name == "demo.yaml":  # the demo runs the post-training half as far as it goes
        assert order == ["tasks", "pretrain", "sft", "pairs", "dpo"]
        assert cfg.stages[-2:] == ["prl_1", "prl_2"]
    if recipe.name == "cluster.yaml":  # the GPU example: joins a cluster, bf16 over NCCL
        assert cfg.ray.address == "auto" and cfg.pretrain.gang.use_gpu and cfg.sft.gang.use_gpu
        for section in (cfg.pretrain, cfg.sft):
            assert (section.engine.precision, section.gang.torch_backend()) == ("bf16", "nccl")
            assert section.eval.use_gpu


def test_a_named_file_must_exist_and_becomes_absolute(tmp_path, monkeypatch):
    """Files a config names are checked before any stage runs, and made absolute, since a
    worker may run in another directory or on another machine."""
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, ["quality.blocklist_file=missing.txt"])
    assert str(err.value).startswith("--set quality.blocklist_file=missing.txt: quality.blocklist_file: ")
    assert "no such file 'missing.txt'" in str(err.value)
    (tmp_path / "terms.txt").write_text("badword\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(DEMO, ["quality.blocklist_file=terms.txt", "domains.seed_path=terms.txt"])
    assert cfg.quality.blocklist_file == tmp_path / "terms.txt"
    assert cfg.domains.seed_path == tmp_path / "terms.txt"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages: [ingest, tokenizer]\ningest: {inputs: [{demo: {n_docs: 100}}]}\n"
                      "tokenizer: {path: nope/tokenizer.json}\n")
    with pytest.raises(ConfigError, match=r"r.yaml: tokenizer.path: no such file 'nope/tokenizer.json'"):
        load_config(recipe)
    # r1pipe submit: the files are checked where the job runs (a cluster path need not exist here)
    assert load_config(recipe, check_files=False).tokenizer.path == Path("nope/tokenizer.json")


def test_editing_a_named_file_changes_only_its_stages_fingerprint(tmp_path):
    from pipelines.runner import stage_config
    from pipelines.store import fingerprint
    terms = tmp_path / "terms.txt"
    terms.write_text("badword\n")
    cfg = load_config(DEMO, [f"quality.blocklist_file={terms}"])

    def fp(name):
        return fingerprint(name, stage_config(cfg, name), {}, "code")
    before = {name: fp(name) for name in ("dedup", "quality")}
    assert stage_config(cfg, "quality")["files"] == {
        "quality.blocklist_file": hashlib.sha256(b"badword\n").hexdigest()}
    terms.write_text("badword\nworseword\n")
    assert fp("quality") != before["quality"] and fp("dedup") == before["dedup"]
    assert "files" not in stage_config(cfg, "dedup")  # no file named: the fingerprint is as before
    # Where the file lies does not count, only what it holds (a moved checkout reruns nothing).
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "terms.txt").write_text(terms.read_text())
    moved = load_config(DEMO, [f"quality.blocklist_file={tmp_path / 'moved' / 'terms.txt'}"])
    assert fingerprint("quality", stage_config(moved, "quality"), {}, "code") == fp("quality")


def test_where_a_stage_runs_is_not_part_of_its_fingerprint():
    """A gang moved to fewer workers (a node lost for good) or other resources, and RL roles moved
    into actor groups, resume the stage instead of restarting it; what it computes still counts."""
    from pipelines.runner import fingerprint_config, stage_config
    from pipelines.store import fingerprint

    def fps(overrides):
        cfg = load_config(DEMO, overrides)
        return {name: fingerprint(name, fingerprint_config(cfg, name), {}, "code") for name in ("pretrain", "prl_1")}
    base = fps([])
    moved = fps(["pretrain.gang.num_workers=1", "pretrain.gang.max_failures=5", "pretrain.gang.placement_strategy=SPREAD",
                 "prl.gang.num_workers=1", "prl.rollout.workers=1", "prl.rollout.cpus_per_worker=0.5",
                 "prl.roles.reference.workers=1", "prl.roles.reward_model.use_gpu=true"])
    assert moved == base
    assert fps(["pretrain.steps=7"])["pretrain"] != base["pretrain"]
    assert fps(["prl.rollout.temperature=0.5"])["prl_1"] != base["prl_1"]
    # the manifest and W&B still record where it ran
    cfg = load_config(DEMO, ["pretrain.gang.num_workers=1"])
    assert stage_config(cfg, "pretrain")["pretrain"]["gang"]["num_workers"] == 1
    assert "gang" not in fingerprint_config(cfg, "pretrain")["pretrain"]


def test_a_tokenizer_folder_is_accepted_and_hashed_by_its_files(tmp_path):
    from pipelines.runner import stage_config
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages: [ingest, tokenizer]\ningest: {inputs: [{demo: {n_docs: 100}}]}\n"
                      f"tokenizer: {{path: {folder}}}\n")
    before = stage_config(load_config(recipe), "tokenizer")["files"]["tokenizer.path"]
    (folder / "tokenizer.json").write_text('{"changed": true}')
    assert stage_config(load_config(recipe), "tokenizer")["files"]["tokenizer.path"] != before


PRL = """
stages: [tasks, sft, prl]
tasks: {{generator: {{train_per_cell: 2, eval_per_cell: 1}}}}
sft: {{steps: 1, init_model: {init}}}
prl:
  iterations: 3
  loss: {{kl_coef: 0.01}}
  stages:
    - {{rewards: {{accuracy: 1.0}}}}
    - {stage2}
"""


def prl_recipe(tmp_path, stage2="{rewards: {accuracy: 1.0, conciseness: 0.3}, loss: {kl_coef: 0.05}}"):
    recipe = tmp_path / "prl.yaml"
    recipe.write_text(PRL.format(stage2=stage2, init=tmp_path))
    return recipe


def test_prl_expands_into_one_store_stage_per_entry(tmp_path):
    cfg = load_config(prl_recipe(tmp_path))
    assert cfg.stages == ["tasks", "sft", "prl_1", "prl_2"]
    one, two = cfg.section("prl_1"), cfg.section("prl_2")
    assert one.rewards == {"accuracy": 1.0} and two.rewards == {"accuracy": 1.0, "conciseness": 0.3}
    assert (one.stage, two.stage) == (1, 2) and (one.entropy_coef, two.entropy_coef) == (0.01, 0.02)
    assert (one.loss.kl_coef, two.loss.kl_coef) == (0.01, 0.05) and two.iterations == 3


def test_editing_stage_two_leaves_stage_one_fingerprint_alone(tmp_path):
    from pipelines.runner import stage_config
    a = load_config(prl_recipe(tmp_path))
    b = load_config(prl_recipe(tmp_path, "{rewards: {accuracy: 1.0, conciseness: 0.5}}"))
    assert stage_config(a, "prl_1") == stage_config(b, "prl_1")
    assert stage_config(a, "prl_2") != stage_config(b, "prl_2")


@pytest.mark.parametrize("stage2, message", [
    ("{loss: {klcoef: 1}}", "stages.1.loss.klcoef: unknown key"),
    ("{rewards: {kindness: 1.0}}", "unknown term(s) ['kindness']"),
    ("{stage: 7}", "stages.1.stage: set by the stage's position"),
    ("{algorithm: ppo, critic: none}", "needs a critic"),
    ("{critic: shared}", "critic=shared needs advantage.estimator=gae"),
    ("{rewards: {overlong: 1.0}, rollout: {max_new_tokens: 16}}", "overlong_buffer=32 must be <= rollout.max_new_tokens=16"),
    ("{roles: {reference: {workers: 2}}, loss: {kl_coef: 0}}", "roles.reference.workers=2: no reference is used without a KL term"),
    ("{roles: {reward_model: {workers: 1}}}", "roles.reward_model.workers=1: the rewards have no reward_model term"),
    ("{roles: {critic: {workers: 1}}}", "stages.1.roles.critic: unknown key"),
    ("{reward_terms: {conciseness_gate: right}}", "stages.1.reward_terms.conciseness_gate: Input should be 'none' or 'correct'"),
])
def test_a_bad_prl_stage_is_named(tmp_path, stage2, message):
    with pytest.raises(ConfigError) as err:
        load_config(prl_recipe(tmp_path, stage2))
    assert message in str(err.value) and "prl" in str(err.value)


def test_prl_stages_need_a_section_and_a_start(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages: [tasks, prl]\ntasks: {}\n")
    with pytest.raises(ConfigError, match="no `prl:` section"):
        load_config(recipe)
    recipe.write_text("stages: [tasks, prl]\ntasks: {}\nprl: {}\n")
    with pytest.raises(ConfigError, match="prl.init_model"):
        load_config(recipe)
    recipe.write_text("stages: [tasks, sft, prl_3]\ntasks: {}\nsft: {}\nprl: {stages: [{}, {}]}\n")
    with pytest.raises(ConfigError, match=r"\['prl_3'\] but prl.stages has 2"):
        load_config(recipe)


def test_prl_shared_settings_need_not_hold_alone(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stages: [tasks, sft, prl]\ntasks: {{}}\nsft: {{init_model: {tmp_path}}}\n"
                      "prl: {minibatch: 24, stages: [{minibatch: 16}]}\n")
    assert load_config(recipe).section("prl_1").minibatch == 16
    recipe.write_text(f"stages: [tasks, sft, prl]\ntasks: {{}}\nsft: {{init_model: {tmp_path}}}\n"
                      "prl: {minibatch: 24, stages: [{}]}\n")
    with pytest.raises(ConfigError, match="stages.0: .*must be a multiple of minibatch=24"):
        load_config(recipe)
