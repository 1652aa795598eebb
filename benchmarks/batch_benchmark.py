"""`minidepth batch` throughput: images per minute for one process, grouped UNet batches, and torchrun processes.

    .venv/bin/python benchmarks/batch_benchmark.py                       # official size, 8 jobs at 256x256, 3 steps
    .venv/bin/python benchmarks/batch_benchmark.py --architecture tiny   # a smoke test of the script (seconds)

Every configuration renders the same job file into its own folder with `minidepth batch` in a subprocess; the rate is
the one `minidepth batch` prints at the end (images / rendering time, the model load excluded), and the wall time of
the whole command (load included) is shown beside it. Configurations run one after the other, never at once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("MINIDEPTH_TEST_CACHE", str(REPO / ".cache" / "minidepth-test"))

CONFIGS = {  # name -> (extra options, torchrun processes or 0, OMP_NUM_THREADS or None = torch's default)
    "1 process, one job at a time": ([], 0, None),
    "1 process, --batch-size 4": (["--batch-size", "4"], 0, None),
    "2 processes (torchrun, 1 thread each)": ([], 2, "1"),
}


def measure(name: str, jobs: Path, model: Path, out: Path, steps: int) -> dict:
    extra, procs, threads = CONFIGS[name]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = threads
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs \
        else [sys.executable]
    command = [*head, "-m", "minidepth", "batch", str(jobs), "--model", str(model), "--out", str(out),
               "--steps", str(steps), "--strength", "1.0", "--device", "cpu", *extra]
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    summary = re.search(r"(\d+) images in ([\d.]+) s \(([\d.]+) images/minute\)", result.stderr)
    if result.returncode != 0 or summary is None:
        raise SystemExit(f"{name}: failed ({result.returncode}):\n{result.stderr[-2000:]}")
    images, seconds, rate = int(summary[1]), float(summary[2]), float(summary[3])
    return {"config": name, "images": images, "render_s": seconds, "images_per_minute": rate, "wall_s": wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--architecture", choices=["official", "tiny"], default="official")
    p.add_argument("--jobs", type=int, default=8, help="number of jobs (one image each)")
    p.add_argument("--size", type=int, default=256, help="photo side in pixels")
    p.add_argument("--steps", type=int, default=3, help="scheduler steps per image (strength 1.0)")
    args = p.parse_args()

    import factory
    from test_cli import photo
    model = factory.cached_checkpoint(args.architecture)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i in range(args.jobs):
            photo(args.size, args.size, seed=i).save(tmp / f"p{i}.png")
        jobs = tmp / "jobs.jsonl"
        jobs.write_text("".join(json.dumps({"image": f"p{i}.png", "prompt": f"a house by a lake, variation {i}",
                                            "seed": i}) + "\n" for i in range(args.jobs)))
        for k, name in enumerate(CONFIGS):
            rows.append(measure(name, jobs, model, tmp / f"out{k}", args.steps))
            print(f"{name}: {rows[-1]['images_per_minute']:.2f} images/minute", file=sys.stderr)
    print(f"\n{args.jobs} jobs, {args.size}x{args.size}, {args.steps} steps at strength 1.0 (guidance 7.5: UNet batch "
          f"2 per image), {args.architecture} architecture, CPU\n")
    print("| configuration | images/minute | rendering (s) | wall, load included (s) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['images_per_minute']:.2f} | {r['render_s']:.1f} | {r['wall_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
