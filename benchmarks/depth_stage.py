"""The depth estimate inside the pipeline, minidepth against diffusers: `prepare_depth_map` alone, alternating.

    python benchmarks/depth_stage.py --sizes 256 512 --runs 6

Both pipelines are loaded in one process (diffusers' copies its weights into memory, ~5.5 GB; ours are memory-mapped
and only the depth model's are read) and called in turn (A B, B A, ...) on the same synthetic photo: DPT
preprocessing, the DPT-Hybrid model, the bicubic resize to the latents and the normalisation to [-1, 1], for one image
with classifier-free guidance, as `pipe(...)` calls it. One warm-up call each; medians; the largest difference of the
two depth channels. Without `--checkpoint` it uses the random-weight official-size checkpoint (tests/factory.py).
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
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]
os.environ.setdefault("MINIDEPTH_TEST_CACHE", str(REPO / ".cache" / "minidepth-test"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="photo sides")
    p.add_argument("--runs", type=int, default=6)
    p.add_argument("--checkpoint", type=Path, help="checkpoint folder (default: the random-weight official-size one)")
    args = p.parse_args(argv)
    import diffusers
    from benchmark import photo
    from peer_benchmark import cpu_name

    from minidepth import StableDiffusionDepth2ImgPipeline
    if args.checkpoint is None:
        import factory
        args.checkpoint = factory.cached_checkpoint("official")
    diffusers.utils.logging.disable_progress_bar()
    ours = StableDiffusionDepth2ImgPipeline.from_pretrained(args.checkpoint)
    ref = diffusers.StableDiffusionDepth2ImgPipeline.from_pretrained(args.checkpoint)
    print(f"CPU: {cpu_name()}; median of {args.runs} calls each, seconds", flush=True)
    for size in args.sizes:
        image = photo(size)
        calls = {"minidepth": lambda: ours.prepare_depth_map(image, None, 1, True, torch.float32),
                 "diffusers": lambda: ref.prepare_depth_map(image, None, 1, True, torch.float32, torch.device("cpu"))}
        out = {name: call() for name, call in calls.items()}  # warm-up
        times = {name: [] for name in calls}
        for r in range(args.runs):
            for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
                start = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - start)
        ours_s, ref_s = (statistics.median(times[name]) for name in calls)
        diff = (out["minidepth"] - out["diffusers"]).abs().max().item()
        print(f"{size}x{size} photo: minidepth {ours_s:.3f} s, diffusers {ref_s:.3f} s, ratio {ours_s / ref_s:.2f}; "
              f"max |depth difference| {diff:.1e} (of [-1, 1])", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
