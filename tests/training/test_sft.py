"""SFT in this process (a gloo group of one): the loss covers the response only, packed and padded
batches agree, the run trains and resumes exactly, LoRA trains adapters only and is merged."""
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_engine.task_data import TASK_SCHEMA, task_row
from data_engine.generators.tasks import generate_tasks
from training.config import SftConfig
from training.export import load_model, save_model
from training.logprobs import IGNORE
from training.loop import Hooks
from training.model import ModelConfig, Transformer
from training.sft import SftPaths, sft, sft_loss
from training.sft_data import SftCorpus, build_sft_cache, pack_first_fit
from training.tokenizer import TokenizerConfig, save_tokenizer, train_tokenizer

TINY = dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, dense_hidden=64, expert_hidden=32, max_seq_len=256)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    train = [task_row(t, "train") for t in generate_tasks(120, 1, difficulties=["basic"])]
    held = [task_row(t, "eval") for t in generate_tasks(26, 2, difficulties=["basic"])]
    for split, rows in (("train", train), ("eval", held)):
        (root / split).mkdir()
        pq.write_table(pa.Table.from_pylist(rows, schema=TASK_SCHEMA), root / split / "part-00000.parquet")
    tok = train_tokenizer([r["prompt"] + r["response"] for r in train], TokenizerConfig(vocab_size=400, split_digits=True))
    torch.manual_seed(0)
    init = save_model(Transformer(ModelConfig.from_preset("tiny", vocab_size=448, **TINY)), root / "init")
    save_tokenizer(tok, init)
    return root, init


def paths(data, name) -> SftPaths:
    root, init = data
    return SftPaths([root / "train" / "part-00000.parquet"], [root / "eval" / "part-00000.parquet"], init,
                    root / "work", root / name / "checkpoints", root / name / "out")


def cfg(**kw) -> SftConfig:
    base = {"steps": 8, "eval_every": 4, "checkpoint": {"every": 4, "keep": 2},
            "engine": {"zero_stage": 1, "optimizer": {"lr": 3e-3, "warmup_steps": 2}},
            "data": {"seq_len": 256, "micro_batch": 2, "global_batch": 4, "val_max_examples": 13}}
    for key, value in kw.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return SftConfig.model_validate(base)


def corpus(data, packing: bool) -> SftCorpus:
    root, init = data
    return SftCorpus(build_sft_cache([root / "train" / "part-00000.parquet"], init, root / "cache", seq_len=256),
                     256, packing)


def test_prompt_positions_get_zero_gradient_and_the_loss_is_the_response_mean(data):
    c = corpus(data, packing=True)
    batch = c.batch(c.train, [(0, 0), (1, 0)])
    model = Transformer(load_model(data[1]).cfg)
    grads = {}

    def keep_grad(module, inputs, out):
        out.register_hook(lambda g: grads.setdefault("g", g))
    model.lm_head.register_forward_hook(keep_grad)
    n = int((batch["y"] != IGNORE).sum())
    loss, metrics = sft_loss(model, {**batch, "scale": 1.0 / n})
    loss.backward()
    masked = batch["y"] == IGNORE
    assert masked.any() and (~masked).any()
    assert grads["g"][masked].abs().max() == 0  # no prompt or padding position reaches the loss
    assert grads["g"][~masked].abs().sum() > 0
    logits = model(batch["x"], positions_BT=batch["positions"], doc_ids_BT=batch["doc"]).logits
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["y"].flatten(), ignore_index=IGNORE)
    assert float(metrics["lm_loss"]) == pytest.approx(float(want), rel=1e-5)


def test_packed_and_padded_batches_give_the_same_per_example_loss(data):
    packed, padded = corpus(data, packing=True), corpus(data, packing=False)
    model = Transformer(load_model(data[1]).cfg).eval()
    pool = max(range(len(packed.train)), key=lambda p: len(packed.train[p].rows[0]))
    row = packed.train[pool].rows[0]
    assert len(row) >= 2  # several examples share the row
    b = packed.batch(packed.train, [(pool, 0)])
    nll = torch.nn.functional.cross_entropy(
        model(b["x"], positions_BT=b["positions"], doc_ids_BT=b["doc"]).logits[0], b["y"][0],
        ignore_index=IGNORE, reduction="none")
    for slot, example in enumerate(row):
        in_row = nll[b["doc"][0] == slot].sum()
        x, y = padded.example(example)
        alone = torch.nn.functional.cross_entropy(model(torch.tensor(x)[None]).logits[0], torch.tensor(y),
                                                  ignore_index=IGNORE, reduction="sum")
        assert float(in_row) == pytest.approx(float(alone), rel=1e-5)


