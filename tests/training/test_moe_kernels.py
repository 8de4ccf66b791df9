"""The experts' matmul kernels on CPU (the fused Hopper kernel: tests/training/test_cuda.py)."""
import torch

from training.moe_kernels import expert_matmul, grouped_mm


def test_grouped_mm_gradients_with_an_empty_expert():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    sizes = [2, 0, 3]
    assert torch.autograd.gradcheck(lambda a, b: grouped_mm(a, b, sizes), (x, w))
    y = grouped_mm(x, w, sizes)
    torch.testing.assert_close(y, torch.cat([x[:2] @ w[0], x[2:] @ w[2]]))
    y.sum().backward()
    assert (w.grad[1] == 0).all()


def test_grouped_mm_follows_autocast():
    # autocast casts nn.Linear's operands but never a custom Function's: grouped_mm must do it,
    # or the experts run on the fp32 master weights while the rest of the model runs in bf16
    torch.manual_seed(0)
    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(3, 8, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_mm(x, w, [2, 0, 4])
    assert y.dtype == torch.bfloat16
    ref = torch.cat([x[:2] @ w[0], x[2:] @ w[2]])
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=2e-2)
    y.float().sum().backward()
    assert x.grad.dtype == w.grad.dtype == torch.float32 and (w.grad[1] == 0).all()


def test_expert_matmul_takes_the_loop_off_hopper():
    x, w = torch.randn(5, 8), torch.randn(3, 8, 4)
    counts = torch.tensor([2, 0, 3])
    for kernel in ("auto", "loop"):  # auto on CPU: the fused kernel does not run here
        y = expert_matmul(x, w, counts, kernel)(x, w)
        torch.testing.assert_close(y, torch.cat([x[:2] @ w[0], x[2:] @ w[2]]))
