"""RL's roles as Ray actor groups (cluster/roles.py) against the same classes in process: the
rollout group samples the same completions for the same prompts and seed, the reference group
gives the same log-probs, the reward model group the same scores; a gang whose rollout, reference
and reward model are all groups gives the colocated run's first-iteration rewards and losses."""
import shutil
import time

import pytest
import torch

from cluster.gang import GangConfig
from cluster.roles import RayReferenceGroup, RayRewardModelGroup, RayRolloutGroup
from cluster.session import RaySettings, connect
from cluster.train import run_gang
from rl import ppo
from rl.config import RlConfig
from rl.reward_model import RewardModel
from rl.rewards import RewardModelTerm, Sample
from rl.roles import Reference, Rollout
from training.export import load_model, load_model_config
from training.loop import Hooks
from training.template import encode_prompt
from training.tokenizer import EOS, PAD, load_tokenizer, special_token_ids

CFG = RlConfig.model_validate({
    "algorithm": "grpo", "iterations": 1, "minibatch": 16, "micro_batch": 8,
    "rollout": {"prompts": 8, "group_size": 4, "max_new_tokens": 24, "temperature": 2.0, "batch_size": 8},
    "rewards": {"accuracy": 1.0}, "engine": {"zero_stage": 1, "optimizer": {"lr": 1e-3, "warmup_steps": 0}}})


@pytest.fixture(scope="module")
def reward_model(reasoner, tmp_path_factory):
    """A reward model folder: the reasoner's trunk with a random (seeded) head, so scores differ."""
    from training.export import load_model
    folder = tmp_path_factory.mktemp("rm") / "model"
    torch.manual_seed(3)
    model = RewardModel.from_lm(load_model(reasoner.model))
    torch.nn.init.normal_(model.head.weight, std=0.5)
    model.save(folder)
    for f in reasoner.model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)
    return folder


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


def completions_batch(reasoner):
    """A right-padded batch of prompt + completion rows, with the completion positions marked."""
    tok = load_tokenizer(reasoner.model)
    rows = [(encode_prompt(tok, f"Repeat the number {n}."), tok.encode(f"<think>\n{n}\n</think>\n<answer>{n}</answer>").ids[:4 + n % 7])
            for n in range(200, 211)]  # 11 rows: micro-batches of 4, 4 and 3
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    real, action = torch.zeros_like(ids, dtype=torch.bool), torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        real[i, :len(p) + len(c)] = True
        action[i, len(p) - 1:len(p) + len(c) - 1] = True
    return ids, real, action


def test_a_reference_group_gives_the_log_probs_of_the_class_in_process(reasoner, ray_cluster, one_thread):
    ids, real, action = completions_batch(reasoner)
    local = Reference.from_folder(reasoner.model, temperature=2.0, micro_batch=4).logprobs(ids, real, action)
    group = RayReferenceGroup(reasoner.model, temperature=2.0, micro_batch=4, workers=2, cpus_per_worker=0.5)
    try:
        remote = group.logprobs(ids, real, action)
    finally:
        group.shutdown()
    assert torch.equal(local, remote)
    assert (local[action] < 0).all() and (local[~action] == 0).all()  # log-probs where actions are, 0 elsewhere


def test_a_reward_model_group_scores_as_the_term_in_process(reward_model, ray_cluster, one_thread):
    samples = [Sample(f"Repeat the number {n}.", f"<think>\n{n}\n</think>\n<answer>{n * (1 + n % 3)}</answer>" + " x" * (n % 5),
                      str(n)) for n in range(300, 321)]  # 21 samples of several lengths: batches of 16 and 5
    local = RewardModelTerm(str(reward_model))(samples)
    group = RayRewardModelGroup(reward_model, workers=2, cpus_per_worker=0.5)
    try:
        remote = group(samples)
    finally:
        group.shutdown()
    assert remote == local and len(set(local)) > 10
    with pytest.raises(ValueError, match="not a reward model folder"):
        RayRewardModelGroup(reward_model.parent, workers=1)  # checked before any actor starts