def test_first_fit_packing_fills_rows_without_splitting_examples():
    rows = pack_first_fit([7, 3, 5, 2, 8, 1], capacity=10)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum([7, 3, 5, 2, 8, 1][i] for i in r) <= 10 for r in rows)
    assert rows == [[4, 3], [0, 1], [2, 5]]  # 8+2, 7+3, 5+1: decreasing length, first row with room


def test_sft_trains_writes_the_model_and_resumes_exactly(data):
    rows = []
    summary = sft(cfg(), paths(data, "full"), seed=0, hooks=Hooks(on_metrics=lambda m, s: rows.append(m)))
    assert [r["step"] for r in rows] == list(range(1, 9)) and summary["steps"] == 8
    assert rows[-1]["val/loss"] < rows[3]["val/loss"] and rows[-1]["lm_loss"] < rows[0]["lm_loss"]
    assert 0 < rows[0]["packing_efficiency"] <= 1 and summary["examples"] > 0
    out = paths(data, "full").out / "model"
    assert (out / "tokenizer.json").is_file() and load_model(out).cfg == load_model(data[1]).cfg

    again = paths(data, "again")
    again.checkpoints.mkdir(parents=True)
    shutil.copytree(paths(data, "full").checkpoints / "step_00000004", again.checkpoints / "step_00000004")
    replay = []
    resumed = sft(cfg(), again, seed=0, hooks=Hooks(on_metrics=lambda m, s: replay.append(m)))
    assert resumed["resumed_from_step"] == 4
    assert [r["loss"] for r in replay] == [r["loss"] for r in rows[4:]]  # bitwise


def test_lora_trains_adapters_only_resumes_exactly_and_saves_a_merged_model(data):
    rows = []
    summary = sft(cfg(lora={"enabled": True, "r": 4}), paths(data, "lora"), seed=0,
                  hooks=Hooks(on_metrics=lambda m, s: rows.append(m)))
    again = paths(data, "lora-again")
    again.checkpoints.mkdir(parents=True)
    shutil.copytree(paths(data, "lora").checkpoints / "step_00000004", again.checkpoints / "step_00000004")
    replay = []
    sft(cfg(lora={"enabled": True, "r": 4}), again, seed=0, hooks=Hooks(on_metrics=lambda m, s: replay.append(m)))
    assert [r["loss"] for r in replay] == [r["loss"] for r in rows[4:]]  # adapters and frozen weights restored
    base = load_model(data[1])
    tuned = load_model(paths(data, "lora").out / "model")  # a plain model: adapters folded in
    assert 0 < summary["trainable_params"] < sum(p.numel() for p in base.parameters()) // 5
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p, base.state_dict()[n])}
    assert changed and all(".attn." in n or ".ffn." in n for n in changed)
    assert not any(n.endswith(("embed.weight", "lm_head.weight")) or "router" in n for n in changed)
    assert not any(n.endswith(("ffn.w_gate", "ffn.w_up", "ffn.w_down")) for n in changed)  # routed experts frozen


def test_nonfinite_steps_are_skipped_then_abort(data):
    from tests.training.test_engine import poison
    from training.loop import NonFiniteLoss
    rows, step = [], {"now": None}

    def on_step(s, model):
        if step["now"] is None:
            poison(model, lambda: step["now"] in {1, 5, 6, 7})
        step["now"] = s
    with pytest.raises(NonFiniteLoss, match="3 non-finite losses in a row.*step_00000004"):
        sft(cfg(max_nonfinite=3), paths(data, "nan"), seed=0,
            hooks=Hooks(on_metrics=lambda m, s: rows.append(m), on_step=on_step))
    assert [r["skipped"] for r in rows] == [False, True, False, False, False, True, True]


