"""The CUDA paths on a real GPU: bf16 numerics, MoE dispatch, generation, and the DeepSpeed
engine and pretrain loop over NCCL (a group of one, in this process).

Every test is skipped where torch sees no CUDA GPU, as on CI; on a GPU machine:

    python -m pytest -q tests/training/test_cuda.py -rs

Tiny models; references are the same weights in fp32 (on the CPU, or a per-token loop), with
tolerances for bf16 (relative error ~3e-3 on logits, measured with CPU autocast).
"""
import copy
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.pretrain_corpus import write_corpus, write_tokenizer
from tests.training.test_engine import TINY, batches, paths, run_cfg
from tests.training.test_generate import PROMPTS
from tests.training.test_model import naive_moe, tiny_cfg
from training import checkpoint as ckpt
from training.config import EngineConfig, OptimizerConfig
from training.engine import Engine, collective_device, ensure_process_group
from training.generate import generate
from training.model import KVCache, MoE, ModelConfig, Transformer, rope_cos_sin
from training.moe_kernels import grouped_mm
from training.pretrain import Hooks, pretrain

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref||, in fp32 on the CPU."""
    got, ref = got.detach().float().cpu(), ref.detach().float().cpu()
    return float((got - ref).norm() / ref.norm())


def flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.float().cpu().flatten() for p in model.parameters()])


def decisive_routers(model: Transformer, std: float = 1.0) -> None:
    # large router weights: the top-k choice never hinges on a near-tie that bf16 could flip
    with torch.no_grad():
        for moe in model.moe_layers().values():
            moe.router.weight.normal_(std=std)


# ----------------------------------------------------------------------------- the model in bf16


def test_bf16_autocast_forward_backward_matches_fp32_cpu():
    torch.manual_seed(0)
    ref = Transformer(tiny_cfg(vocab_size=128, d_model=64, dense_hidden=128, expert_hidden=64))
    decisive_routers(ref)
    fast = copy.deepcopy(ref).to(CUDA)
    idx = torch.randint(0, 128, (4, 32))
    out = ref(idx, idx)
    (out.loss + out.aux_loss).backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = fast(idx.to(CUDA), idx.to(CUDA))
    (got.loss + got.aux_loss).backward()
    assert got.logits.dtype == torch.bfloat16 and got.loss.dtype == torch.float32
    assert got.loss.item() == pytest.approx(out.loss.item(), rel=1e-3)
    assert got.aux_loss.item() == pytest.approx(out.aux_loss.item(), rel=1e-2)
    assert rel_err(got.logits, out.logits) < 1e-2
    assert all(p.grad.dtype == torch.float32 for p in fast.parameters())  # fp32 master weights
    assert rel_err(flat_grads(fast), flat_grads(ref)) < 2e-2


def test_grouped_mm_runs_in_bf16_under_cuda_autocast():
    x = torch.randn(64, 32, device=CUDA, requires_grad=True)
    w = torch.randn(4, 32, 16, device=CUDA, requires_grad=True)
    sizes = [20, 0, 30, 14]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = grouped_mm(x, w, sizes)
    assert y.dtype == torch.bfloat16
    ref = torch.cat([x[:20] @ w[0], x[20:50] @ w[2], x[50:] @ w[3]])
    assert rel_err(y, ref) < 1e-2
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and (w.grad[1] == 0).all()


def test_balancing_state_stays_fp32_in_a_bf16_model_on_cuda():
    model = Transformer(tiny_cfg(balance="bias", bias_update_rate=1e-3)).to(CUDA).bfloat16().train()
    moe = model.moe_layers()[1]
    assert moe.w_gate.dtype == torch.bfloat16 and moe.w_gate.device.type == "cuda"
    assert moe.expert_bias.dtype == torch.float32 and moe.expert_bias.device.type == "cuda"
    for _ in range(7):
        model(torch.randint(0, 97, (2, 8), device=CUDA))
        assert moe.load_since_update.dtype == torch.long and moe.load_since_update.sum() == 2 * 8 * 2
        model.update_router_bias()
    # seven +-1e-3 steps are exact multiples of the rate in fp32; bf16 would round 0.003 to 0.0030060
    steps = moe.expert_bias / 1e-3
    assert torch.allclose(steps, steps.round(), atol=1e-4) and moe.expert_bias.abs().max() > 0


def test_rope_frequencies_stay_fp32_for_bf16_activations():
    cfg = ModelConfig.from_preset("moe-1b")  # theta 5e5 over 4096 positions: bf16 frequencies would be far off
    pos_BT = torch.arange(cfg.max_seq_len, device=CUDA)[None]
    cos, sin = rope_cos_sin(pos_BT, cfg, torch.bfloat16)
    assert cos.dtype == sin.dtype == torch.bfloat16
    dims = torch.arange(0, cfg.head_dim, 2, dtype=torch.float64)
    angle = torch.arange(cfg.max_seq_len, dtype=torch.float64)[:, None] / cfg.rope_theta ** (dims / cfg.head_dim)
    angle = torch.cat((angle, angle), dim=-1)
    # bf16 rounding of a value in [-1, 1] is <= 2^-9; fp32 angles near 4096 rad add ~5e-4
    assert (cos[0].double().cpu() - angle.cos()).abs().max() < 4e-3
    assert (sin[0].double().cpu() - angle.sin()).abs().max() < 4e-3


# ----------------------------------------------------------------------------- MoE dispatch


def moe_on_cuda(**kw) -> MoE:
    torch.manual_seed(0)
    moe = MoE(tiny_cfg(n_shared_experts=0, router_temperature=0.5, balance="bias", **kw))
    for p in (moe.w_gate, moe.w_up, moe.w_down):
        torch.nn.init.normal_(p, std=0.3)
    torch.nn.init.normal_(moe.router.weight, std=1.0)
    moe.expert_bias[3] = -10.0  # selection only: expert 3 never gets a token, so one segment is empty
    return moe.to(CUDA)


def test_dispatch_equals_a_per_token_loop_on_cuda():
    moe = moe_on_cuda()
    x = torch.randn(2, 9, 32, device=CUDA, requires_grad=True)
    y, _ = moe(x)
    assert moe.last_load[3] == 0 and moe.last_load.sum() == 2 * 9 * 2
    grads = torch.autograd.grad(y.square().sum(), [x, moe.w_gate, moe.w_up, moe.w_down, moe.router.weight])
    ref = naive_moe(moe, x.reshape(-1, 32))
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, moe.w_gate, moe.w_up, moe.w_down, moe.router.weight])
    torch.testing.assert_close(y.reshape(-1, 32), ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (grads[1][3] == 0).all()  # the empty expert's weight gradient is written, as zeros


def test_bf16_dispatch_equals_an_fp32_loop_on_the_same_routing():
    moe = moe_on_cuda().bfloat16()
    x_ND = torch.randn(64, 32, device=CUDA).bfloat16()
    idx_NK, gates_NK = routing(moe, x_ND)
    y_ND = moe.dispatch(x_ND, idx_NK, gates_NK, torch.bincount(idx_NK.flatten(), minlength=4))
    w = {name: getattr(moe, name).float() for name in ("w_gate", "w_up", "w_down")}  # the same bf16 values
    rows = []
    for x_D, experts, gates in zip(x_ND.float(), idx_NK.tolist(), gates_NK.float()):
        outs = [(F.silu(x_D @ w["w_gate"][e]) * (x_D @ w["w_up"][e])) @ w["w_down"][e] for e in experts]
        rows.append(sum(g * o for g, o in zip(gates, outs)))
    assert y_ND.dtype == torch.bfloat16
    assert rel_err(y_ND, torch.stack(rows)) < 1e-2


hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                            reason="torch._grouped_mm's bf16 kernel needs a Hopper GPU")


@hopper
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "bf16-weights"])
def test_fused_expert_kernel_equals_the_loop(autocast):
    """expert_kernel=auto (one torch._grouped_mm per projection, no host sync) against the per-expert
    loop on the same weights and tokens, one expert empty: outputs and every gradient."""
    fused = moe_on_cuda()
    loop = MoE(fused.cfg.model_copy(update={"expert_kernel": "loop"})).to(CUDA)
    loop.load_state_dict(fused.state_dict())
    if not autocast:
        fused, loop = fused.bfloat16(), loop.bfloat16()
    x = torch.randn(4, 33, 32, device=CUDA, requires_grad=True)
    results = []
    for moe in (fused, loop):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y, _ = moe(x.to(moe.w_gate.dtype) if not autocast else x)
        params = [moe.w_gate, moe.w_up, moe.w_down, moe.router.weight]
        results.append((y, torch.autograd.grad(y.float().square().sum(), [x, *params])))
    (y_fused, g_fused), (y_loop, g_loop) = results
    assert fused.last_load[3] == 0 and y_fused.dtype == y_loop.dtype
    assert rel_err(y_fused, y_loop) < 1e-2
    for got, want in zip(g_fused, g_loop):
        assert got.dtype == want.dtype and rel_err(got, want) < 2e-2
    assert (g_fused[1][3] == 0).all()  # the empty expert's weight gradient is zeros


@hopper
def test_the_fused_path_makes_no_host_sync():
    """With the fused kernel a MoE layer's forward and backward queue without waiting for the GPU."""
    moe = moe_on_cuda().bfloat16()
    x = torch.randn(4, 33, 32, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    moe(x)[0].sum().backward()  # warm-up: first calls may sync while loading kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, _ = moe(x)
        y.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def routing(moe: MoE, x_ND: torch.Tensor):
    probs_NE = (moe.router(x_ND) / moe.cfg.router_temperature).float().softmax(-1)
    idx_NK, gates_NK = moe.route(probs_NE)
    return idx_NK, gates_NK.to(x_ND.dtype)


# ----------------------------------------------------------------------------- generation


def generation_model() -> Transformer:
    torch.manual_seed(0)
    # test_generate.py's model: a large init_std gives peaked logits, so greedy never hinges on a near-tie
    return Transformer(ModelConfig(vocab_size=101, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                                   n_dense_layers=1, dense_hidden=48, n_experts=4, top_k=2, expert_hidden=16,
                                   n_shared_experts=1, init_std=0.2))


def test_greedy_with_cache_equals_without_and_the_cpu_on_cuda():
    model = generation_model()
    on_cpu = generate(model, PROMPTS, max_new_tokens=24).tokens
    model = model.to(CUDA)
    cached = generate(model, PROMPTS, max_new_tokens=24, use_cache=True)
    plain = generate(model, PROMPTS, max_new_tokens=24, use_cache=False)
    assert cached.tokens.device.type == "cuda"
    assert torch.equal(cached.tokens, plain.tokens)
    assert torch.equal(cached.tokens.cpu(), on_cpu)


def test_bf16_kv_cache_decoding_matches_a_full_forward():
    model = generation_model().to(CUDA).bfloat16().eval()
    idx_BT = torch.randint(0, 101, (3, 40), device=CUDA)
    with torch.no_grad():
        full = model(idx_BT).logits
        cache = KVCache(model.cfg, 3, 40, CUDA, torch.bfloat16)
        steps = [model(idx_BT[:, :16], cache=cache).logits]  # a prefill, then one token at a time
        steps += [model(idx_BT[:, t:t + 1], cache=cache).logits for t in range(16, 40)]
    assert cache.k.dtype == torch.bfloat16 and cache.length == 40
    assert rel_err(torch.cat(steps, dim=1), full) < 2e-2


# ----------------------------------------------------------------------------- the engine over NCCL


def test_collectives_take_cuda_tensors_under_nccl():
    ensure_process_group()
    assert dist.get_backend() == "nccl"
    t = torch.ones(3, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    assert t.device.type == "cuda" and t.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(RuntimeError):  # why the loop's sums go through collective_device()
        dist.all_reduce(torch.ones(3, dtype=torch.float64))


def cuda_engine(zero_stage: int, **kw) -> Engine:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=128, balance="bias", **TINY))
    cfg = EngineConfig(zero_stage=zero_stage, precision="bf16", optimizer=OptimizerConfig(lr=1e-2, warmup_steps=0),
                       **kw)
    return Engine(model, cfg, micro_batch=2, global_batch=4, total_steps=20)


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_engine_trains_in_bf16_over_nccl(zero_stage):
    engine = cuda_engine(zero_stage)
    assert dist.get_backend() == "nccl" and engine.device.type == "cuda"
    moe = engine.module.moe_layers()[1]
    assert moe.w_gate.dtype == torch.bfloat16 and moe.expert_bias.dtype == torch.float32
    losses = []
    for _ in range(8):  # the same batch every step: the loss must fall
        result = engine.train_step(batches(0))
        assert not result.skipped and 0 < result.grad_norm < float("inf")
        engine.module.update_router_bias()
        losses.append(result.loss)
    assert losses[-1] < losses[0] - 1.0 and losses == sorted(losses, reverse=True)
    assert moe.expert_bias.dtype == torch.float32 and moe.expert_bias.abs().max() > 0
    weights = engine.full_state_dict()
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in weights.values())


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_engine_checkpoint_resumes_with_the_same_next_loss(tmp_path, zero_stage):
    a = cuda_engine(zero_stage)
    for s in range(2):
        a.train_step(batches(s))
    a.save(tmp_path / "ck")
    expected = [a.train_step(batches(s)).loss for s in (2, 3)]
    b = cuda_engine(zero_stage)
    b.load(tmp_path / "ck")
    got = [b.train_step(batches(s)).loss for s in (2, 3)]
    assert got[0] == expected[0]  # the restored bf16 weights give the same forward, bit for bit
    assert got[1] == pytest.approx(expected[1], rel=1e-3)  # after a backward whose kernels may use atomics


