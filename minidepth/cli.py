"""The `minidepth` command line: depth-guided image generation, depth estimation, and checkpoint download.

    minidepth generate --image photo.jpg --prompt "a marble statue" --seed 0 --out statue.png --grid
    minidepth depth --image photo.jpg --out depth.png --raw depth16.png
    minidepth download --dir weights/stable-diffusion-2-depth

Rules every subcommand follows:
  - errors are ONE line on stderr (`minidepth <command>: error: ...`); exit code 2 for usage errors and bad values,
    1 for everything else (missing files, unreadable images, checkpoints), 130 after Ctrl-C;
  - an existing output file is never replaced unless `--overwrite` is given; all outputs are checked BEFORE any work;
  - outputs are written atomically: to a hidden temporary file in the same folder, then renamed over the target, so an
    interrupted run leaves either the old file or the complete new one, never half a PNG.
torch and the models are imported only once a subcommand runs, so `minidepth --help` is quick.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-depth"  # = checkpoints.hub.DEFAULT_MODEL_ID (not imported: speed)

# --scheduler name -> (class in minidepth.schedulers, config overrides). The checkpoint's own (PNDM) when not given.
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2-a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm-singlestep": ("DPMSolverSinglestepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# the pipeline's argument names -> the options that set them (to translate its ValueErrors)
OPTION_OF = {"strength": "--strength", "num_inference_steps": "--steps", "guidance_scale": "--guidance",
             "num_images_per_prompt": "--num-images", "prompt": "--prompt", "negative_prompt": "--negative-prompt",
             "image": "--image", "depth_map": "--depth-map"}


class CLIError(Exception):
    """A problem to report in one line; `code` is the exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------------ output files
def planned_outputs(out: Path, num_images: int, save_depth: bool, grid: bool) -> dict[str, list[Path]]:
    """Every file `generate` will write: out.png, or out-1.png ... out-N.png; out-depth.png; out-grid.png."""
    stem, suffix = out.with_suffix(""), out.suffix or ".png"
    images = [stem.with_suffix(suffix)] if num_images == 1 else \
        [stem.with_name(f"{stem.name}-{i}{suffix}") for i in range(1, num_images + 1)]
    return {"images": images,
            "depth": [stem.with_name(f"{stem.name}-depth.png")] if save_depth else [],
            "grid": [stem.with_name(f"{stem.name}-grid.png")] if grid else []}


def check_outputs(paths: list[Path], overwrite: bool) -> None:
    """Fail before any work if an output exists (without --overwrite) or cannot be written as an image."""
    from PIL import Image
    extensions = Image.registered_extensions()
    for path in paths:
        if path.suffix.lower() not in extensions or extensions[path.suffix.lower()] not in Image.SAVE:
            raise CLIError(f"cannot write {path}: unknown image file extension {path.suffix!r} (use .png)", code=2)
        if path.is_dir():
            raise CLIError(f"output {path} is a folder; give a file name such as {path / 'out.png'}", code=2)
        if path.exists() and not overwrite:
            raise CLIError(f"output {path} already exists; pass --overwrite to replace it, or choose another --out")
    if len(set(paths)) != len(paths):
        raise CLIError(f"two outputs would share a file name: {[str(p) for p in paths]}", code=2)


