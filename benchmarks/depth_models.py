"""Which depth model conditions SD2-depth best? One photo and one prompt through each depth model: the depth maps and
the images side by side, and the depth stage's time.

    python benchmarks/depth_models.py                  # random weights at the official sizes: timings, no download
    python benchmarks/depth_models.py --model weights/stable-diffusion-2-depth --image photo.jpg \\
        --prompt "a marble statue" --depth-model dpt-hybrid depth-anything-v2-small depth-anything-v2-base
    python benchmarks/depth_models.py --tiny           # seconds: the test architectures (a smoke test of the script)

Without --model nothing is downloaded: the SD2-depth networks are built from the packaged configs (the presets, equal
to minidepth/data/sd2-depth/) and each Depth Anything V2 name from its packaged config, all with random weights. The
pictures then show nothing, but the timings are those of the real architectures. With --model (a checkpoint folder or
Hub repo id) every --depth-model is the real one (names and repo ids downloaded and cached, folders read).

Into --out (default .cache/depth-models/, git-ignored): depth-<name>.png per model (near = bright), depths.png (photo |
the depth maps, labelled), images.png (photo | one image per depth model, the same seed and settings) and
results.json; on stdout a Markdown table per depth model: parameters, the preprocessed input, the depth stage's
seconds (`pipe.prepare_depth_map` under the StageTimes observer: preprocessing, the model, resize and normalisation;
median and minimum of --repeats runs after one warm-up run) and the whole generation's depth stage and total.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from minidepth import StableDiffusionDepth2ImgPipeline  # noqa: E402
from minidepth.checkpoints.depth_models import DEFAULT, HUB_REPOS, load_depth_model  # noqa: E402
from minidepth.generation import StageTimes, depth_picture  # noqa: E402

PACKAGED = REPO / "minidepth" / "data" / "sd2-depth"
TINY_DEPTH_ANYTHING = dict(hidden_size=32, num_layers=4, num_heads=2, image_size=56, vit_out_indices=(0, 1, 2, 3),
                           neck_sizes=(8, 16, 32, 32), fusion_size=16, head_size=8)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


# ------------------------------------------------------------------------------------------------ the models
def random_pipeline(device: str) -> StableDiffusionDepth2ImgPipeline:
    """SD2-depth at the official size with random weights, from the packaged configs (the presets)."""
    from minidepth.checkpoints import read_json
    from minidepth.dpt_processing import DPTImageProcessor
    from minidepth.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
    from minidepth.models.clip_text import CLIPTextConfig, CLIPTextModel
    from minidepth.models.dpt import DPTConfig, DPTDepthModel
    from minidepth.models.unet import UNet, UNetConfig
    from minidepth.schedulers import scheduler_from_config
    from minidepth.tokenizer import CLIPTokenizer
    torch.manual_seed(0)
    with torch.device(device):
        models = {"unet": UNet(UNetConfig.sd2_depth()), "vae": AutoencoderKL(AutoencoderKLConfig.sd2_depth()),
                  "text_encoder": CLIPTextModel(CLIPTextConfig.sd2_depth()),
                  "depth_estimator": DPTDepthModel(DPTConfig.sd2_depth())}
    return StableDiffusionDepth2ImgPipeline(
        **{k: m.eval() for k, m in models.items()}, tokenizer=CLIPTokenizer.from_pretrained(PACKAGED / "tokenizer"),
        scheduler=scheduler_from_config(read_json(PACKAGED / "scheduler" / "scheduler_config.json")),
        feature_extractor=DPTImageProcessor.from_pretrained(PACKAGED / "feature_extractor"))


def random_depth_anything(name: str, tiny: bool, device: str):
    """A Depth Anything V2 name with random weights: its packaged config (or a tiny one), its packaged processor."""
    from minidepth.checkpoints.depth_anything_format import image_processor, packaged_config
    from minidepth.models.depth_anything import DepthAnythingConfig, DepthAnythingV2
    size = name.rsplit("-", 1)[1]
    torch.manual_seed(1)
    with torch.device(device):
        model = DepthAnythingV2(DepthAnythingConfig(**TINY_DEPTH_ANYTHING) if tiny else packaged_config(size))
    return model.eval(), image_processor(size)


def let_it_vary(model, processor, photo) -> None:
    """Random weights end in a ReLU that is 0 on much of the map: shift the last conv's bias so that about 75% of
    this photo's map is positive (a flat map would be normalised to zeros)."""
    last = model.head.conv3 if hasattr(model.head, "conv3") else model.head[4]
    seen = {}
    hook = last.register_forward_hook(lambda m, i, out: seen.__setitem__("out", out))
    with torch.no_grad():
        model(processor(photo).to(next(model.parameters()).device))
        last.bias -= seen["out"].float().quantile(0.25)
    hook.remove()


