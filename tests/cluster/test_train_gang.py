"""The training gang on real Ray Train (2 CPU workers, gloo, DeepSpeed ZeRO-2).

One uninterrupted reference run, then: (a) a worker killed mid-run by the fault switch
restarts the gang and reproduces the reference losses exactly; (c)+(d) a run on one
worker, starting from the reference's checkpoints with the newest one damaged, falls
back to the previous one, reshards it through a universal checkpoint and follows the
reference. A gang the cluster can never hold fails before launch.
"""
import shutil

import pytest

from cluster.gang import GangConfig, check_fits
from cluster.session import RaySettings, connect
from cluster.train import run_pretrain
from tests.pretrain_corpus import write_corpus, write_tokenizer
from training.config import PretrainConfig
from training.pretrain import Paths

CFG = PretrainConfig.model_validate({
    "steps": 12, "eval_every": 6, "checkpoint": {"every": 4, "keep": 3},
    "model": {"preset": "tiny", "overrides": dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                                  dense_hidden=64, expert_hidden=32, max_seq_len=32)},
    "engine": {"zero_stage": 2, "optimizer": {"warmup_steps": 2}},
    "data": {"seq_len": 16, "micro_batch": 2, "global_batch": 8, "val_fraction": 0.1}})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("gang")
    files = write_corpus(root, n_docs=150)
    write_tokenizer(root / "tok", files, vocab_size=300)
    connect(RaySettings(num_cpus=2))
    return root, files


def paths(corpus, name: str) -> Paths:
    root, files = corpus
    (root / name / "out").mkdir(parents=True, exist_ok=True)
    return Paths(files, root / "tok", root / "work", root / name / "checkpoints", root / name / "out")


def losses(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows}  # a replayed step keeps its latest record


@pytest.fixture(scope="module")
def reference(corpus):
    p, rows = paths(corpus, "reference"), []
    summary = run_pretrain(CFG, GangConfig(num_workers=2), p, seed=0, on_metrics=rows.append)
    return p, rows, summary


def test_reference_run_trains_and_writes_everything(reference):
    p, rows, summary = reference
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert summary["val/loss"] < rows[5]["val/loss"]  # step 12 against step 6
    assert {"val/domain/math", "val/difficulty/expert", "mfu", "tokens_per_s"} <= set(summary)
    assert [r["phase"] for r in rows] == [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2]  # 20% and 60% of 12 steps
    assert sorted(c.name for c in p.checkpoints.iterdir() if c.name.startswith("step_")) == [
        "step_00000004", "step_00000008", "step_00000012"]
    assert (p.out / "model" / "model.safetensors").is_file()


def test_killed_worker_restarts_from_checkpoint_with_identical_losses(corpus, reference):
    p, rows = paths(corpus, "fault"), []
    summary = run_pretrain(CFG, GangConfig(num_workers=2, max_failures=1), p, seed=0,
                           on_metrics=rows.append, fault="pretrain:worker1:step7")
    assert summary["resumed_from_step"] == 4  # the checkpoint before the kill
    assert [r["step"] for r in rows][:7] == list(range(1, 8)) and rows[7]["step"] == 5  # 5-7 replayed
    assert losses(rows) == losses(reference[1])  # bitwise, every step
    assert summary["val/loss"] == reference[2]["val/loss"]


def test_one_worker_resumes_two_workers_checkpoint_past_a_damaged_newest(corpus, reference):
    p, rows = paths(corpus, "elastic"), []
    p.checkpoints.mkdir(parents=True)
    for step in ("step_00000004", "step_00000008"):
        shutil.copytree(reference[0].checkpoints / step, p.checkpoints / step)
    shard = sorted((p.checkpoints / "step_00000008" / "ds").glob("*optim_states.pt"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated, as by a full disk

    summary = run_pretrain(CFG, GangConfig(num_workers=1), p, seed=0, on_metrics=rows.append)
    assert summary["corrupt_checkpoints_skipped"] == ["step_00000008"]
    assert summary["resumed_from_step"] == 4
    assert (p.checkpoints / "step_00000004" / "universal" / "zero").is_dir()  # resharded 2 -> 1
    ref = losses(reference[1])
    got = losses(rows)
    assert sorted(got) == list(range(5, 13))
    assert [got[s] for s in got] == pytest.approx([ref[s] for s in got], rel=1e-5)


def test_a_gang_that_can_never_fit_fails_before_launch(corpus):
    nodes = [{"CPU": 2.0}, {"CPU": 2.0, "GPU": 1.0}]
    check_fits(GangConfig(num_workers=4), "pretrain.gang", nodes)
    with pytest.raises(ValueError, match="pretrain.gang: a gang of 3 workers.*STRICT_PACK"):
        check_fits(GangConfig(num_workers=3, placement_strategy="STRICT_PACK"), "pretrain.gang", nodes)
    with pytest.raises(ValueError, match="GPU"):
        check_fits(GangConfig(num_workers=2, use_gpu=True), "pretrain.gang", nodes)
    with pytest.raises(ValueError, match="never be placed"):  # the real local cluster: 2 CPUs
        run_pretrain(CFG, GangConfig(num_workers=3), paths(corpus, "too-big"), seed=0)
