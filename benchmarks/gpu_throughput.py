"""Training throughput and MFU on one GPU, bf16: a bare torch loop against our DeepSpeed Engine.

For each preset of training/model.py that fits one 80 GB GPU (`small`, and `moe-1b`, the
cluster preset: 2.3B parameters, 0.82B active; no larger model is defined here), three cases
train the same model on the same random token batches:
  bare   fp32 weights, torch.autocast(bf16), torch.optim.AdamW over the engine's parameter
         groups, the same accumulation and global-norm clipping (1.0);
  zero1  training.engine.Engine, DeepSpeed ZeRO-1, bf16, a NCCL group of one;
  zero2  the same with ZeRO-2 (the GPU default).
Each case runs in its own process: a 2.3B-parameter engine does not reliably give its memory
back in-process. Warm-up steps are excluded; steps are timed with CUDA events.

MFU = FLOPs per token x tokens/s / peak. FLOPs per token is the project's flops_per_token (the
pretrain stage's MFU): 6 x active non-embedding parameters (lm_head included) + 12 x L x D x T
for attention scores and values, causal masking not halved; a 6N-only figure (6 x all active
parameters, embedding included) is in the JSON too. The peak is both the H100 SXM spec for dense
bf16 (989.4 TFLOP/s) and a bf16 8192^3 matmul measured in the same run, before and after the cases.

    python3 benchmarks/gpu_throughput.py --out benchmarks/out/gpu_throughput.json       # one GPU, ~4 min
    python3 benchmarks/gpu_throughput.py --presets small --cases bare zero2 --steps 10   # a subset
    python3 benchmarks/gpu_throughput.py --shape moe-1b=2048,4,2 --profile --out ...     # other shape, profiled
    python3 benchmarks/gpu_throughput.py --compile dense --out ...   # torch.compile of the dense parts, both
    python3 benchmarks/gpu_throughput.py --fused off --out ...       # foreach AdamW (the figures before fused)

--compile and --fused apply to the bare loop and the engine alike, so each change is measured on
its own against the same loop; AdamW is fused on CUDA by default (--fused auto), as in the engine.
    .venv/bin/python benchmarks/gpu_throughput.py --device cpu --presets tiny --steps 2 --warmup 1 \\
        --matmul-n 512 --out /tmp/smoke.json                                              # plumbing check
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.compile import compile_model  # noqa: E402
from training.model import ModelConfig, Transformer, flops_per_token, param_counts  # noqa: E402

SPEC_PEAK = 989.4e12  # H100 SXM, dense bf16 (NVIDIA datasheet; 1979 is with 2:4 sparsity)
# sequence length, sequences per micro-batch, micro-batches per step: ~16-32k tokens a step,
# activations sized so that ZeRO-2's extra gradient buffers still fit 80 GB for moe-1b
SHAPES = {"tiny": (128, 4, 2), "small": (1024, 16, 2), "moe-1b": (2048, 2, 4)}
# host-side calls counted by --profile: syncs (a .item() / .tolist() waits for the GPU) and launches
HOST_CALLS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync",
              "cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")


# ----------------------------------------------------------------------------- timing


class StepTimer:
    """CUDA events around each step (read after one final sync); a host clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def matmul_peak(device: torch.device, n: int, reps: int = 20) -> float:
    """FLOP/s of an n^3 matmul on random data (bf16 on a GPU, fp32 on the CPU), median rep."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(5):
        a @ b
    timer = StepTimer(device)
    timer.mark()
    for _ in range(reps):
        a @ b
        timer.mark()
    return 2 * n ** 3 / statistics.median(timer.seconds())


def profile_steps(step, batches: list, n: int = 2) -> dict:
    """Where a step's time goes (torch.profiler, CUDA): GPU busy fraction, host syncs, top kernels.

    The profiler adds host overhead, so the wall time here is longer than the timed steps'.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for i in range(n):
            step(batches[i % len(batches)])
        sync()
    wall_us = (time.perf_counter() - start) * 1e6
    kernels: dict[str, list[float]] = {}
    host: dict[str, int] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            kernels.setdefault(e.name, []).append(e.time_range.elapsed_us())
        elif e.name in HOST_CALLS:
            host[e.name] = host.get(e.name, 0) + 1
    busy = sum(sum(v) for v in kernels.values()) or 1e-9
    top = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:12]
    return {"steps": n, "wall_ms_per_step": wall_us / n / 1e3, "gpu_busy_fraction": busy / wall_us,
            "kernels_per_step": sum(len(v) for v in kernels.values()) / n,
            "host_calls_per_step": {k: v / n for k, v in host.items()},
            "top_kernels": [{"name": k[:90], "ms_per_step": sum(v) / n / 1e3, "share_of_gpu": sum(v) / busy,
                             "calls_per_step": len(v) / n} for k, v in top]}


# ----------------------------------------------------------------------------- one case (child process)