def depth_models(args, pipe, checkpoint) -> dict:
    """name -> (model, processor): the pipeline's own for dpt-hybrid, the rest loaded (or random, without --model)."""
    out = {}
    for name in args.depth_model:
        if name == DEFAULT:
            out[name] = (pipe.depth_estimator, pipe.feature_extractor)
        elif checkpoint is None and name in HUB_REPOS:
            out[name] = random_depth_anything(name, args.tiny, args.device)
        else:
            out[name] = load_depth_model(name, checkpoint=checkpoint, device=args.device)
    return out


# ------------------------------------------------------------------------------------------------ the run
def measure(args) -> dict:
    from PIL import Image

    from minidepth.cli.files import compose_grid
    from minidepth.depth import estimate_depth
    from minidepth.image_processing import to_rgb
    checkpoint = args.model
    if args.tiny:
        import factory
        checkpoint = checkpoint or factory.cached_checkpoint("tiny")
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(checkpoint, device=args.device) if checkpoint \
        else random_pipeline(args.device)
    pipe.set_progress_bar_config(disable=True)
    with Image.open(args.image) as img:
        img.load()
        photo = to_rgb(img)
        photo = photo.resize((args.width, round(photo.height * args.width / photo.width / 8) * 8), Image.LANCZOS) \
            if args.width else photo
    out, results = Path(args.out), {}
    out.mkdir(parents=True, exist_ok=True)
    depths, images = [], []
    for name, (model, processor) in depth_models(args, pipe, checkpoint if args.model else None).items():
        if not args.model and (name in HUB_REPOS or name == DEFAULT and not args.tiny):
            let_it_vary(model, processor, photo)
        pipe.depth_estimator, pipe.feature_extractor = model, processor
        runs = []
        for i in range(args.repeats + 1):  # run 0 warms up
            timer = StageTimes(args.device)
            with pipe.observing(timer):
                pipe.prepare_depth_map(photo, None, 1, False, torch.float32)
            runs += [timer.seconds["depth"]] if i else []
        timer, start = StageTimes(args.device), time.perf_counter()
        with pipe.observing(timer):
            image = pipe(args.prompt, image=photo, num_inference_steps=args.steps, strength=args.strength,
                         generator=torch.Generator(args.device).manual_seed(args.seed)).images[0]
        total = time.perf_counter() - start
        pixel_values = processor(photo)
        depth = estimate_depth(photo, model, processor)
        picture = depth_picture(depth, photo.size)
        safe = name.replace("/", "--").replace(" ", "_")
        picture.save(out / f"depth-{Path(safe).name}.png")
        depths.append(picture)
        images.append(image)
        results[name] = {"parameters": sum(p.numel() for p in model.parameters()),
                         "input": list(pixel_values.shape), "depth_seconds": runs,
                         "depth_median_s": statistics.median(runs), "depth_min_s": min(runs),
                         "generation_depth_s": timer.seconds.get("depth"), "generation_total_s": total}
        print(f"{name}: depth {statistics.median(runs):.3f} s (median of {len(runs)}), generation {total:.1f} s",
              file=sys.stderr)
    labels = ["photo", *results]
    compose_grid([photo, *depths], labels=labels, border=2).save(out / "depths.png")
    compose_grid([photo, *images], labels=labels, border=2).save(out / "images.png")
    summary = {"cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "device": args.device, "weights": "real" if args.model else "random", "photo": str(args.image),
               "size": list(photo.size), "prompt": args.prompt, "steps": args.steps, "strength": args.strength,
               "models": results}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def table(summary: dict) -> str:
    lines = [f"{summary['cpu']}, {summary['threads']} threads, torch {summary['torch']}, {summary['weights']} weights, "
             f"photo {summary['size'][0]}x{summary['size'][1]}", "",
             "| depth model | parameters | input | depth stage (s), median | min | in the generation (s) |",
             "|---|---:|---|---:|---:|---:|"]
    for name, r in summary["models"].items():
        lines.append(f"| {name} | {r['parameters'] / 1e6:.1f} M | {'x'.join(map(str, r['input'][2:]))} | "
                     f"{r['depth_median_s']:.3f} | {r['depth_min_s']:.3f} | {r['generation_depth_s']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder or Hub repo id (default: random weights, official size)")
    p.add_argument("--depth-model", nargs="+", default=[DEFAULT, "depth-anything-v2-small"], metavar="NAME_OR_PATH",
                   help="depth models to compare (names, folders, repo ids; default: dpt-hybrid depth-anything-v2-small)")
    p.add_argument("--image", default=str(REPO / "minidepth" / "data" / "sample-photo.png"), help="the photo")
    p.add_argument("--width", type=int, help="resize the photo to this width first (multiple of 8)")
    p.add_argument("--prompt", default="a marble statue in a garden")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--strength", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of the depth stage per model (after a warm-up)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny architectures (a smoke test: seconds)")
    p.add_argument("--out", default=str(REPO / ".cache" / "depth-models"), help="output folder")
    args = p.parse_args(argv)
    print(table(measure(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
