"""The kernels behind the MoE layer's expert matmuls (training/model.py's MoE.dispatch).

The MoE layer sorts its (token, expert) assignments by expert, so each expert's rows are one
contiguous segment of x_MI; an expert matmul multiplies segment e by w_EIO[e]. Two kernels:

  loop   grouped_mm: one torch.mm per expert, as an autograd Function that writes the
         weight gradient straight into one (E, I, O) tensor; any device and dtype
  fused  fused_grouped_mm: one torch._grouped_mm over all experts, bf16, on Hopper (9.0+)
         GPUs; the segment ends stay on the GPU, so no host sync

``expert_matmul`` picks one for a layer's forward (``ModelConfig.expert_kernel``: "auto"
takes the fused kernel where it runs, "loop" always the loop). Pure torch.

Shape legend: M (token, expert) assignments, I in features, O out features, E experts.
"""
from __future__ import annotations

from typing import Callable

import torch


class _GroupedMM(torch.autograd.Function):
    """y[segment e] = x[segment e] @ w[e] over consecutive row segments of the given sizes.

    A loop over experts (never over tokens). Written as a Function so the weight gradient is
    computed straight into one (E, I, O) tensor: autograd through w.unbind(0) would build E
    separate gradients and then stack them, a second full-size allocation and copy that cost
    ~10% of the layer's time on CPU.
    """

    @staticmethod
    def forward(ctx, x_MI, w_EIO, sizes):
        ctx.x_dtype, ctx.sizes = x_MI.dtype, sizes
        x_MI = x_MI.to(w_EIO.dtype)  # compute in w's dtype (grouped_mm applies autocast)
        ctx.save_for_backward(x_MI, w_EIO)
        y_MO = x_MI.new_empty(x_MI.shape[0], w_EIO.shape[2])
        for n, x_nI, w_IO, y_nO in zip(sizes, x_MI.split(sizes), w_EIO, y_MO.split(sizes)):
            if n:
                torch.mm(x_nI, w_IO, out=y_nO)
        return y_MO

    @staticmethod
    def backward(ctx, g_MO):
        x_MI, w_EIO = ctx.saved_tensors
        g_MO = g_MO.contiguous().to(w_EIO.dtype)
        gx_MI, gw_EIO = torch.empty_like(x_MI), torch.empty_like(w_EIO)
        rows = zip(ctx.sizes, x_MI.split(ctx.sizes), g_MO.split(ctx.sizes), gx_MI.split(ctx.sizes))
        for (n, x_nI, g_nO, gx_nI), w_IO, gw_IO in zip(rows, w_EIO, gw_EIO):
            if n:
                torch.mm(g_nO, w_IO.t(), out=gx_nI)
                torch.mm(x_nI.t(), g_nO, out=gw_IO)
            else:
                gw_IO.zero_()  # an expert that got no token gets a zero gradient
        return gx_MI.to(ctx.x_dtype), gw_EIO, None


def grouped_mm(x_MI: torch.Tensor, w_EIO: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    device = x_MI.device.type
    if torch.is_autocast_enabled(device):
        # autocast casts F.linear's operands but not a Function's, whose mm(out=) would then run
        # in fp32 on the master weights, off the bf16 tensor-core path: cast as autocast would
        dtype = torch.get_autocast_dtype(device)
        x_MI, w_EIO = x_MI.to(dtype), w_EIO.to(dtype)
    return _GroupedMM.apply(x_MI, w_EIO, sizes)


def _fused_experts_ok(x_MI: torch.Tensor, w_EIO: torch.Tensor) -> bool:
    """torch._grouped_mm's bf16 kernel: CUDA, compute capability 9.0+ (Hopper), bf16 compute,
    and 16-byte aligned rows (dims a multiple of 8)."""
    if not (x_MI.is_cuda and hasattr(torch, "_grouped_mm")):
        return False
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else w_EIO.dtype
    return (dtype == torch.bfloat16 and torch.cuda.get_device_capability(x_MI.device) >= (9, 0)
            and x_MI.shape[1] % 8 == 0 and w_EIO.shape[2] % 8 == 0)


def fused_grouped_mm(x_MI: torch.Tensor, w_EIO: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
    """grouped_mm in one kernel, bf16: segment e is rows [ends[e-1], ends[e]) (int32, on the GPU,
    so no host sync). Its autograd gives the (E, I, O) weight gradient directly."""
    return torch._grouped_mm(x_MI.to(torch.bfloat16), w_EIO.to(torch.bfloat16), offs=ends_E)


def expert_matmul(x_MI: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor,
                  kernel: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """mm(x, w) over the segments of ``counts_E`` rows each, for all of a layer's expert
    weights: w_EIO's widths (D and F of w_gate) are also w_up's and w_down's, so the check
    against one covers all three."""
    if kernel == "auto" and _fused_experts_ok(x_MI, w_EIO):
        ends_E = counts_E.cumsum(0).to(torch.int32)
        return lambda x, w: fused_grouped_mm(x, w, ends_E)
    sizes = counts_E.tolist()  # one host sync per layer, not one per expert
    return lambda x, w: grouped_mm(x, w, sizes)
