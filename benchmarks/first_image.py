"""The first image in a fresh process, as a command-line user meets it: minidepth against diffusers.

    python benchmarks/first_image.py --size 256 --steps 5 --runs 3
    python benchmarks/first_image.py --size 512 --steps 3 --runs 3

Each run starts one fresh Python process per library (alternating which goes first: A B, B A, ...). The process
imports the library, loads the pipeline from the checkpoint folder (`from_pretrained`, float32, CPU), makes one image
(strength 0.8 by default, guidance 7.5, a fixed seed, `output_type="np"`), then the same image again in the same
process, and reports:

  - cold start: from the parent's `Popen` to a loaded pipeline (interpreter, imports, `from_pretrained`);
  - first image: the first `pipe(...)` call alone, and "fresh process to first image" = cold start + first image,
    which is what `minidepth generate` costs a user;
  - repeated: the second call in the same process;
  - peak RSS of the process (VmHWM, weights included) and its RSS after loading;
  - for minidepth, the first and the repeated call's stages (`StageTimes` observer: prompt, depth, encode, denoise,
    decode), which shows where a first call pays extra.

Medians over `--runs`; ratios diffusers / minidepth (above 1 = minidepth is faster). The two first images are compared
(max |difference| of the float output in [0, 1]). Without `--checkpoint` it uses the random-weight official-size
checkpoint of `benchmark.py` (tests/factory.py, built on first use). Name the CPU with the numbers (printed first).
The page cache is warm for both (the checkpoint was read before); neither library gets a cold disk.
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

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]
os.environ.setdefault("MINIDEPTH_TEST_CACHE", str(REPO / ".cache" / "minidepth-test"))
NAMES = ("minidepth", "diffusers")


def child(args) -> None:
    """One fresh process: import, load, two images; a JSON line on stdout."""
    t0 = time.time()
    import numpy as np
    import torch
    if args.child == "minidepth":
        from minidepth import StableDiffusionDepth2ImgPipeline
        from minidepth.generation import StageTimes
        t_imported = time.time()
        pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(args.checkpoint)
    else:
        import diffusers
        import transformers
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        t_imported = time.time()
        pipe = diffusers.StableDiffusionDepth2ImgPipeline.from_pretrained(args.checkpoint)
    pipe.set_progress_bar_config(disable=True)
    t_loaded = time.time()
    from benchmark import _status_mb, photo  # (numpy, PIL and torch: already imported by either library)
    loaded_mb = _status_mb("VmRSS")
    image = photo(args.size)
    calls, stages = [], []
    for _ in range(2):
        timer = StageTimes() if args.child == "minidepth" else None
        start = time.time()
        if timer is None:
            out = pipe(prompt=args.prompt, image=image, strength=args.strength, num_inference_steps=args.steps,
                       guidance_scale=7.5, generator=torch.Generator().manual_seed(0), output_type="np")
        else:
            with pipe.observing(timer):
                out = pipe(prompt=args.prompt, image=image, strength=args.strength, num_inference_steps=args.steps,
                           guidance_scale=7.5, generator=torch.Generator().manual_seed(0), output_type="np")
        calls.append(time.time() - start)
        stages.append(timer.seconds if timer else {})
        if len(calls) == 1:
            t_first = time.time()
            np.save(args.out, np.asarray(out.images[0], dtype=np.float32))
    print(json.dumps({"python_s": t0 - args.started, "imports_s": t_imported - t0, "load_s": t_loaded - t_imported,
                      "cold_start_s": t_loaded - args.started, "first_s": calls[0], "repeated_s": calls[1],
                      "to_first_image_s": t_first - args.started, "loaded_mb": loaded_mb,
                      "peak_mb": _status_mb("VmHWM"), "stages": stages}), flush=True)


def run_child(name: str, args, out: Path) -> dict:
    command = [sys.executable, __file__, "--child", name, "--checkpoint", str(args.checkpoint), "--size",
               str(args.size), "--steps", str(args.steps), "--strength", str(args.strength), "--prompt", args.prompt,
               "--out", str(out), "--started", repr(time.time())]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--strength", type=float, default=0.8)
    p.add_argument("--runs", type=int, default=3, help="fresh-process pairs")
    p.add_argument("--prompt", default="a stone bridge over a river, evening light")
    p.add_argument("--checkpoint", type=Path, help="checkpoint folder (default: the random-weight official-size one)")
    p.add_argument("--child", choices=NAMES, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--started", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    import numpy as np
    from peer_benchmark import cpu_name
    if args.checkpoint is None:
        import factory
        args.checkpoint = factory.cached_checkpoint("official")
    print(f"CPU: {cpu_name()}; {args.size}x{args.size}, {args.steps} steps, strength {args.strength}, "
          f"{args.runs} fresh-process pairs", flush=True)
    results = {name: [] for name in NAMES}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.runs):
            for name in (NAMES if r % 2 == 0 else NAMES[::-1]):
                results[name].append(run_child(name, args, Path(tmp) / f"{name}.npy"))
                print(f"run {r + 1} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in results[name][-1].items()
                                                          if isinstance(v, float)), flush=True)
        diff = float(np.abs(np.load(Path(tmp) / "minidepth.npy") - np.load(Path(tmp) / "diffusers.npy")).max())

    def med(name, key):
        return statistics.median(r[key] for r in results[name])
    rows = [("cold start (s): fresh process to a loaded pipeline", "cold_start_s", "{:.2f}"),
            ("  of which imports (s)", "imports_s", "{:.2f}"), ("  of which from_pretrained (s)", "load_s", "{:.2f}"),
            ("first image, the call alone (s)", "first_s", "{:.2f}"),
            ("**fresh process to first image (s)**", "to_first_image_s", "{:.2f}"),
            ("repeated image, same process (s)", "repeated_s", "{:.2f}"),
            ("RSS after loading (MB)", "loaded_mb", "{:.0f}"), ("peak RSS (MB)", "peak_mb", "{:.0f}")]
    print(f"\n| median of {args.runs} | minidepth | diffusers | diffusers / minidepth |\n|---|---|---|---|")
    for label, key, fmt in rows:
        ours, ref = med("minidepth", key), med("diffusers", key)
        print(f"| {label} | {fmt.format(ours)} | {fmt.format(ref)} | {ref / ours:.2f}x |")
    for i, call in enumerate(("first", "repeated")):
        stages = {k: statistics.median(r["stages"][i][k] for r in results["minidepth"])
                  for k in results["minidepth"][0]["stages"][i]}
        print(f"minidepth {call} call by stage (s): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    print(f"max |minidepth - diffusers| of the first image (float output in [0, 1]): {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
