"""RL's rollout role as a Ray actor group (cluster/roles.py) against the same class in process:
the same completions for the same prompts and seed, and the same first-iteration rewards and
losses when a gang samples through the group instead of its own copy of the policy."""
import pytest
import torch

from cluster.gang import GangConfig
from cluster.roles import RayRolloutGroup
from cluster.session import RaySettings, connect
from cluster.train import run_gang
from rl import ppo
from rl.config import RlConfig
from rl.roles import Rollout
from training.export import load_model, load_model_config
from training.loop import Hooks
from training.template import encode_prompt
from training.tokenizer import EOS, PAD, load_tokenizer, special_token_ids

CFG = RlConfig.model_validate({
    "algorithm": "grpo", "iterations": 1, "minibatch": 16, "micro_batch": 8,
    "rollout": {"prompts": 8, "group_size": 4, "max_new_tokens": 24, "temperature": 2.0, "batch_size": 8},
    "rewards": {"accuracy": 1.0}, "engine": {"zero_stage": 1, "optimizer": {"lr": 1e-3, "warmup_steps": 0}}})


@pytest.fixture(scope="module")
def ray_cluster():
    connect(RaySettings(num_cpus=2))


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a 1-CPU Ray worker runs
    yield
    torch.set_num_threads(threads)


def stops(model_dir):
    ids = special_token_ids(load_tokenizer(model_dir))
    return [ids[EOS], ids["</answer>"]], ids[PAD]


def test_an_actor_group_samples_what_the_class_samples_in_process(reasoner, ray_cluster, one_thread):
    stop, pad = stops(reasoner.model)
    tok = load_tokenizer(reasoner.model)
    prompts = [encode_prompt(tok, f"Repeat the number {n}.") for n in range(100, 120)]  # 3 batches of 8
    weights = load_model(reasoner.model).state_dict()
    local = Rollout(load_model_config(reasoner.model), stop, pad)
    local.sync(weights)
    group = RayRolloutGroup(load_model_config(reasoner.model), stop, pad, workers=2, cpus_per_worker=0.5)
    try:
        group.sync(weights)
        a, b = local.generate(prompts, CFG.rollout, seed=7), group.generate(prompts, CFG.rollout, seed=7)
    finally:
        group.shutdown()
    assert torch.equal(a.lengths, b.lengths) and torch.equal(a.tokens, b.tokens)
    assert len(set(map(tuple, a.tokens.tolist()))) > 1  # sampled, not all the same


def test_a_gang_sampling_through_the_group_matches_the_colocated_run(reasoner, ray_cluster, one_thread, tmp_path):
    def paths(root):
        return {"train_tasks": [str(reasoner.train_dir / "part-00000.parquet")], "init_model": str(reasoner.model),
                "work": str(root / "work"), "checkpoints": str(root / "checkpoints"), "out": str(root / "out")}
    stop, pad = stops(reasoner.model)
    group = RayRolloutGroup(load_model_config(reasoner.model), stop, pad, workers=2, cpus_per_worker=0.5)
    try:
        rows = []
        payload = {"config": CFG.model_dump(mode="json"), "seed": 0, "paths": paths(tmp_path / "gang"),
                   "rollout_group": group}
        run_gang(ppo.worker, payload, GangConfig(num_workers=1), checkpoints=tmp_path / "gang" / "checkpoints",
                 work=tmp_path / "gang" / "work", on_metrics=rows.append, name="prl")
    finally:
        group.shutdown()
    local = []
    ppo.worker({"config": CFG.model_dump(mode="json"), "seed": 0, "paths": paths(tmp_path / "local")},
               Hooks(on_metrics=lambda m, step: local.append(m)))
    assert [r["step"] for r in rows] == [r["step"] for r in local] == [1, 2]
    for a, b in zip(rows, local):
        for key in ("loss", "policy_loss", "entropy", "reward/mean", "response_length/mean"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key


def test_a_group_that_cannot_fit_is_refused_by_name(reasoner, ray_cluster):
    stop, pad = stops(reasoner.model)
    with pytest.raises(ValueError, match=r"prl.rollout.workers=64: the rollout workers need \{.CPU.: 64(\.0)?\} beside the gang"):
        RayRolloutGroup(load_model_config(reasoner.model), stop, pad, workers=64, key="prl.rollout.workers")
    # one worker fits the idle cluster, but not beside the 2-worker gang that will use it
    with pytest.raises(ValueError, match="beside the gang's {'CPU': 2"):
        RayRolloutGroup(load_model_config(reasoner.model), stop, pad, workers=1, reserve={"CPU": 2.0})