def save_atomic(image, path: Path, overwrite: bool = False) -> None:
    """Write a PIL image to `path` through a temporary file in the same folder + os.replace (atomic on POSIX/NTFS)."""
    from PIL import Image
    if path.exists() and not overwrite:  # appeared while we were computing
        raise CLIError(f"output {path} already exists; pass --overwrite to replace it, or choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = Image.registered_extensions()[path.suffix.lower()]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # includes KeyboardInterrupt: never leave the temporary file behind
        Path(tmp).unlink(missing_ok=True)
        raise


def compose_grid(images: list, height: int | None = None):
    """Side by side, left to right, all scaled to the same height (the last image's by default)."""
    from PIL import Image
    height = height or images[-1].height
    scaled = [im if im.height == height else
              im.resize((max(1, round(im.width * height / im.height)), height), Image.BICUBIC) for im in images]
    grid = Image.new("RGB", (sum(im.width for im in scaled), height))
    x = 0
    for im in scaled:
        grid.paste(im.convert("RGB"), (x, 0))
        x += im.width
    return grid


# ------------------------------------------------------------------------------------------------ inputs
def read_image(path: str):
    from .image_processing import load_image
    try:
        return load_image(path)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(f"--image: {e}") from e


def read_depth_map(path: str):
    """A depth file -> (1, H, W) float32 tensor, larger = nearer (the DPT convention): a .npy array, or a grayscale
    image (8/16-bit PNG such as the `--raw` output of `minidepth depth`)."""
    import numpy as np
    import torch
    from PIL import Image
    if not os.path.isfile(path):
        raise CLIError(f"--depth-map: file not found: {path}")
    try:
        if path.lower().endswith(".npy"):
            array = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as img:
                img.load()
                array = np.asarray(img)
    except (OSError, ValueError) as e:
        raise CLIError(f"--depth-map: {path} is not a readable .npy array or image ({e})") from e
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        if not (np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2])):
            raise CLIError(f"--depth-map: {path} is a colour image; pass a grayscale depth image (e.g. the --raw "
                           "output of `minidepth depth`) or a .npy array")
        array = array[..., 0]
    array = np.squeeze(array)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise CLIError(f"--depth-map: {path} holds an array of shape {array.shape}; expected a 2-D (H, W) depth map")
    depth = torch.from_numpy(array.astype(np.float32))[None]  # (1, H, W)
    if not torch.isfinite(depth).all():
        raise CLIError(f"--depth-map: {path} contains NaN or infinite values")
    return depth


# ------------------------------------------------------------------------------------------------ checkpoints
def _looks_like_path(name: str) -> bool:
    return (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") != 1
            or Path(name).expanduser().parent.is_dir())


def resolve_model(model: str, *, variant: str | None = None, revision: str | None = None) -> Path:
    """--model -> a local checkpoint folder (downloading a Hub repo id when it is not cached yet)."""
    from .checkpoints.hub import resolve_checkpoint
    fetch = f"minidepth download --model {DEFAULT_MODEL} --dir {model}"
    if Path(model).expanduser().is_dir():
        if not (Path(model).expanduser() / "model_index.json").is_file():
            raise CLIError(f"--model: {model} is not a checkpoint folder (no model_index.json); "
                           f"fetch one with: {fetch}")
        return Path(model).expanduser()
    if _looks_like_path(model):
        raise CLIError(f"--model: checkpoint folder {model} not found; fetch one with: {fetch}")
    try:
        return resolve_checkpoint(model, variant=variant, revision=revision)
    except FileNotFoundError as e:  # not cached and offline
        raise CLIError(f"--model: {model} is neither a checkpoint folder nor a Hub repo in the local cache "
                       f"(downloading is off); fetch it with: minidepth download --model {model}  (for a folder "
                       f"with the default checkpoint: {fetch})") from e
    except Exception as e:  # network or Hub errors (unknown repo, no connection, gated model, ...)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"--model: could not fetch {model} from the Hugging Face Hub ({reason}); when online, run: "
                       f"minidepth download --model {model} --dir weights/{model.split('/')[-1]}  and pass that "
                       "folder as --model") from e


def detect_variant(folder: Path, component: str, variant: str | None) -> str | None:
    """A folder made by `minidepth download --variant fp16` has only *.fp16.* weight files: use them."""
    if variant is not None:
        return variant
    files = [p.name for p in (folder / component).glob("*") if p.suffix in (".safetensors", ".bin")]
    plain = [n for n in files if n.count(".") == 1]
    return "fp16" if not plain and any(".fp16." in n for n in files) else None


