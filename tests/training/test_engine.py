"""The DeepSpeed seam and the pretrain loop, in this process (a gloo group of one, CPU).

Tiny models and a handful of steps: config translation and its errors, the LR schedule,
non-finite steps skipped (and the abort after M in a row), bitwise resume, and the fall
back past a damaged newest checkpoint.
"""
import logging
import shutil

import pytest
import torch

from tests.pretrain_corpus import write_corpus, write_tokenizer
from training import checkpoint as ckpt
from training.config import EngineConfig, OptimizerConfig, PretrainConfig
from training.engine import Engine, accumulation_steps, deepspeed_config, lr_at
from training.model import ModelConfig, Transformer
from training.pretrain import Hooks, NonFiniteLoss, Paths, choose_checkpoint, pretrain

TINY = dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, dense_hidden=64, expert_hidden=32, max_seq_len=32)


def tiny_engine(zero_stage=2, **kw) -> Engine:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=128, **TINY))
    return Engine(model, EngineConfig(zero_stage=zero_stage, **kw), micro_batch=2, global_batch=4, total_steps=20)


def batches(seed: int, n: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 128, (2, 16), generator=g), torch.randint(0, 128, (2, 16), generator=g))
            for _ in range(n)]


def poison(model, when):
    """Make the logits NaN whenever when() is true (a stand-in for a diverging step)."""
    model.lm_head.register_forward_hook(lambda m, i, out: out * float("nan") if when() else out)


# ----------------------------------------------------------------------------- config


def test_deepspeed_config_and_invalid_combinations():
    ds = deepspeed_config(EngineConfig(zero_stage=3, precision="bf16", grad_clip=0.5, offload_params=True,
                                       offload_optimizer=True), micro_batch=2, global_batch=16, world_size=4)
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 16
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.5
    with pytest.raises(ValueError, match="offload_params needs zero_stage=3"):
        EngineConfig(zero_stage=2, offload_params=True)
    with pytest.raises(ValueError, match="offload_optimizer needs zero_stage >= 1"):
        EngineConfig(zero_stage=0, offload_optimizer=True)
    with pytest.raises(ValueError, match="data.global_batch=10"):
        accumulation_steps(10, 2, 2)
    with pytest.raises(ValueError, match="data.seq_len=64"):
        PretrainConfig.model_validate({"model": {"overrides": {"max_seq_len": 32}}, "data": {"seq_len": 64}})
    with pytest.raises(ValueError, match="n_layerz"):
        PretrainConfig.model_validate({"model": {"overrides": {"n_layerz": 2}}})


def test_warmup_then_cosine_schedule():
    cfg = OptimizerConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_at(s, cfg, 104) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(54, cfg, 104) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(104, cfg, 104) == pytest.approx(0.1) and lr_at(500, cfg, 104) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- the engine


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_nonfinite_loss_skips_the_whole_step(zero_stage):
    engine = tiny_engine(zero_stage)
    bad = {"on": False}
    poison(engine.module, lambda: bad["on"])
    engine.train_step(batches(1))
    before = {k: v.clone() for k, v in engine.full_state_dict().items()}
    lr = engine.lr
    bad["on"] = True
    result = engine.train_step(batches(2))
    bad["on"] = False
    assert result.skipped and result.loss != result.loss  # NaN
    after = engine.full_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert engine.lr == lr  # the schedule did not advance either
    good = engine.train_step(batches(3))
    assert not good.skipped and good.loss == good.loss and good.grad_norm > 0


@pytest.mark.parametrize("variant", [dict(zero_stage=2, offload_optimizer=True),
                                     dict(zero_stage=3, offload_optimizer=True, offload_params=True),
                                     dict(zero_stage=1, activation_checkpointing=True),
                                     dict(zero_stage=2, precision="bf16")])
