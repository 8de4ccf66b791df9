"""SFT on real Ray Train gangs (gloo, DeepSpeed ZeRO-2), through run_gang like every training stage.

One uninterrupted 2-worker reference run; a run whose worker 1 is killed at step 5 restarts the
gang from the step-4 checkpoint and reproduces the reference losses exactly; a 1-worker run
resumes the reference's step-8 checkpoint (resharded through a universal checkpoint) and
follows the reference's losses.
"""
import shutil

import pytest

from cluster.gang import GangConfig
from cluster.session import RaySettings, connect
from cluster.train import run_gang
from training import sft
from training.config import SftConfig

CFG = SftConfig.model_validate({
    "steps": 10, "eval_every": 5, "checkpoint": {"every": 4, "keep": 3},
    "engine": {"zero_stage": 2, "optimizer": {"lr": 5e-3, "warmup_steps": 2}},
    "data": {"seq_len": 64, "micro_batch": 2, "global_batch": 8, "val_max_examples": 7}})  # 4 + 3 per rank


@pytest.fixture(scope="module")
def inputs(reasoner):
    connect(RaySettings(num_cpus=2))
    return reasoner


def payload(reasoner, root) -> dict:
    init = reasoner.root / "init"  # the untrained model the session's reasoner started from
    return {"config": CFG.model_dump(mode="json"), "seed": 0,
            "paths": {"train_files": [str(p) for p in sorted(reasoner.train_dir.glob("*.parquet"))],
                      "val_files": [str(p) for p in sorted(reasoner.eval_dir.glob("*.parquet"))],
                      "init_model": str(init), "work": str(root / "work"), "checkpoints": str(root / "checkpoints"),
                      "out": str(root / "out")}}


def gang_run(reasoner, root, workers=2, **kw):
    rows = []
    summary = run_gang(sft.worker, payload(reasoner, root), GangConfig(num_workers=workers, **kw.pop("gang", {})),
                       checkpoints=root / "checkpoints", work=root / "work", on_metrics=rows.append, name="sft", **kw)
    return rows, summary


def losses(rows):
    return {r["step"]: r["loss"] for r in rows}  # a replayed step keeps its latest record


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft-ref")
    rows, summary = gang_run(inputs, root)
    return root, rows, summary


def test_reference_trains_and_writes_the_model(reference):
    root, rows, summary = reference
    assert [r["step"] for r in rows] == list(range(1, 11)) and summary["steps"] == 10
    assert rows[-1]["val/loss"] < rows[4]["val/loss"] and rows[-1]["lm_loss"] < rows[0]["lm_loss"]
    assert {"tokens_per_s", "mfu", "grad_norm", "lr", "packing_efficiency", "aux_loss"} <= set(rows[-1])
    assert (root / "out" / "model" / "model.safetensors").is_file()


def test_killed_worker_restarts_with_identical_losses(inputs, reference, tmp_path):
    rows, summary = gang_run(inputs, tmp_path, gang={"max_failures": 1}, fault="sft:worker1:step5")
    assert summary["resumed_from_step"] == 4
    assert [r["step"] for r in rows][:6] == [1, 2, 3, 4, 5, 5]  # step 5 replayed after the restart
    assert losses(rows) == losses(reference[1])  # bitwise, every step


def test_one_worker_resumes_two_workers_checkpoint(inputs, reference, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    shutil.copytree(reference[0] / "checkpoints" / "step_00000008", tmp_path / "checkpoints" / "step_00000008")
    rows, summary = gang_run(inputs, tmp_path, workers=1)
    assert summary["resumed_from_step"] == 8
    assert (tmp_path / "checkpoints" / "step_00000008" / "universal" / "zero").is_dir()  # resharded 2 -> 1
    ref = losses(reference[1])
    assert sorted(losses(rows)) == [9, 10]
    assert [losses(rows)[s] for s in (9, 10)] == pytest.approx([ref[9], ref[10]], rel=1e-5)