# ------------------------------------------------------------------------------------------------ subcommands
def cmd_generate(args) -> int:
    import torch
    from .pipeline_io import check_call_arguments

    image = read_image(args.image)
    try:  # the pipeline's own checks, run before the (slow) model loading
        check_call_arguments(None, prompt=args.prompt, image=image, strength=args.strength,
                             num_inference_steps=args.steps, guidance_scale=args.guidance,
                             negative_prompt=args.negative_prompt, num_images_per_prompt=args.num_images,
                             generator=None, prompt_embeds=None, negative_prompt_embeds=None, output_type="pil",
                             clip_skip=None, callback_steps=None, callback_on_step_end_tensor_inputs=(),
                             allowed_tensor_inputs=(), depth_map=None)
    except (ValueError, TypeError) as e:
        message = re.sub(r"`(\w+)`", lambda m: OPTION_OF.get(m.group(1), m.group(0)), str(e))
        raise CLIError(message, code=2) from e
    out = Path(args.out) if args.out else Path(Path(args.image).stem + "-depth2img.png")
    outputs = planned_outputs(out, args.num_images, args.save_depth, args.grid)
    check_outputs([p for paths in outputs.values() for p in paths], args.overwrite)
    depth_map = read_depth_map(args.depth_map) if args.depth_map else None
    device = pick_device(args.device)

    pipe = load_pipeline(args.model, args.variant, args.revision, args.dtype, device)
    if args.scheduler:
        from . import schedulers
        name, overrides = SCHEDULERS[args.scheduler]
        pipe.scheduler = getattr(schedulers, name).from_config({**dict(pipe.scheduler.config), **overrides})
    pipe.set_progress_bar_config(desc="denoising", file=sys.stderr)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device).manual_seed(args.seed)
    estimated = []  # the DPT output the pipeline computes, kept for --save-depth / --grid (no second DPT run)
    hook = pipe.depth_estimator.register_forward_hook(lambda module, inputs, output: estimated.append(output))
    try:
        result = pipe(prompt=args.prompt, image=image, depth_map=depth_map, strength=args.strength,
                      num_inference_steps=args.steps, guidance_scale=args.guidance,
                      negative_prompt=args.negative_prompt, num_images_per_prompt=args.num_images,
                      generator=generator)
    finally:
        hook.remove()
    for img, path in zip(result.images, outputs["images"]):
        save_atomic(img, path, args.overwrite)
        print(path)
    if args.save_depth or args.grid:
        size = result.images[0].size  # (W, H) of the outputs
        colour = depth_image(depth_map if depth_map is not None else estimated[0], size)
        for path in outputs["depth"]:
            save_atomic(colour, path, args.overwrite)
            print(path)
        for path in outputs["grid"]:
            grid = compose_grid([image.resize(size, resample=3), colour, *result.images])  # 3 = bicubic
            save_atomic(grid, path, args.overwrite)
            print(path)
    return 0


def depth_image(depth, size: tuple[int, int], raw16: bool = False):
    """The first depth map of `depth` (B, h, w), bicubic-resized to `size` = (W, H): a colour PIL image (near =
    bright), or with `raw16` a 16-bit grey one (min..max -> 0..65535, as MiDaS writes them)."""
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image
    from .depth import colorize_depth
    d = F.interpolate(depth[:1, None].float().cpu(), size=size[::-1], mode="bicubic", align_corners=False)[0, 0]
    d = d.double()
    if not raw16:
        return Image.fromarray(colorize_depth(d), "RGB")
    t = (d - d.min()) / (d.max() - d.min()) if d.max() > d.min() else d * 0
    return Image.fromarray(np.round(t.numpy() * 65535).astype(np.uint16))


