"""The capacity planner's memory figures against DeepSpeed's own estimators, and its arithmetic."""
import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from training.config import EngineConfig
from training.model import ModelConfig, Transformer, flops_per_token, param_counts
from training.plan import (GiB, activation_bytes, largest_layer_params, largest_micro_batch, memory_per_gpu,
                           model_states, step_seconds)

SHAPES = [dict(preset="tiny", vocab_size=300),
          dict(preset="tiny", vocab_size=64, d_model=64, n_experts=16, expert_hidden=96, top_k=2)]


def cfg_of(shape: dict) -> ModelConfig:
    shape = dict(shape)
    return ModelConfig.from_preset(shape.pop("preset"), **shape)


@pytest.mark.parametrize("shape", SHAPES, ids=["vocab-largest", "experts-largest"])
def test_counts_match_deepspeeds_reading_of_the_real_model(shape):
    cfg = cfg_of(shape)
    torch.manual_seed(0)
    total, largest = model_to_params(Transformer(cfg))
    assert param_counts(cfg)["total"] == total
    assert largest_layer_params(cfg) == largest


@pytest.mark.parametrize("shape", SHAPES, ids=["vocab-largest", "experts-largest"])
@pytest.mark.parametrize("world", [1, 8, 64])
@pytest.mark.parametrize("offload", [False, True])
def test_model_states_equal_deepspeeds_estimators(shape, world, offload):
    cfg = cfg_of(shape)
    n, largest = param_counts(cfg)["total"], largest_layer_params(cfg)
    nodes, per_node = (world // 8, 8) if world >= 8 else (1, world)
    z2 = EngineConfig(zero_stage=2, precision="bf16", offload_optimizer=offload)
    _, gpu2 = estimate_zero2_model_states_mem_needs(n, per_node, nodes, cpu_offload=offload)
    assert sum(model_states(cfg, z2, world)) == pytest.approx(gpu2, abs=1)
    z3 = EngineConfig(zero_stage=3, precision="bf16", offload_optimizer=offload, offload_params=offload)
    _, gpu3, _ = estimate_zero3_model_states_mem_needs(n, largest, per_node, nodes, cpu_offload=offload,
                                                       cpu_offload_params=offload)
    assert sum(model_states(cfg, z3, world)) == pytest.approx(gpu3, abs=1)
    z3_opt = EngineConfig(zero_stage=3, precision="bf16", offload_optimizer=True)
    _, gpu3_opt, _ = estimate_zero3_model_states_mem_needs(n, largest, per_node, nodes, cpu_offload=True,
                                                           cpu_offload_params=False)
    assert sum(model_states(cfg, z3_opt, world)) == pytest.approx(gpu3_opt, abs=1)


def test_zero_stages_and_fp32_by_hand():
    cfg = cfg_of(SHAPES[0])
    n = param_counts(cfg)["total"]
    assert model_states(cfg, EngineConfig(zero_stage=0, precision="bf16"), 4) == (2 * n, 6 * n, 12 * n)
    assert model_states(cfg, EngineConfig(zero_stage=1, precision="bf16"), 4) == (2 * n, 6 * n, 3 * n)
    assert model_states(cfg, EngineConfig(zero_stage=1, precision="fp32"), 4) == (4 * n, 4 * n, 2 * n)


def test_activations_scale_with_tokens_and_checkpointing_saves():
    cfg = cfg_of(SHAPES[1])
    one = activation_bytes(cfg, 128, 1, checkpointing=False)
    assert activation_bytes(cfg, 128, 4, checkpointing=False) == 4 * one
    assert activation_bytes(cfg, 256, 1, checkpointing=False) == 2 * one  # flash attention: linear in T
    assert activation_bytes(cfg, 128, 1, checkpointing=True) < one


def test_largest_micro_batch_fits_and_one_more_does_not():
    cfg, engine = cfg_of(SHAPES[1]), EngineConfig(zero_stage=2, precision="bf16")
    gpu = 64 * 2 ** 20
    b = largest_micro_batch(cfg, engine, world=2, seq_len=256, gpu_bytes=gpu, overhead=0.0)
    assert b >= 1
    assert memory_per_gpu(cfg, engine, world=2, seq_len=256, micro_batch=b).total <= gpu
    assert memory_per_gpu(cfg, engine, world=2, seq_len=256, micro_batch=b + 1).total > gpu


def test_step_time_is_flops_over_the_gangs_throughput():
    cfg = cfg_of(SHAPES[0])
    t = step_seconds(cfg, seq_len=64, tokens_per_step=1000, world=4, peak_flops=1e12, mfu=0.5)
    assert t == pytest.approx(flops_per_token(cfg, 64) * 1000 / (4 * 1e12 * 0.5))
    assert GiB == 1073741824