def test_a_gang_sharing_role_groups_matches_the_colocated_run(reasoner, reward_model, ray_cluster, one_thread, tmp_path):
    """Rollout, reference (KL in the loss) and reward model all as Ray actor groups, against every
    role in the gang's process (the FrozenModel reference, the reward model loaded by the term)."""
    cfg = CFG.model_copy(update={"rewards": {"accuracy": 1.0, "reward_model": 0.5}, "reward_model": str(reward_model),
                                 "loss": CFG.loss.model_copy(update={"kl_coef": 0.1})})

    def paths(root):
        return {"train_tasks": [str(reasoner.train_dir / "part-00000.parquet")], "init_model": str(reasoner.model),
                "work": str(root / "work"), "checkpoints": str(root / "checkpoints"), "out": str(root / "out")}
    stop, pad = stops(reasoner.model)
    groups = {"rollout_group": RayRolloutGroup(load_model_config(reasoner.model), stop, pad, workers=1, cpus_per_worker=0.25),
              "reference_group": RayReferenceGroup(reasoner.model, temperature=2.0, micro_batch=8, workers=1,
                                                   cpus_per_worker=0.25),
              "reward_model_group": RayRewardModelGroup(reward_model, workers=1, cpus_per_worker=0.25)}
    try:
        rows = []
        payload = {"config": cfg.model_dump(mode="json"), "seed": 0, "paths": paths(tmp_path / "gang"), **groups}
        run_gang(ppo.worker, payload, GangConfig(num_workers=1), checkpoints=tmp_path / "gang" / "checkpoints",
                 work=tmp_path / "gang" / "work", on_metrics=rows.append, name="prl")
    finally:
        for group in groups.values():
            group.shutdown()
    local = []
    ppo.worker({"config": cfg.model_dump(mode="json"), "seed": 0, "paths": paths(tmp_path / "local")},
               Hooks(on_metrics=lambda m, step: local.append(m)))
    assert [r["step"] for r in rows] == [r["step"] for r in local] == [1, 2]
    assert rows[0]["reward/reward_model/std"] > 0 and rows[1]["kl"] > 0  # both roles did work
    for a, b in zip(rows, local):
        for key in ("loss", "policy_loss", "entropy", "kl", "reward/mean", "reward/reward_model/mean",
                    "response_length/mean"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key


def test_the_stage_builds_the_groups_its_recipe_asks_for(reasoner, reward_model, ray_cluster):
    import ray

    from pipelines.stages.prl import role_groups
    cfg = CFG.model_copy(update={"rewards": {"accuracy": 1.0, "reward_model": 0.5}, "reward_model": str(reward_model),
                                 "loss": CFG.loss.model_copy(update={"kl_coef": 0.1})})
    small = {"workers": 1, "cpus_per_worker": 0.25}
    cfg = RlConfig.model_validate({**cfg.model_dump(), "roles": {"reference": small, "reward_model": small}})
    free = ray.available_resources()["CPU"]
    groups = role_groups(cfg, reasoner.model, GangConfig(num_workers=1))
    assert set(groups) == {"reference_group", "reward_model_group"}
    assert ray.available_resources()["CPU"] == pytest.approx(free - 0.5)
    for group in groups.values():
        group.shutdown()
    # the reward model group does not fit beside the gang: the reference group already made is let go
    big = RlConfig.model_validate({**cfg.model_dump(), "roles": {"reference": small, "reward_model": {"workers": 4}}})
    with pytest.raises(ValueError, match=r"prl.roles.reward_model.workers=4: the reward model workers need \{.CPU.: 4"):
        role_groups(big, reasoner.model, GangConfig(num_workers=1))
    deadline = time.time() + 10  # the resource view catches up with removed placement groups
    while ray.available_resources().get("CPU", 0) < free and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources()["CPU"] == pytest.approx(free)


def test_a_group_that_cannot_fit_is_refused_by_name(reasoner, ray_cluster):
    stop, pad = stops(reasoner.model)
    with pytest.raises(ValueError, match=r"prl.rollout.workers=64: the rollout workers need \{.CPU.: 64(\.0)?\} beside the gang"):
        RayRolloutGroup(load_model_config(reasoner.model), stop, pad, workers=64, key="prl.rollout.workers")
    # one worker fits the idle cluster, but not beside the 2-worker gang that will use it
    with pytest.raises(ValueError, match="beside the gang's {'CPU': 2"):
        RayRolloutGroup(load_model_config(reasoner.model), stop, pad, workers=1, reserve={"CPU": 2.0})