def token_batches(cfg: ModelConfig, shape: tuple, device: torch.device, n_steps: int) -> list[list[tuple]]:
    """n_steps global batches of random tokens, as lists of (x, y) micro-batches on the device."""
    seq, micro, gas = shape
    gen = torch.Generator().manual_seed(0)
    steps = []
    for _ in range(n_steps):
        tokens = torch.randint(0, cfg.vocab_size, (gas, micro, seq + 1), generator=gen).to(device)
        steps.append([(t[:, :-1], t[:, 1:]) for t in tokens])
    return steps


def fused_adamw(fused: str, device: torch.device) -> bool | None:
    """--fused: auto (the engine's default: fused on CUDA), on, off."""
    return {"auto": device.type == "cuda", "on": True, "off": False}[fused] or None


def bare_step_fn(model: Transformer, device: torch.device, gas: int, fused: bool | None):
    from training.engine import _param_groups  # the engine's decay / no-decay split
    opt = torch.optim.AdamW(_param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=fused)

    def step(micro: list[tuple]) -> float:
        total = torch.zeros((), device=device)
        for x, y in micro:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = model(x, y)
            loss = out.loss + out.aux_loss
            (loss / gas).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(total) / gas
    return step


def engine_step_fn(model: Transformer, zero_stage: int, shape: tuple, compile_mode: str, fused: bool | None):
    from training.config import EngineConfig, OptimizerConfig
    from training.engine import Engine
    seq, micro, gas = shape
    cfg = EngineConfig(zero_stage=zero_stage, precision="bf16", grad_clip=1.0, compile=compile_mode,
                       optimizer=OptimizerConfig(lr=1e-4, warmup_steps=0, fused=bool(fused)))
    engine = Engine(model, cfg, micro_batch=micro, global_batch=micro * gas, total_steps=10_000)
    return lambda batch: engine.train_step(batch).loss


def run_case(args) -> dict:
    device = torch.device(args.device)
    cfg = ModelConfig.from_preset(args.preset, expert_kernel=args.expert_kernel)
    shape = SHAPES[args.preset]
    torch.manual_seed(0)
    with device:  # initialise on the device: seconds instead of minutes for 2.3B parameters
        model = Transformer(cfg)
    fused = fused_adamw(args.fused, device)
    if args.case == "bare":
        compile_model(model, args.compile)  # the same modules the engine compiles
        step = bare_step_fn(model, device, shape[2], fused)
    else:
        step = engine_step_fn(model, int(args.case[-1]), shape, args.compile, fused)
    batches = token_batches(cfg, shape, device, 4)
    losses = [step(batches[i % 4]) for i in range(args.warmup)]
    timer = StepTimer(device)
    timer.mark()
    for i in range(args.steps):
        losses.append(step(batches[i % 4]))
        timer.mark()
    seconds = timer.seconds()
    tokens = shape[0] * shape[1] * shape[2]
    profiled = profile_steps(step, batches) if args.profile else None
    return {"preset": args.preset, "case": args.case, "seq_len": shape[0], "micro_batch": shape[1],
            "accumulation": shape[2], "tokens_per_step": tokens, "timed_steps": args.steps,
            "warmup_steps": args.warmup, "step_seconds": seconds,
            "tokens_per_s": tokens * len(seconds) / sum(seconds),
            "tokens_per_s_median_step": tokens / statistics.median(seconds),
            "loss_first": losses[0], "loss_last": losses[-1],
            "max_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None,
            "profile": profiled}


# ----------------------------------------------------------------------------- the parent


