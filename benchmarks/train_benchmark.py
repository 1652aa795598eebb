"""LoRA training speed and memory at the official SD2-depth size: seconds per step and peak memory, with and without
gradient checkpointing.

    .venv/bin/python benchmarks/train_benchmark.py                       # 256x256, batch 1, 4 steps each, CPU
    .venv/bin/python benchmarks/train_benchmark.py --device cuda --resolution 512 --batch-size 4 --mixed-precision bf16

The networks are built with random weights from their default configs (= the checkpoint's: 865.9 M UNet parameters),
no files needed; the photos come with their own depth maps, so the DPT is not needed either. Each setting runs in its
own process (so peaks do not mix): it builds the pipeline, resets the peak counter (CPU: VmHWM through
/proc/self/clear_refs; CUDA: torch.cuda.reset_peak_memory_stats), trains with `minidepth.train.train_lora`, and reports
the median seconds of the steps after the first (warm-up) and the peak: resident set size (CPU) or allocated memory
(CUDA), weights included, and the growth over the loaded model ("training overhead").
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker(args) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from minidepth.checkpoints.single_file import PACKAGED_CONFIGS
    from minidepth.depth import DPTImageProcessor
    from minidepth.models.autoencoder import AutoencoderKL
    from minidepth.models.clip_text import CLIPTextModel
    from minidepth.models.unet import UNet
    from minidepth.pipeline import StableDiffusionDepth2ImgPipeline
    from minidepth.schedulers import scheduler_from_config
    from minidepth.tokenizer import CLIPTokenizer
    from minidepth.train import train_lora
    torch.manual_seed(0)
    device = torch.device(args.device)
    pipe = StableDiffusionDepth2ImgPipeline(
        AutoencoderKL(), CLIPTextModel(), CLIPTokenizer.from_pretrained(PACKAGED_CONFIGS / "tokenizer"), UNet(),
        scheduler_from_config(json.loads((PACKAGED_CONFIGS / "scheduler" / "scheduler_config.json").read_text())),
        None, DPTImageProcessor()).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        rng = np.random.default_rng(0)
        for i in range(2):
            size = args.resolution + 32 * i
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(data / f"{i}.png")
            Image.fromarray(rng.integers(0, 65535, (size, size), dtype=np.uint16)).save(data / f"{i}.depth.png")
            (data / f"{i}.txt").write_text("a photo of a house by the sea")
        if device.type == "cuda":
            torch.cuda.synchronize()
            loaded = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            loaded = rss_kb("VmRSS") * 1024
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        result = train_lora(model=pipe, data=str(data), out=str(Path(tmp) / "lora.safetensors"), plot="",
                            resolution=args.resolution, batch_size=args.batch_size, steps=args.steps,
                            grad_checkpointing=args.grad_checkpointing, mixed_precision=args.mixed_precision,
                            targets=args.targets, device=args.device, progress=False)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_kb("VmHWM") * 1024
    seconds = [h["seconds"] for h in result.history[1:]] or [result.history[0]["seconds"]]
    return {"s_per_step": statistics.median(seconds), "peak_gb": peak / 1e9, "overhead_gb": (peak - loaded) / 1e9,
            "loss": result.history[-1]["loss"], "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="steps per setting (the first is a warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--targets", default="attn", choices=["attn", "attn+ff", "all"])
    parser.add_argument("--grad-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = []
    for checkpointing in (False, True):
        command = [sys.executable, __file__, "--worker", "--resolution", str(args.resolution), "--batch-size",
                   str(args.batch_size), "--steps", str(args.steps), "--device", args.device, "--mixed-precision",
                   args.mixed_precision, "--targets", args.targets] + (["--grad-checkpointing"] if checkpointing else [])
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
        if done.returncode:
            sys.exit(done.stderr[-3000:])
        rows.append((checkpointing, json.loads(done.stdout.strip().splitlines()[-1])))
    print(f"LoRA training, official size, {args.resolution}x{args.resolution}, batch {args.batch_size}, {args.device}, "
          f"mixed precision {args.mixed_precision}, targets {args.targets}, median of {args.steps - 1} steps "
          f"({rows[0][1]['threads']} threads)")
    print("| gradient checkpointing | s/step | peak memory (GB) | training overhead (GB) |")
    print("|---|---|---|---|")
    for checkpointing, r in rows:
        print(f"| {'on' if checkpointing else 'off'} | {r['s_per_step']:.2f} | {r['peak_gb']:.2f} | "
              f"{r['overhead_gb']:.2f} |")


if __name__ == "__main__":
    main()