def cmd_depth(args) -> int:
    import torch
    image = read_image(args.image)
    paths = [Path(args.out)] + ([Path(args.raw)] if args.raw else [])
    check_outputs(paths, args.overwrite)
    if args.raw and Path(args.raw).suffix.lower() != ".png":
        raise CLIError(f"--raw {args.raw}: the 16-bit depth map is written as PNG; use a .png name", code=2)
    device = pick_device(args.device)
    root = resolve_model(args.model, variant=args.variant, revision=args.revision)
    variant = detect_variant(root, "depth_estimator", args.variant)
    print(f"loading the depth model from {root} on {device}", file=sys.stderr)
    from .depth import DPTImageProcessor, estimate_depth
    from .models.dpt import DPTDepthModel
    model = DPTDepthModel.from_pretrained(root / "depth_estimator", variant=variant, device=device,
                                          dtype=torch.float32)
    processor = DPTImageProcessor.from_pretrained(root / "feature_extractor")
    depth = estimate_depth(image, model, processor)  # (1, 384, 384), larger = nearer
    save_atomic(depth_image(depth, image.size), Path(args.out), args.overwrite)
    print(args.out)
    if args.raw:
        save_atomic(depth_image(depth, image.size, raw16=True), Path(args.raw), args.overwrite)
        print(args.raw)
    return 0


def cmd_download(args) -> int:
    if Path(args.model).expanduser().is_dir():
        raise CLIError(f"--model {args.model} is already a local folder; pass it to --model directly", code=2)
    folder = download(args.model, Path(args.dir) if args.dir else None, args.variant, args.revision)
    print(folder)
    print(f"use it with: minidepth generate --model {args.dir or args.model} ...", file=sys.stderr)
    return 0


def download(repo_id: str, folder: Path | None, variant: str | None, revision: str | None) -> Path:
    """Only the files the pipeline reads (see `checkpoints.hub`): into the Hugging Face cache (where `--model <repo
    id>` finds them again) when `folder` is None, else into that plain folder."""
    from .checkpoints.hub import download_checkpoint
    try:
        root = download_checkpoint(repo_id, variant=variant, revision=revision, local_dir=folder)
    except Exception as e:  # no connection, unknown repo, gated model, offline mode, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"could not download {repo_id}: {type(e).__name__}: {reason}") from e
    if not (root / "model_index.json").is_file():
        raise CLIError(f"{repo_id} has no model_index.json: not a diffusers checkpoint")
    return root


