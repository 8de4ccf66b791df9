"""RL in one process on the session's tiny reasoner (the echo task): the reward rises; a crashed
run resumes from its checkpoint and replays the same rewards and losses; a checkpoint of another
config is refused; the first update's ratio is 1 (old log-probs match training's forward); the
MoE router makes the same choices in rollout (KV cache) and in training."""
from pathlib import Path

import pytest
import torch

from rl.config import RlConfig
from rl.ppo import RlPaths, rl
from training.loop import Hooks


def config(**changes) -> RlConfig:
    base = {"algorithm": "grpo", "iterations": 4, "minibatch": 16, "micro_batch": 8, "checkpoint_every": 2,
            "rollout": {"prompts": 8, "group_size": 4, "max_new_tokens": 24, "temperature": 2.0},
            "rewards": {"accuracy": 1.0}, "engine": {"zero_stage": 0, "optimizer": {"lr": 1e-3, "warmup_steps": 0}}}
    for key, value in changes.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return RlConfig.model_validate(base)


def run(reasoner, root: Path, cfg: RlConfig, on_step=None, seed: int = 0) -> tuple[list[dict], dict]:
    rows = []
    hooks = Hooks(on_metrics=lambda m, step: rows.append(m), on_step=on_step or (lambda step, model: None))
    paths = RlPaths(train_tasks=[reasoner.train_dir / "part-00000.parquet"], init_model=reasoner.model,
                    work=root / "work", checkpoints=root / "checkpoints", out=root / "out")
    return rows, rl(cfg, paths, seed=seed, hooks=hooks)


def rewards(rows):
    return [r["reward/mean"] for r in rows if "reward/mean" in r]


def test_grpo_raises_the_reward_on_a_task_the_model_half_solves(reasoner, tmp_path):
    # at temperature 2 the reasoner's samples are right about a fifth of the time
    rows, summary = run(reasoner, tmp_path, config(iterations=20, checkpoint_every=20))
    r = rewards(rows)
    assert len(r) == 20 and summary["iterations"] == 20 and summary["steps"] == 40
    assert sum(r[-5:]) / 5 > sum(r[:5]) / 5 + 0.1, r
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()
    first = rows[0]
    assert first["ratio/mean"] == pytest.approx(1.0, abs=1e-5)  # old log-probs = training's forward
    assert first["clip_frac/low"] == 0 and first["clip_frac/high"] == 0
    for key in ("reward/accuracy/mean", "reward/format/mean", "response_length/mean", "response_length/max",
                "response_length/truncated", "zero_variance_groups", "advantages/mean", "advantages/std",
                "time/generate", "time/score", "time/logprobs", "time/advantages", "time/sync",
                "generated_tokens_per_s", "entropy", "kl", "policy_loss", "tokens_per_s"):
        assert key in first, key


def test_ppo_resumes_after_a_crash_with_equal_rewards_and_losses(reasoner, tmp_path):
    # a separate critic, a reference (KL in the reward), the novelty history and the learnability
    # curriculum's cell accuracies all live in the checkpoint
    cfg = config(algorithm="ppo", rewards={"accuracy": 1.0, "novelty": 0.1},
                 loss={"kl_coef": 0.05, "kl_in": "reward", "kl_estimator": "k1"}, rollout={"curriculum": "learnability"})
    whole, _ = run(reasoner, tmp_path / "whole", cfg)

    def crash(step, model):
        if step == 5:
            raise RuntimeError("worker lost")
    with pytest.raises(RuntimeError, match="worker lost"):
        run(reasoner, tmp_path / "broken", cfg, on_step=crash)
    resumed, summary = run(reasoner, tmp_path / "broken", cfg)
    assert summary["resumed_from_step"] == 4 and [r["step"] for r in resumed] == [5, 6, 7, 8]
    for a, b in zip(whole[4:], resumed):
        for key in ("loss", "policy_loss", "value_loss", "kl", "entropy", "reward/mean", "reward/novelty/mean",
                    "explained_variance", "curriculum/mean_cell_accuracy"):
            if key in a:
                assert a[key] == b[key], (key, a["step"])
    assert "value_loss" in whole[0] and "explained_variance" in whole[0] and "reward/novelty/mean" in whole[0]
    assert whole[0]["curriculum/mean_cell_accuracy"] != 0.5  # the first iteration's groups moved it


def test_a_checkpoint_of_another_config_is_refused(reasoner, tmp_path):
    run(reasoner, tmp_path, config(iterations=2))
    with pytest.raises(ValueError, match="belongs to another run .*config"):
        run(reasoner, tmp_path, config(iterations=2, engine={"optimizer": {"lr": 5e-4, "warmup_steps": 0}}))