def spawn_case(args, preset: str, case: str) -> dict:
    """One case in a fresh process; a failure (out of memory, say) is recorded, not raised."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "case.json"
        cmd = [sys.executable, __file__, "--child", "--preset", preset, "--case", case, "--device", args.device,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(out),
               "--expert-kernel", args.expert_kernel, "--compile", args.compile, "--fused", args.fused]
        cmd += ["--profile"] if args.profile else []
        cmd += [a for spec in args.shape for a in ("--shape", spec)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout)
        wall = time.perf_counter() - start
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stdout + proc.stderr)[-3000:]
            print(f"  {preset}/{case} FAILED (rc {proc.returncode}):\n{tail}", flush=True)
            return {"preset": preset, "case": case, "error": tail, "process_seconds": wall}
        result = json.loads(out.read_text())
        result["process_seconds"] = wall
        return result


def add_mfu(result: dict, peaks: dict) -> None:
    cfg = ModelConfig.from_preset(result["preset"])
    fpt = flops_per_token(cfg, result["seq_len"])
    fpt_6n = 6 * param_counts(cfg)["active"]
    result["flops_per_token"], result["flops_per_token_6n"] = fpt, fpt_6n
    for name, peak in peaks.items():
        result[f"mfu_vs_{name}"] = fpt * result["tokens_per_s"] / peak
        result[f"mfu_6n_vs_{name}"] = fpt_6n * result["tokens_per_s"] / peak


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        query = "driver_version,clocks.max.sm,power.limit"
        smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True)
        env["nvidia_smi"] = smi.stdout.strip()
    try:
        import deepspeed
        env["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    return env


def table(results: list[dict]) -> str:
    lines = ["preset  case   tokens/s   vs bare  MFU(spec)  MFU(matmul)  GiB   loss first->last"]
    bare = {r["preset"]: r["tokens_per_s"] for r in results if r["case"] == "bare" and "error" not in r}
    for r in results:
        if "error" in r:
            lines.append(f"{r['preset']:<7} {r['case']:<6} failed")
            continue
        ratio = r["tokens_per_s"] / bare[r["preset"]] if r["preset"] in bare else float("nan")
        r["vs_bare"] = ratio
        lines.append(f"{r['preset']:<7} {r['case']:<6} {r['tokens_per_s']:>9,.0f}  {ratio:>6.3f}  "
                     f"{r['mfu_vs_spec']:>8.3f}  {r['mfu_vs_matmul']:>10.3f}  {r['max_memory_gib'] or 0:>5.1f}  "
                     f"{r['loss_first']:.3f}->{r['loss_last']:.3f}")
    return "\n".join(lines)


def profile_table(r: dict) -> str:
    p = r["profile"]
    lines = [f"{r['preset']}/{r['case']} profiled: {p['wall_ms_per_step']:.0f} ms/step, GPU busy "
             f"{p['gpu_busy_fraction']:.2f}, {p['kernels_per_step']:.0f} kernels/step, host {p['host_calls_per_step']}"]
    lines += [f"  {k['share_of_gpu']:>5.1%} {k['ms_per_step']:>7.1f} ms {k['calls_per_step']:>6.0f}x  {k['name']}"
              for k in p["top_kernels"]]
    return "\n".join(lines)


def run_all(args) -> dict:
    device = torch.device(args.device)
    peak_before = matmul_peak(device, args.matmul_n)
    print(f"matmul {args.matmul_n}^3: {peak_before / 1e12:.1f} TFLOP/s", flush=True)
    results = []
    for preset in args.presets:
        for case in args.cases:
            results.append(spawn_case(args, preset, case))
            r = results[-1]
            print(f"- {preset}/{case}: {r.get('tokens_per_s', 0):,.0f} tokens/s, {r['process_seconds']:.0f} s",
                  flush=True)
            Path(args.out).write_text(json.dumps({"partial": True, "matmul_before": peak_before, "results": results}))
    peak_after = matmul_peak(device, args.matmul_n)
    peaks = {"spec": SPEC_PEAK, "matmul": max(peak_before, peak_after)}
    for r in results:
        if "error" not in r:
            add_mfu(r, peaks)
    print(table(results), flush=True)
    for r in results:
        if r.get("profile"):
            print(profile_table(r), flush=True)
    return {"environment": environment(device), "expert_kernel": args.expert_kernel, "compile": args.compile,
            "fused_adamw": args.fused, "peaks": {**peaks, "matmul_before": peak_before,
            "matmul_after": peak_after, "matmul_n": args.matmul_n},
            "presets": {p: {**param_counts(ModelConfig.from_preset(p)), "shape": SHAPES[p]} for p in args.presets},
            "note": "presets of training/model.py only; moe-1b is the largest defined and fits one 80 GB GPU",
            "results": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON results")
    ap.add_argument("--presets", nargs="+", default=["small", "moe-1b"], choices=sorted(SHAPES))
    ap.add_argument("--cases", nargs="+", default=["bare", "zero1", "zero2"], choices=["bare", "zero1", "zero2"])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per case")
    ap.add_argument("--expert-kernel", default="auto", choices=["auto", "loop"],
                    help="ModelConfig.expert_kernel: auto = torch._grouped_mm on Hopper, loop = per expert")
    ap.add_argument("--compile", default="off", choices=["off", "dense", "blocks"],
                    help="EngineConfig.compile, for the engine and the bare loop alike")
    ap.add_argument("--fused", default="auto", choices=["auto", "on", "off"],
                    help="fused AdamW for both (auto: on CUDA, the engine's default)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--matmul-n", type=int, default=8192)
    ap.add_argument("--case-timeout", type=float, default=400)
    ap.add_argument("--profile", action="store_true", help="also profile 2 steps per case (CUDA)")
    ap.add_argument("--shape", action="append", default=[], metavar="PRESET=SEQ,MICRO,ACCUM",
                    help="override a preset's sequence length, micro-batch and accumulation steps")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    for spec in args.shape:
        preset, _, numbers = spec.partition("=")
        SHAPES[preset] = tuple(int(n) for n in numbers.split(","))
    if args.child:
        Path(args.out).write_text(json.dumps(run_case(args)))
        os._exit(0)  # skip torch/gloo teardown at exit (NOTES.md): the result is written
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    report = run_all(args)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