# ------------------------------------------------------------------------------------------------ helpers
def pick_device(name: str | None) -> str:
    import torch
    if name is None:
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available (use --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise CLIError("--device mps: Apple's MPS backend is not available (use --device cpu)")
    return name


def load_pipeline(model: str, variant: str | None, revision: str | None, dtype: str, device: str):
    import torch
    from .pipeline import StableDiffusionDepth2ImgPipeline
    root = resolve_model(model, variant=variant, revision=revision)
    print(f"loading {root} ({dtype}) on {device}", file=sys.stderr)
    return StableDiffusionDepth2ImgPipeline.from_pretrained(
        root, torch_dtype=getattr(torch, DTYPES[dtype]), variant=detect_variant(root, "unet", variant), device=device)


# ------------------------------------------------------------------------------------------------ arguments
class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show "(default: X)" only where there is a default worth showing and the help does not already say it."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _model_options(p, variant_help: str) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="PATH_OR_REPO_ID",
                   help=f"checkpoint folder (e.g. made by `minidepth download --dir ...`) or Hugging Face repo id "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--variant", choices=["fp16"], help=variant_help)
    p.add_argument("--revision", help="Hub branch, tag or commit (repo ids only)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="minidepth", description="Stable Diffusion 2 depth-to-image in plain PyTorch.",
                     epilog="Run `minidepth <command> --help` for the options of each command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,depth,download}")
    fmt = _Help

    g = sub.add_parser("generate", formatter_class=fmt, help="make new images that keep a photo's 3-D layout",
                       description="Generate images from a photo and a prompt; the photo's estimated depth map "
                                   "keeps the layout, --strength sets how much of the photo is repainted.")
    g.add_argument("--image", required=True, metavar="IN",
                   help="input photo (any format Pillow reads; sides floored to multiples of 8 pixels)")
    g.add_argument("--prompt", required=True, metavar="TEXT", help="what the new image should show")
    g.add_argument("--negative-prompt", metavar="TEXT", help="what it should not show (used when --guidance > 1)")
    g.add_argument("--strength", type=float, default=0.8,
                   help="how much noise is added to the photo, in [0, 1]: 1 repaints everything, small values stay "
                        "close to the photo; int(steps * strength) denoising steps run")
    g.add_argument("--steps", type=int, default=50, help="number of scheduler steps for the full schedule")
    g.add_argument("--guidance", type=float, default=7.5,
                   help="classifier-free guidance scale; > 1 follows the prompt more closely, 1 turns guidance off")
    g.add_argument("--seed", type=int, help="random seed for reproducible images (default: a new image each run)")
    g.add_argument("--scheduler", choices=list(SCHEDULERS),
                   help="sampler (default: the checkpoint's own, PNDM for stable-diffusion-2-depth)")
    g.add_argument("--depth-map", metavar="FILE",
                   help="use this depth map instead of estimating one: grayscale image (8/16-bit, brighter = nearer, "
                        "e.g. the --raw output of `minidepth depth`) or a .npy (H, W) array")
    g.add_argument("--num-images", type=int, default=1, metavar="N",
                   help="images to generate; several are saved as OUT-1.png, OUT-2.png, ...")
    _model_options(g, "load the half-precision weight files (auto-detected for folders that only have them)")
    g.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="computation precision (fp16/bf16 halve memory; fp16 is meant for GPUs)")
    g.add_argument("--device", choices=["cpu", "cuda", "mps"], help="where to run (default: cuda, else mps, else cpu)")
    g.add_argument("--out", metavar="PATH", help="output image (default: <image name>-depth2img.png in the current "
                                                 "folder); the extension picks the format")
    g.add_argument("--save-depth", action="store_true", help="also save the depth map as a colour image, OUT-depth.png "
                                                              "(near = bright yellow, far = dark purple)")
    g.add_argument("--grid", action="store_true", help="also save input | depth | output(s) side by side, "
                                                        "OUT-grid.png")
    g.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("depth", formatter_class=fmt, help="estimate a depth map only (no diffusion)",
                       description="Estimate the relative depth of a photo with the checkpoint's DPT model (only "
                                   "that model is loaded).")
    d.add_argument("--image", required=True, metavar="IN", help="input photo")
    d.add_argument("--out", required=True, metavar="PATH", help="colour depth image (near = bright yellow)")
    d.add_argument("--raw", metavar="PATH", help="also save a 16-bit grayscale PNG (brighter = nearer, min..max -> "
                                                 "0..65535), usable as `generate --depth-map`")
    _model_options(d, "load the half-precision weight file (auto-detected for folders that only have it)")
    d.add_argument("--device", choices=["cpu", "cuda", "mps"], help="where to run (default: cuda, else mps, else cpu)")
    d.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    d.set_defaults(func=cmd_depth)

    w = sub.add_parser("download", formatter_class=fmt, help="fetch a checkpoint for offline use",
                       description="Download only the files minidepth reads (configs, tokenizer, one weight file "
                                   "per model) and print the folder; pass that folder as --model afterwards.")
    w.add_argument("--model", default=DEFAULT_MODEL, metavar="REPO_ID", help="Hugging Face repo id")
    w.add_argument("--variant", choices=["fp16"], help="download the half-precision weight files instead (half size)")
    w.add_argument("--dir", metavar="FOLDER", help="download into this plain folder (e.g. weights/stable-diffusion-2-"
                                                   "depth) instead of the Hugging Face cache")
    w.add_argument("--revision", help="branch, tag or commit")
    w.set_defaults(func=cmd_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = f"minidepth {args.command}"
    try:
        return args.func(args)
    except CLIError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the user; MINIDEPTH_DEBUG=1 shows the traceback
        if os.environ.get("MINIDEPTH_DEBUG"):
            raise
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or "(no message)"
        print(f"{prog}: error: {type(e).__name__}: {message}  (MINIDEPTH_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