def test_fused_adamw_is_the_default_on_cuda():
    assert cuda_engine(1).ds.optimizer.param_groups[0]["fused"] is True


@pytest.mark.parametrize("mode", ["dense", "blocks"])
def test_compiled_engine_matches_eager_within_bf16_tolerance(mode):
    eager, compiled = cuda_engine(1), cuda_engine(1, compile=mode)
    expected = [eager.train_step(batches(s)).loss for s in range(4)]
    got = [compiled.train_step(batches(s)).loss for s in range(4)]
    assert got == pytest.approx(expected, rel=2e-2)  # the bf16 tolerance of the engine's variants (CPU tests)


@pytest.mark.parametrize("mode", ["dense", "blocks"])
def test_compiled_engine_resumes_bitwise(tmp_path, mode):
    a = cuda_engine(1, compile=mode)
    for s in range(2):
        a.train_step(batches(s))
    a.save(tmp_path / "ck")
    expected = [a.train_step(batches(s)).loss for s in (2, 3)]
    b = cuda_engine(1, compile=mode)
    b.load(tmp_path / "ck")
    got = [b.train_step(batches(s)).loss for s in (2, 3)]
    assert got[0] == expected[0]  # the same compiled kernels on the restored weights
    assert got[1] == pytest.approx(expected[1], rel=1e-3)  # after a backward whose kernels may use atomics


