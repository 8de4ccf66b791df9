"""DPO in this process (a gloo group of one) on the session's tiny trained model: ln 2 at step 1,
held-out preference accuracy rises, a resumed run replays the same losses, and precomputed and
online reference log-probs give the same losses."""
import math
import shutil

import pytest

from rl.config import DpoConfig
from rl.dpo import DpoPaths, dpo
from training.export import load_model
from training.loop import Hooks


def paths(reasoner, pairs, name: str) -> DpoPaths:
    return DpoPaths([pairs / "train" / "part-00000.parquet"], [pairs / "eval" / "part-00000.parquet"],
                    reasoner.model, pairs / name / "work", pairs / name / "checkpoints", pairs / name / "out")


def cfg(**kw) -> DpoConfig:
    base = {"steps": 8, "eval_every": 4, "checkpoint": {"every": 4, "keep": 2},
            "engine": {"zero_stage": 1, "optimizer": {"lr": 1e-3, "warmup_steps": 1}},
            "loss": {"beta": 0.1}, "data": {"seq_len": 64, "micro_batch": 4, "global_batch": 8, "val_max_pairs": 40}}
    base.update(kw)
    return DpoConfig.model_validate(base)


def run(reasoner, pairs, name, config, work_files: list | None = None) -> tuple[dict, list[dict]]:
    rows = []
    hooks = Hooks(on_metrics=lambda m, s: rows.append(m), on_work_file=(work_files if work_files is not None else []).append)
    summary = dpo(config, paths(reasoner, pairs, name), seed=0, hooks=hooks)
    return summary, rows


FULL_WORK_FILES: list = []


@pytest.fixture(scope="module")
def full(reasoner, pairs):
    return run(reasoner, pairs, "full", cfg(), FULL_WORK_FILES)


def test_dpo_starts_at_ln2_and_learns_the_held_out_preferences(full, reasoner, pairs):
    summary, rows = full
    assert [r["step"] for r in rows] == list(range(1, 9)) and summary["pairs"] == 200
    assert rows[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference at step 1
    assert rows[0]["rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert rows[-1]["dpo_loss"] < rows[0]["dpo_loss"] and rows[-1]["rewards/margins"] > 0
    # held-out pairs: at step 0 every implicit reward is 0 (accuracy 0, loss ln 2)
    assert rows[-1]["val/rewards/accuracies"] >= 0.8 and rows[-1]["val/loss"] < rows[3]["val/loss"] < math.log(2)
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "grad_norm"} <= set(rows[0])
    out = paths(reasoner, pairs, "full").out / "model"
    assert (out / "tokenizer.json").is_file() and load_model(out).cfg == load_model(reasoner.model).cfg


def test_a_resumed_run_replays_the_same_losses_and_reuses_the_reference(full, reasoner, pairs):
    _, rows = full
    again = paths(reasoner, pairs, "again")
    again.checkpoints.mkdir(parents=True)
    shutil.copytree(paths(reasoner, pairs, "full").checkpoints / "step_00000004", again.checkpoints / "step_00000004")
    shutil.copytree(paths(reasoner, pairs, "full").work, again.work)  # the stored reference log-probs
    # the reference tables were offered for upload as they were written (on object storage, a
    # resume on another node downloads them with the stage's .work); the resume writes none
    assert sorted(p.name for p in FULL_WORK_FILES) == sorted(p.name for p in again.work.glob("reference-*"))
    assert len(FULL_WORK_FILES) == 2  # train and held-out pairs
    offered: list = []
    summary, replay = run(reasoner, pairs, "again", cfg(), offered)
    assert summary["resumed_from_step"] == 4 and offered == []
    assert [r["loss"] for r in replay] == [r["loss"] for r in rows[4:]]  # bitwise


def test_precomputed_and_online_reference_give_the_same_losses(full, reasoner, pairs):
    _, rows = full
    _, online = run(reasoner, pairs, "online", cfg(reference="online"))
    assert [r["dpo_loss"] for r in online] == pytest.approx([r["dpo_loss"] for r in rows], abs=1e-5)
    assert online[-1]["val/rewards/accuracies"] == rows[-1]["val/rewards/accuracies"]


def test_simpo_needs_no_reference_and_learns_the_preferences(reasoner, pairs):
    config = cfg(loss={"name": "simpo", "beta": 2.0, "gamma": 0.5})
    summary, rows = run(reasoner, pairs, "simpo", config)
    assert not list(paths(reasoner, pairs, "simpo").work.glob("reference-*"))  # no reference pass
    # at step 1, the implicit rewards are beta x the per-token average log-probs of the start model
    assert rows[0]["rewards/chosen"] > rows[0]["rewards/rejected"] and summary["loss_name"] == "simpo"
    assert rows[-1]["val/rewards/margins"] > rows[3]["val/rewards/margins"]


def test_rpo_adds_the_chosen_nll_to_the_loss(full, reasoner, pairs):
    _, rows = full
    _, rpo = run(reasoner, pairs, "rpo", cfg(loss={"beta": 0.1, "rpo_alpha": 0.5}))
    first = rpo[0]  # step 1: the same weights and batch as the plain run's
    assert first["dpo_loss"] == pytest.approx(math.log(2), abs=1e-5) and first["nll_loss"] > 0
    assert first["loss"] == pytest.approx(rows[0]["loss"] + 0.5 * first["nll_loss"], rel=1e-5)
    assert "nll_loss" not in rows[0]
