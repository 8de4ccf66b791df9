"""RL on real Ray Train gangs (gloo, DeepSpeed ZeRO-1), through run_gang like every training stage.

The same job in this process and on a 1-worker gang gives the same first-iteration rewards and
losses. On a 2-worker gang (each worker sampling half the prompts), a run whose worker 1 is
killed in iteration 3 restarts the gang from the iteration-2 checkpoint and reproduces the
uninterrupted run's rewards and losses.
"""
import pytest
import torch

from cluster.gang import GangConfig
from cluster.session import RaySettings, connect
from cluster.train import run_gang
from rl import ppo
from rl.config import RlConfig
from training.loop import Hooks

CFG = RlConfig.model_validate({
    "algorithm": "grpo", "iterations": 4, "minibatch": 16, "micro_batch": 8, "checkpoint_every": 2,
    "rollout": {"prompts": 8, "group_size": 4, "max_new_tokens": 24, "temperature": 2.0},
    "rewards": {"accuracy": 1.0, "format": 0.1}, "loss": {"kl_coef": 0.02},
    "engine": {"zero_stage": 1, "optimizer": {"lr": 1e-3, "warmup_steps": 0}}})
KEYS = ("loss", "policy_loss", "kl", "entropy", "reward/mean", "reward/accuracy/mean", "response_length/mean")


@pytest.fixture(scope="module")
def ray_cluster():
    connect(RaySettings(num_cpus=2))


def paths(reasoner, root) -> dict:
    return {"train_tasks": [str(reasoner.train_dir / "part-00000.parquet")], "init_model": str(reasoner.model),
            "work": str(root / "work"), "checkpoints": str(root / "checkpoints"), "out": str(root / "out")}


def gang_run(reasoner, root, workers: int, cfg=CFG, **kw) -> tuple[list[dict], dict]:
    rows = []
    payload = {"config": cfg.model_dump(mode="json"), "seed": 0, "paths": paths(reasoner, root)}
    summary = run_gang(ppo.worker, payload, GangConfig(num_workers=workers), checkpoints=root / "checkpoints",
                       work=root / "work", on_metrics=rows.append, name="prl", **kw)
    return rows, summary


def test_in_process_and_on_a_gang_give_the_same_first_iteration(reasoner, ray_cluster, tmp_path):
    cfg = CFG.model_copy(update={"iterations": 1})
    gang_rows, _ = gang_run(reasoner, tmp_path / "gang", 1, cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a 1-CPU Ray worker runs
    try:
        local_rows = []
        ppo.worker({"config": cfg.model_dump(mode="json"), "seed": 0, "paths": paths(reasoner, tmp_path / "local")},
                   Hooks(on_metrics=lambda m, step: local_rows.append(m)))
    finally:
        torch.set_num_threads(threads)
    assert [r["step"] for r in gang_rows] == [r["step"] for r in local_rows] == [1, 2]
    for a, b in zip(gang_rows, local_rows):
        for key in KEYS:
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key


def test_a_killed_worker_resumes_with_equal_rewards_and_losses(reasoner, ray_cluster, tmp_path):
    whole, summary = gang_run(reasoner, tmp_path / "whole", 2)
    assert summary["iterations"] == 4 and [r["step"] for r in whole] == list(range(1, 9))
    broken, summary = gang_run(reasoner, tmp_path / "broken", 2, fault="prl:worker1:step5")
    assert summary["resumed_from_step"] == 4
    after = [r for r in broken if r["step"] > 4][-4:]  # the restarted gang's updates
    assert [r["step"] for r in after] == [5, 6, 7, 8]
    for a, b in zip(whole[4:], after):
        for key in KEYS:
            if key in a:
                assert a[key] == b[key], (key, a["step"])