# ----------------------------------------------------------------------------- the pretrain loop


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_cuda")
    files = write_corpus(root, n_docs=120)
    write_tokenizer(root / "tok", files, vocab_size=300)
    return root, files


def test_pretrain_in_bf16_on_cuda_resumes_from_a_checkpoint(corpus):
    p = paths(corpus, "cuda")
    cfg = run_cfg(engine={"zero_stage": 2, "precision": "bf16"})
    rows = []
    full = pretrain(cfg, p, seed=0, hooks=Hooks(on_metrics=lambda m, s: rows.append(m)))
    assert full["steps"] == 8 and full["val/loss"] < rows[3]["val/loss"]
    assert (p.out / "model" / "model.safetensors").is_file()
    assert "cuda" in ckpt.read_rng(p.checkpoints / "step_00000004", 0)  # the CUDA RNG state is saved
    shutil.rmtree(p.checkpoints / "step_00000008")
    shutil.rmtree(p.out)
    again = []
    summary = pretrain(cfg, p, seed=0, hooks=Hooks(on_metrics=lambda m, s: again.append(m)))
    assert summary["resumed_from_step"] == 4
    assert again[0]["loss"] == rows[4]["loss"]
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in rows[4:]], rel=1e-3)


def test_evaluation_samples_pass_at_k_on_the_gpu(reasoner):
    """pass@k draws with a generator on the model's device; greedy figures equal the CPU's."""
    from rl.config import EvalConfig
    from rl.eval import evaluate, load_tasks
    from training.export import load_model
    from training.tokenizer import load_tokenizer
    tasks = load_tasks(reasoner.eval_dir)[:8]
    cfg = EvalConfig(max_new_tokens=24, pass_at_k={"k": 2, "tasks": 4})
    tok = load_tokenizer(reasoner.model)
    on_gpu, records = evaluate(load_model(reasoner.model).to(CUDA), tok, tasks, cfg, seed=0)
    on_cpu, _ = evaluate(load_model(reasoner.model), tok, tasks, cfg, seed=0)
    assert on_gpu["eval/pass_at_k_tasks"] == 4 and 0 <= on_gpu["eval/pass@2"] <= 1
    assert on_gpu["eval/accuracy"] == on_cpu["eval/accuracy"] and on_gpu["eval/format_rate"] == on_cpu["eval/format_rate"]


def test_sft_with_packed_rows_trains_on_cuda(reasoner, tmp_path):
    from training.config import SftConfig
    from training.sft import SftPaths, sft
    cfg = SftConfig.model_validate({"steps": 4, "eval_every": 4, "checkpoint": {"every": 4, "keep": 1},
                                    "engine": {"zero_stage": 1, "precision": "bf16"},
                                    "data": {"seq_len": 64, "micro_batch": 4, "global_batch": 4, "val_max_examples": 4}})
    paths = SftPaths(sorted(reasoner.train_dir.glob("*.parquet")), sorted(reasoner.eval_dir.glob("*.parquet")),
                     reasoner.root / "init", tmp_path / "work", tmp_path / "ckpt", tmp_path / "out")
    summary = sft(cfg, paths, seed=0)
    assert summary["steps"] == 4 and summary["nonfinite_steps"] == 0 and summary["val/loss"] == summary["val/loss"]
