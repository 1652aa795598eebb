"""Where one UNet step's time goes on the CPU (and the DPT's): torch.profiler, grouped by what the operators do.

    python benchmarks/profile_unet.py --sizes 256 512          # the UNet at batch 2, then the DPT at 384x384

Official-size networks with random weights (the cost does not depend on the values), fp32, run as the pipeline runs
them by default (inside `fast_kernels()`, transforms kept) after one warm-up call; `--exact` profiles PyTorch's default
kernels instead. Each operator's self CPU time goes to one group:

    matmul / conv     linear, matrix products, convolutions (oneDNN, NNPACK, im2col)    achieved GFLOP/s from the
                                                                                        profiler's FLOP counts
    attention         scaled_dot_product_attention and its kernels                     GFLOP/s likewise
    normalisation     group_norm, layer_norm                                            GB/s: bytes read + written
    activations       silu, gelu (GEGLU)                                                 (estimated from the shapes)
    residual adds     add, add_
    layout            copies, cat, contiguous, channels-last conversions, unfold
    other             the rest (timestep embedding, views' bookkeeping, ...)

NNPACK's convolutions run on a thread the fast-kernel block owns; the time the calling thread waits for them (wall time
of the call minus the caller's own operators) is added to matmul / conv. GFLOP/s use the standard algorithms' FLOPs
(torch's FLOP counter on PyTorch's default kernels), so folded or Winograd kernels can exceed the machine's peak.
Name the CPU with the numbers (printed first).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from minidepth.fast_kernels import fast_kernels  # noqa: E402
from minidepth.models.dpt import DPTDepthModel  # noqa: E402
from minidepth.models.unet import UNet  # noqa: E402
from peer_benchmark import cpu_name, random_weights  # noqa: E402

GROUPS = {  # checked in this order; an operator's name containing one of the words belongs to the group
    "attention": ("scaled_dot_product", "flash_attention", "softmax", "baddbmm"),
    "normalisation": ("group_norm", "layer_norm"),
    "matmul / conv": ("linear", "addmm", "bmm", "matmul", "conv", "nnpack", "mm"),
    "activations": ("silu", "gelu", "sigmoid", "relu", "mul"),  # mul: GEGLU's gate
    "residual adds": ("add",),
    "layout": ("copy", "contiguous", "clone", "cat", "unfold", "im2col", "to_dense", "permute", "transpose"),
}
FLOP_GROUPS = ("matmul / conv", "attention")


def group_of(name: str) -> str:
    op = name.split("::")[-1].lower()
    return next((group for group, words in GROUPS.items() if any(w in op for w in words)), "other")


def standard_flops(call) -> dict[str, float]:
    """FLOPs of the standard algorithms (torch's FLOP counter, PyTorch's default kernels): attention vs the rest."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with fast_kernels(enabled=False), counter:
        call()
    per_op = counter.get_flop_counts().get("Global", {})
    attention = sum(n for op, n in per_op.items() if "attention" in str(op))
    return {"attention": attention, "matmul / conv": counter.get_total_flops() - attention}


def bytes_moved(event) -> int:
    """Inputs read + one output written, float32, from the recorded shapes (an estimate for memory-bound ops)."""
    shapes = [s for s in (event.input_shapes or []) if isinstance(s, (list, tuple)) and s]
    if not shapes:
        return 0
    numels = [int(torch.tensor(s).prod()) for s in shapes if all(isinstance(d, int) for d in s)]
    return 4 * (sum(numels) + (max(numels) if numels else 0))


@torch.no_grad()
def profile_call(name: str, call, exact: bool, runs: int = 1) -> None:
    flops = standard_flops(call)
    with fast_kernels(enabled=not exact, keep_transforms=True):
        call()  # warm-up (transforms, allocator, oneDNN primitive caches)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            start = time.perf_counter()
            for _ in range(runs):
                call()
            wall = (time.perf_counter() - start) / runs
    ms, moved = defaultdict(float), defaultdict(float)
    for e in prof.key_averages(group_by_input_shape=True):
        g = group_of(e.key)
        ms[g] += e.self_cpu_time_total / 1000 / runs
        if g not in FLOP_GROUPS:
            moved[g] += bytes_moved(e) * e.count / runs
    on_thread = sum(ms.values())
    waited = wall * 1000 - on_thread
    print(f"\n### {name}: {wall:.2f} s per call, {sum(flops.values()) / 1e9:.0f} GFLOP\n")
    print("| group | ms | share | achieved |")
    print("|---|---|---|---|")
    if waited > 0.02 * wall * 1000:
        ms["matmul / conv"] += waited  # NNPACK's convolutions, on the block's own thread
        print(f"(of which {waited:.0f} ms NNPACK convolutions on the fast-kernel block's thread)")
    rows = sorted(ms.items(), key=lambda kv: -kv[1])
    for g, t in rows:
        rate = ""
        if g in FLOP_GROUPS and flops[g]:
            rate = f"{flops[g] / (t / 1000) / 1e9:.0f} GFLOP/s (standard-algorithm FLOPs)"
        elif moved.get(g):
            rate = f"~{moved[g] / (t / 1000) / 1e9:.1f} GB/s"
        print(f"| {g} | {t:.0f} | {t / (wall * 1000):.0%} | {rate} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--exact", action="store_true", help="PyTorch's default kernels (no fast_kernels block)")
    p.add_argument("--runs", type=int, default=1)
    args = p.parse_args(argv)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; {'exact' if args.exact else 'fast'} kernels")
    g = torch.Generator().manual_seed(0)
    unet = random_weights(UNet(), 1)
    for size in args.sizes:
        h = size // 8
        x, ctx = torch.randn(2, 5, h, h, generator=g), torch.randn(2, 77, 1024, generator=g)
        t = torch.tensor([500, 500])
        profile_call(f"UNet step, batch 2, {size}x{size} ({h}x{h} latents)", lambda: unet(x, t, ctx), args.exact,
                     args.runs)
    unet = None  # one big network in memory at a time
    dpt = random_weights(DPTDepthModel(), 2)
    pixels = torch.randn(1, 3, 384, 384, generator=g)
    profile_call("DPT-Hybrid, 384x384", lambda: dpt(pixels), args.exact, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
