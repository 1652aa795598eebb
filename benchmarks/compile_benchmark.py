"""`pipe.compile()` (torch.compile of the UNet) against the eager UNet: compile time and steady-state step time.

    .venv/bin/python benchmarks/compile_benchmark.py --size 256          # CPU, official-size random weights

One process: the eager UNet step in exact mode (diffusers' kernels) and with the fast kernels (the default), then
`pipe.compile()`: the first call (tracing + inductor's code generation + C++ compilation) and the steady state. One UNet
call with guidance (batch 2) at the given image size, the median of `--runs` calls after one warm-up; the compiled
output is compared with the exact one (max abs difference).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("MINIDEPTH_TEST_CACHE", str(REPO / ".cache" / "minidepth-test"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=256, help="image side (the latents are size/8)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--checkpoint", type=Path, help="default: the random-weight official-size checkpoint")
    args = p.parse_args(argv)
    import factory
    from minidepth import StableDiffusionDepth2ImgPipeline
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(args.checkpoint or factory.cached_checkpoint("official"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, args.size // 8, args.size // 8, generator=g)
    context = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)

    def step():
        with torch.no_grad(), pipe._running(pipe.unet):  # the kernels the pipeline's denoise loop would use
            return pipe.unet(x, 500, context)

    def timed(n):
        times = []
        for _ in range(n):
            start = time.perf_counter()
            out = step()
            times.append(time.perf_counter() - start)
        return statistics.median(times), out

    rows = {}
    for label, exact in (("eager, exact kernels", True), ("eager, fast kernels (default)", False)):
        pipe.set_exact(exact)
        step()
        rows[label], out = timed(args.runs)
        if exact:
            reference = out
    pipe.set_exact(False)
    pipe.compile()
    start = time.perf_counter()
    step()
    compile_s = time.perf_counter() - start
    rows["pipe.compile()"], out = timed(args.runs)
    print(f"### UNet step, {args.size}x{args.size} (batch 2), cpu fp32, {torch.get_num_threads()} threads; "
          f"median of {args.runs}\n\n| | s / step | speed vs exact (above 1 = faster) |\n|---|---|---|")
    for label, t in rows.items():
        print(f"| {label} | {t:.3f} | {rows['eager, exact kernels'] / t:.2f}x |")
    print(f"\nFirst compiled call (compiling): {compile_s:.1f} s; compiled vs exact output: max abs difference "
          f"{(out - reference).abs().max().item():.2e} (output max {reference.abs().max().item():.2f}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