def test_variants_train_like_plain_zero1(variant):
    plain, engine = tiny_engine(1), tiny_engine(**variant)
    expected = [plain.train_step(batches(s)).loss for s in range(3)]
    got = [engine.train_step(batches(s)).loss for s in range(3)]
    tol = 2e-2 if variant.get("precision") == "bf16" else 1e-6
    assert got == pytest.approx(expected, rel=tol)


def test_checkpoint_resume_is_bitwise(tmp_path):
    a = tiny_engine(2)
    for s in range(2):
        a.train_step(batches(s))
    a.save(tmp_path / "ck")
    expected = [a.train_step(batches(s)).loss for s in (2, 3)]
    b = tiny_engine(2)
    b.load(tmp_path / "ck")
    assert [b.train_step(batches(s)).loss for s in (2, 3)] == expected


# ----------------------------------------------------------------------------- the loop


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    files = write_corpus(root, n_docs=120)
    write_tokenizer(root / "tok", files, vocab_size=300)
    return root, files


def run_cfg(**kw) -> PretrainConfig:
    return PretrainConfig.model_validate({
        "steps": 8, "eval_every": 4, "checkpoint": {"every": 4, "keep": 2}, "max_nonfinite": 3,
        "model": {"preset": "tiny", "overrides": TINY}, "engine": {"zero_stage": 1},
        "data": {"seq_len": 16, "micro_batch": 2, "global_batch": 4, "val_fraction": 0.1}, **kw})


def paths(corpus, name) -> Paths:
    root, files = corpus
    return Paths(files, root / "tok", root / "work", root / name / "ckpt", root / name / "out")


def test_nonfinite_steps_are_counted_then_abort_keeps_the_last_good_checkpoint(corpus):
    p = paths(corpus, "nan")
    rows, step = [], {"now": None}
    poisoned = {1, 5, 6, 7}  # one isolated NaN, then three in a row

    def on_step(s, model):
        if step["now"] is None:
            poison(model, lambda: step["now"] in poisoned)
        step["now"] = s
    hooks = Hooks(on_metrics=lambda m, s: rows.append(m), on_step=on_step)
    with pytest.raises(NonFiniteLoss, match="3 non-finite losses in a row.*step_00000004"):
        pretrain(run_cfg(), p, seed=0, hooks=hooks)
    assert [r["skipped"] for r in rows] == [False, True, False, False, False, True, True]  # the 3rd aborts
    assert rows[1]["nonfinite_total"] == 1
    assert [c.name for c in ckpt.list_checkpoints(p.checkpoints)] == ["step_00000004"]
    assert not ckpt.problems(p.checkpoints / "step_00000004")


def test_resume_falls_back_past_a_damaged_checkpoint_and_matches(corpus, caplog):
    p = paths(corpus, "fallback")
    rows = []
    full = pretrain(run_cfg(), p, seed=0, hooks=Hooks(on_metrics=lambda m, s: rows.append(m)))
    assert full["steps"] == 8 and full["val/loss"] < rows[3]["val/loss"]
    assert (p.out / "model" / "model.safetensors").is_file() and (p.out / "model" / "tokenizer.json").is_file()
    newest = p.checkpoints / "step_00000008"
    shard = sorted((newest / "ds").glob("*optim_states.pt"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, different content
    shard.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING):
        folder, state, skipped = choose_checkpoint(p.checkpoints)
    assert folder.name == "step_00000004" and state["step"] == 4 and skipped == ["step_00000008"]
    assert "step_00000008 is damaged" in caplog.text and "sha256 differs" in caplog.text

    # a rerun resumes from step 4 and replays steps 5-8 exactly
    shutil.rmtree(p.out)
    again = []
    summary = pretrain(run_cfg(), p, seed=0, hooks=Hooks(on_metrics=lambda m, s: again.append(m)))
    assert summary["resumed_from_step"] == 4 and summary["corrupt_checkpoints_skipped"] == ["step_00000008"]
    assert [r["loss"] for r in again] == [r["loss"] for r in rows[4:]]
    assert [r["phase"] for r in again] == [r["phase"] for r in rows[4:]]