def test_difficulty_curriculum_draws_basic_examples_first(tmp_path):
    from training.config import SftDataConfig
    from training.pretrain_data import CurriculumSampler
    from training.sft_data import SftCorpus
    root = tmp_path / "tasks"
    rows = [task_row(t, "train") for t in generate_tasks(60, 3, families=["modular", "gcd_lcm"])]
    (root / "train").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=TASK_SCHEMA), root / "train" / "p.parquet")
    tok = train_tokenizer([r["prompt"] + r["response"] for r in rows], TokenizerConfig(vocab_size=300))
    save_tokenizer(tok, tmp_path / "tok")
    c = SftCorpus(build_sft_cache([root / "train" / "p.parquet"], tmp_path / "tok", tmp_path / "cache", seq_len=512),
                  512, packing=False)
    data = SftDataConfig(global_batch=8, micro_batch=8, family_weights={"modular": 3.0, "gcd_lcm": 1.0},
                         curriculum={"enabled": True, "boundaries": [0.5, 0.75]})
    sampler = CurriculumSampler(c, data, total_steps=8, seed=0, weights=data.family_weights)
    levels = [{c.train[p].difficulty for p, _ in sampler.next_batch()} for _ in range(8)]
    assert levels[:4] == [{"basic"}] * 4 and all(lv <= {"basic", "advanced"} for lv in levels[4:6])
    assert "expert" in set().union(*levels[6:])
    with pytest.raises(ValueError, match="data.family_weights: no training data for domain"):
        CurriculumSampler(c, data, 8, 0, weights={"algebra": 1.0}, weights_key="data.family_weights")


def test_the_loss_scale_makes_the_update_independent_of_the_micro_batch_split(data):
    """One global batch of examples with different numbers of response tokens, as 1 micro-batch of 8
    or 4 of 2: the same mean over the batch's response tokens, hence the same gradient (the balance
    loss is off here: it is a mean over micro-batches by design, like pretraining's)."""
    from training.config import EngineConfig
    from training.engine import Engine
    from training.sft import sft_loss
    c = corpus(data, packing=False)
    ids = [(p, s) for p in range(4) for s in range(2)]
    weights = []
    for micro in (8, 2):
        torch.manual_seed(0)
        model = load_model(data[1])
        no_aux = Transformer(model.cfg.model_copy(update={"aux_loss_coef": 0.0}))
        no_aux.load_state_dict(model.state_dict())
        engine = Engine(no_aux, EngineConfig(zero_stage=0, grad_clip=0.0), micro_batch=micro,
                        global_batch=8, total_steps=10)
        batches = c.micro_batches(ids, micro)
        scale = engine.gas / c.n_targets(c.train, ids)
        result = engine.train_step([{**b, "scale": scale} for b in batches], sft_loss)
        weights.append((result.metrics["lm_loss"], result.grad_norm))
    (loss_a, norm_a), (loss_b, norm_b) = weights
    assert loss_a == pytest.approx(loss_b, rel=1e-5) and norm_a == pytest.approx(norm_b, rel=1e-5)
    # the naive alternative, a mean per micro-batch then over micro-batches, is not the same loss
    fresh = Transformer(no_aux.cfg)
    fresh.load_state_dict(load_model(data[1]).state_dict())
    with torch.no_grad():
        naive = sum(float(sft_loss(fresh, {**b, "scale": 1.0 / int((b["y"] != -100).sum())})[1]["lm_loss"])
                    for b in c.micro_batches(ids, 2)) / 4
    assert abs(naive - loss_a) > 1e-4  # float noise is ~1e-6


def test_padded_batches_train_too(data):
    rows = []
    summary = sft(cfg(steps=4, data={"packing": False}), paths(data, "padded"), seed=0,
                  hooks=Hooks(on_metrics=lambda m, s: rows.append(m)))
    assert summary["packing"] is False and summary["sequences"] == summary["examples"]
    assert all(0 < r["packing_efficiency"] < 1 for r in rows) and rows[-1]["lm_loss"] < rows[0]["lm_loss"]