def test_moe_router_makes_the_same_choices_in_rollout_and_training(reasoner):
    from rl.roles import ActorCritic, Rollout
    from training.export import load_model
    from training.model import MoE
    from training.template import encode_prompt
    from training.tokenizer import EOS, PAD, load_tokenizer, special_token_ids
    lm = load_model(reasoner.model)
    lm.cfg = lm.cfg.model_copy(update={"capacity_factor": 0.5})  # training-time dropping would break it
    for moe in lm.moe_layers().values():
        moe.cfg = lm.cfg
    model = ActorCritic(lm, critic="shared").train()
    assert all(m.cfg.capacity_factor is None for m in model.policy.moe_layers().values())
    tok = load_tokenizer(reasoner.model)
    ids = special_token_ids(tok)
    rollout = Rollout(model.policy.cfg, [ids[EOS], ids["</answer>"]], ids[PAD])
    rollout.sync({k: v for k, v in model.policy.state_dict().items()})
    prompts = [encode_prompt(tok, f"Repeat the number {n}.") for n in (12, 345, 6789)]

    def record(module: MoE, into: list):
        route = module.route

        def wrapped(probs):
            idx, gates = route(probs)
            into.append(idx.sort(-1).values)
            return idx, gates
        module.route = wrapped

    seen_rollout, seen_train = [], []
    record(rollout.model.blocks[1].ffn, seen_rollout)
    record(model.policy.blocks[1].ffn, seen_train)
    cfg = config().rollout.model_copy(update={"temperature": 1.0})
    gen = rollout.generate(prompts, cfg, seed=0)
    for row, (p, toks, n) in enumerate(zip(prompts, gen.tokens, gen.lengths.tolist())):
        seen_train.clear()
        seq = torch.tensor([p + toks[:n].tolist()])
        model(seq, torch.ones_like(seq, dtype=torch.bool))
        trained = seen_train[0].view(len(seq[0]), -1)
        # the rollout saw the batch's prompts (left-padded), then one token per step for every row
        width = max(len(q) for q in prompts)
        prefill = seen_rollout[0].view(len(prompts), width, -1)[row, width - len(p):]
        steps = [s.view(len(prompts), -1)[row] for s in seen_rollout[1:n]]
        sampled = torch.cat([prefill, torch.stack(steps)]) if steps else prefill
        assert torch.equal(sampled, trained[:len(p) + n - 1])


def test_dynamic_sampling_draws_more_prompts_to_replace_tied_groups(reasoner, tmp_path):
    # at temperature 1.4 the reasoner is mostly right: many groups tie at reward 1
    rollout = {"temperature": 1.4, "dynamic_sampling": False}
    plain, _ = run(reasoner, tmp_path / "plain", config(iterations=1, rollout=rollout))
    dynamic, _ = run(reasoner, tmp_path / "dyn", config(iterations=1, rollout={**rollout, "dynamic_sampling": True,
                                                                                "max_refill_rounds": 3}))
    p, d = plain[0], dynamic[0]
    assert p["zero_variance_groups"] > 0 and p["dynamic_sampling/groups_drawn"] == 8
    assert p["dynamic_sampling/tied_groups_trained"] == p["zero_variance_groups"]
    assert d["dynamic_sampling/groups_drawn"] > 8 and d["dynamic_sampling/rounds"] > 1
    # the figures describe every drawn group; the trained batch holds fewer tied ones
    assert d["dynamic_sampling/tied_groups_trained"] < p["dynamic_sampling/tied_groups_trained"]


def test_a_reward_plateau_ends_the_stage_early_with_a_checkpoint(reasoner, tmp_path):
    cfg = config(iterations=6, checkpoint_every=5, switch={"patience": 1, "min_delta": 10.0, "min_iterations": 2})
    rows, summary = run(reasoner, tmp_path, cfg)
    assert summary["ended_on_plateau"] and summary["iterations"] == 2 and summary["steps"] == 4
    assert (tmp_path / "checkpoints" / "step_00000004").is_dir()
    _, again = run(reasoner, tmp_path, cfg)  # a rerun finds the stage over, trains nothing more
    assert again["steps"] == 4 and again["resumed_from_step"] == 4


def test_one_update_per_rollout_skips_the_old_logprob_pass_with_the_same_result(reasoner, tmp_path, monkeypatch):
    from rl.ppo import RlJob
    cfg = config(iterations=2, minibatch=32, micro_batch=8)  # 8 prompts x 4: one update per rollout
    fast, _ = run(reasoner, tmp_path / "fast", cfg)
    monkeypatch.setattr(RlJob, "on_policy", property(lambda self: False))
    full, _ = run(reasoner, tmp_path / "full", cfg)
    assert [r["step"] for r in fast] == [r["step"] for r in full] == [1, 2]
    for a, b in zip(fast, full):
        for key in ("loss", "policy_loss", "entropy", "reward/mean", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
        assert a["time/logprobs"] < b["time/logprobs"]


def test_any_seed_works(reasoner, tmp_path):
    rows, summary = run(reasoner, tmp_path, config(iterations=1), seed=10 ** 12)
    assert summary["iterations"] == 1 and rows[0]["reward/mean"] >= 0
