"""torch.compile of the model's dense parts (EngineConfig.compile) and the fused AdamW switch, on
CPU with inductor: the same losses as eager, the same parameter names, a compiled run resumes
from a checkpoint with the losses of the uninterrupted run. (tests/training/test_cuda.py has the
bf16 versions on a GPU.)"""
import pytest
import torch

from tests.training.test_engine import TINY, batches, tiny_engine
from training.compile import compile_targets
from training.config import EngineConfig, OptimizerConfig
from training.model import MoE, ModelConfig, RMSNorm, SwiGLU, Transformer


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny", vocab_size=128, **TINY))


def test_dense_targets_leave_the_moe_layer_eager():
    model = tiny_model()
    dense = compile_targets(model, "dense")
    assert not any(isinstance(m, MoE) for m in dense)
    per_block = [[type(m).__name__ for m in dense if any(m is c for c in b.modules())] for b in model.blocks]
    moe_block = [b for b in model.blocks if isinstance(b.ffn, MoE)][0]
    expected_moe = ["RMSNorm", "Attention", "RMSNorm"] + (["SwiGLU"] if moe_block.ffn.shared is not None else [])
    assert expected_moe in per_block
    if any(isinstance(b.ffn, SwiGLU) for b in model.blocks):
        assert ["RMSNorm", "Attention", "RMSNorm", "SwiGLU"] in per_block
    assert dense[-2:] == [model.norm, model.lm_head] and isinstance(dense[-2], RMSNorm)
    assert compile_targets(model, "blocks") == list(model.blocks)
    assert compile_targets(model, "off") == []
    with pytest.raises(ValueError, match="holds no r1pipe Transformer"):
        compile_targets(torch.nn.Linear(2, 2), "dense")


def test_config_rejects_an_unknown_compile_mode_by_name():
    with pytest.raises(ValueError, match="compile"):
        EngineConfig(compile="everything")


def test_compiled_engine_matches_eager_and_resumes(tmp_path):
    eager = tiny_engine(1)
    expected = [eager.train_step(batches(s)).loss for s in range(4)]
    a = tiny_engine(1, compile="dense")
    assert [n for n, _ in a.module.named_parameters()] == [n for n, _ in eager.module.named_parameters()]
    got = [a.train_step(batches(s)).loss for s in range(2)]
    assert got == pytest.approx(expected[:2], rel=1e-5)  # fp32: kernel fusion reorders sums only
    a.save(tmp_path / "ck")
    after = [a.train_step(batches(s)).loss for s in (2, 3)]
    assert after == pytest.approx(expected[2:], rel=1e-5)
    b = tiny_engine(1, compile="dense")
    b.load(tmp_path / "ck")
    assert [b.train_step(batches(s)).loss for s in (2, 3)] == after  # same kernels: bit for bit


def test_fused_adamw_is_off_on_cpu_by_default_and_trains_alike_when_asked():
    plain = tiny_engine(1)
    assert not plain.ds.optimizer.param_groups[0].get("fused")
    fused = tiny_engine(1, optimizer=OptimizerConfig(fused=True))
    assert fused.ds.optimizer.param_groups[0]["fused"] is True
    expected = [plain.train_step(batches(s)).loss for s in range(3)]
    assert [fused.train_step(batches(s)).loss for s in range(3)] == pytest.approx(expected, rel=1e-5)
