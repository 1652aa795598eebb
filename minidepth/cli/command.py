"""The `minidepth` command line: depth-guided image generation, depth estimation, PNG settings, checkpoint download.

    minidepth generate --image photo.jpg --prompt "a marble statue" --seed 0 --out statue.png --grid
    minidepth info statue.png                  # the settings saved in the PNG (AUTOMATIC1111's format)
    minidepth generate --from statue.png --steps 30 --out statue-30.png
    minidepth depth --image photo.jpg --out depth.png --raw depth16.png
    minidepth schedulers
    minidepth download --dir weights/stable-diffusion-2-depth

Rules every subcommand follows:
  - errors are ONE line on stderr (`minidepth <command>: error: ...`); exit code 2 for usage errors and bad values,
    1 for everything else (missing files, unreadable images, checkpoints), 130 after Ctrl-C;
  - everything that needs no model (option values, input files, outputs) is checked BEFORE a model loads;
  - a silent change (resize, conversion, stretched depth map, ...) gets a one-line warning;
  - an existing output file is never replaced unless `--overwrite` is given; outputs are written atomically (a hidden
    temporary file in the same folder, renamed over the target).
torch and the models are imported only once a subcommand needs them, so `minidepth --help` / `--version` are quick.
Options and checks: `args.py`; files, warnings and the grid: `files.py`; PNG settings: `png_metadata.py`. The
generation itself (settings -> images + their record) is the library's `minidepth/generation.py`, which `batch` and
`serve` call too: here are only the options, the checks and the files.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import sys
import time
from pathlib import Path

from .args import (DEFAULT_MODEL, DTYPES, GENERATE_DEFAULTS, LDM_DEFAULTS, OPTION_OF,  # noqa: F401
                   SCHEDULER_TABLE, SCHEDULERS, SUBCOMMAND_MODULES, CLIError, build_parser,
                   check_attention_slicing, check_depth_model, check_generate, schedulers_table)
from .files import (Console, check_outputs, compose_grid, once, open_image, planned_outputs, read_depth_map,
                    save_atomic)
from .model import checkpoint_limits, detect_variant, hub_error, resolve_depth_model, resolve_model
from . import inside as inside_cli


def pick_device(name: str | None) -> str:
    import torch
    if name is None:
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available (use --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise CLIError("--device mps: Apple's MPS backend is not available (use --device cpu)")
    return name


def warn_half_on_cpu(console: Console, dtype: str, device: str | None) -> None:
    if device == "cpu" and dtype != "fp32":
        console.warn(f"--dtype {dtype} on the CPU is very slow (CPUs have few half-precision kernels); "
                     "--dtype fp32 is faster there")


# ------------------------------------------------------------------------------------------------ generate
def settings_from_png(path: str) -> dict:
    """`--from PNG` -> the generate settings saved in it (only the keys `--from` restores)."""
    from .png_metadata import read_settings
    if not os.path.isfile(path):
        raise CLIError(f"--from: file not found: {path}")
    try:
        settings, _ = read_settings(path)
    except (OSError, ValueError) as e:
        raise CLIError(f"--from: {path} is not a readable image ({e})") from e
    if not settings:
        raise CLIError(f"--from: {path} holds no generation settings (no `parameters` or `minidepth` PNG text "
                       "chunk); only PNGs saved by `minidepth generate` or AUTOMATIC1111 have them")
    restored = {k: v for k, v in settings.items() if k in GENERATE_DEFAULTS}
    if isinstance(restored.get("image"), str):
        restored["image"] = [restored["image"]]
    restored["_sha256"] = settings.get("image_sha256")
    return restored


def _sha256(path) -> str:
    import hashlib
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _settings(args) -> tuple[dict, dict, dict]:
    """(settings, restored, given): the options given, else those restored by `--from`, else the defaults (the
    original script's for --mode ldm); checked as far as that needs no file and no model."""
    restored = settings_from_png(args.from_png) if args.from_png else {}
    given = {k: v for k, v in vars(args).items() if k in GENERATE_DEFAULTS}
    s = {**GENERATE_DEFAULTS, **{k: v for k, v in restored.items() if k in GENERATE_DEFAULTS}, **given}
    if s["mode"] == "ldm":  # the original script's defaults where neither the options nor --from set them
        s.update({k: v for k, v in LDM_DEFAULTS.items() if k not in given and k not in restored})
        seen = [o for o, k in (("--filmstrip", "filmstrip"), ("--filmstrip-every", "filmstrip_every"),
                               ("--attention-maps", "attention_maps")) if getattr(args, k, None) not in (None, False)]
        if seen:  # both observe the diffusers denoising loop, which --mode ldm does not run
            raise CLIError(f"{' and '.join(seen)}: not available with --mode ldm (they record the diffusers "
                           "denoising loop; LDM mode runs its own)", code=2)
    elif args.crop_padding:
        raise CLIError("--crop-padding only applies with --mode ldm (the diffusers mode does not pad)", code=2)
    if not s["image"]:
        raise CLIError("--image is required (or --from IMAGE.png, a PNG saved by `minidepth generate`)", code=2)
    if s["prompt"] is None:
        raise CLIError("--prompt is required (or --from IMAGE.png); pass --prompt \"\" for none", code=2)
    check_generate(s, args.num_images)
    s["depth_model"] = check_depth_model(s["depth_model"])  # a name, folder or repo id: offline, before any model
    return s, restored, given


def _plan(args, s: dict, photos: list, depth_array, console: Console) -> list:
    """One generation.Job per photo, checked (`generation.check`: its size and the depth map's aspect ratio, with
    their warnings), and the files it writes: [(job, outputs)]."""
    from ..generation import Job, check
    if len(photos) > 1 and args.out and Path(args.out).suffix:
        raise CLIError(f"--out {args.out}: with {len(photos)} --image files, --out is a folder (each output is "
                       "named after its photo)", code=2)
    folder = Path(args.out) if args.out else Path(".")
    planned = []
    for path, photo in zip(s["image"], photos):
        job = Job(prompt=s["prompt"], photo=photo, photo_path=path, model=s["model"],
                  negative_prompt=s["negative_prompt"], width=s["width"], height=s["height"],
                  strength=s["strength"], steps=s["steps"], guidance=s["guidance"], seed=s["seed"],
                  scheduler=s["scheduler"], eta=s["eta"], clip_skip=s["clip_skip"], depth_map=depth_array,
                  depth_map_path=s["depth_map"], num_images=args.num_images, mode=s["mode"], max_pixels=args.max_pixels,
                  depth_model=s["depth_model"],
                  crop_padding=args.crop_padding, variant=s["variant"], revision=s["revision"], dtype=s["dtype"])
        try:
            check(job, console.warn)
        except ValueError as e:
            raise CLIError(str(e)) from e
        out = Path(args.out) if args.out and len(photos) == 1 else folder / f"{Path(path).stem}-depth2img.png"
        planned.append((job, planned_outputs(out, args.num_images, args.save_depth, args.grid)))
    return planned


def cmd_generate(args, console: Console) -> int:
    start = time.perf_counter()
    s, restored, given = _settings(args)
    slicing = check_attention_slicing(args.attention_slicing)
    if args.cpu_offload and args.device == "cpu":
        raise CLIError("--cpu-offload with --device cpu: offloading moves models to an accelerator while they run; "
                       "use --device cuda or mps", code=2)
    if not s["prompt"].strip():
        console.warn("--prompt is empty: nothing steers the image but the photo and its depth (unconditional)")
    warn_half_on_cpu(console, s["dtype"], args.device)

    # input files, outputs, the checkpoint's limits: all before torch is imported
    if "image" not in given and not os.path.isfile(s["image"][0]):
        raise CLIError(f"--from {args.from_png}: its photo {s['image'][0]} is not there; pass --image")
    photos = [open_image(p, console, max_pixels=args.max_pixels) for p in s["image"]]  # big files: before decoding
    if restored.get("_sha256") and "image" not in given and _sha256(s["image"][0]) != restored["_sha256"]:
        console.warn(f"--from {args.from_png}: the photo {s['image'][0]} has changed since; the result will differ")
    depth_array = read_depth_map(s["depth_map"], args.max_pixels) if s["depth_map"] else None
    planned = _plan(args, s, photos, depth_array, console)
    if any(getattr(args, k, None) not in (None, False) for k in ("filmstrip", "filmstrip_every", "attention_maps")):
        for _, outputs in planned:  # only when asked: inside_cli imports torch for them, and checks come first
            inside_cli.plan_outputs(args, outputs)  # -filmstrip.png, -attn-WORD.png
    check_outputs([p for _, outputs in planned for paths in outputs.values() for p in paths], args.overwrite)
    root = resolve_model(s["model"], variant=s["variant"], revision=s["revision"])
    max_steps, layers = checkpoint_limits(root)
    check_generate(s, args.num_images, max_steps)
    inside_cli.check_prompt_words(args, root, s["prompt"])
    if s["clip_skip"] is not None and s["clip_skip"] >= layers:
        raise CLIError(f"--clip-skip {s['clip_skip']}: must be in [0, {layers - 1}] (the text encoder has {layers} "
                       "layers)", code=2)
    depth_model = resolve_depth_model(s["depth_model"], root)  # its config files, before any model loads

    from ..generation import StageTimes, generate, resolve_seed
    device = pick_device(args.device)
    if args.device is None:
        warn_half_on_cpu(console, s["dtype"], device)
    if args.cpu_offload and device == "cpu":
        raise CLIError("--cpu-offload: no cuda or mps device here; offloading needs an accelerator", code=2)
    t = time.perf_counter()
    pipe = load_pipeline(root, s["variant"], s["dtype"], "cpu" if args.cpu_offload else device, console,
                         exact=args.exact, compile=args.compile, depth_model=depth_model)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device)
    load_seconds = time.perf_counter() - t
    if slicing is not None:
        pipe.enable_attention_slicing(slicing)
    if args.vae_slicing:
        pipe.enable_vae_slicing()
    if args.vae_tiling:
        pipe.enable_vae_tiling()
    pipe.set_progress_bar_config(desc="denoising", file=sys.stderr, disable=args.quiet)
    seed = resolve_seed(s["seed"], console.info)  # one seed for every photo: image i of each uses seed + i
    timer, warn = StageTimes(device), once(console.warn)  # a warning about the settings: once, not once per photo
    for job, outputs in planned:
        try:
            with inside_cli.recording(pipe, args) as seen:  # --filmstrip / --attention-maps: observe only
                [result] = generate(pipe, [dataclasses.replace(job, seed=seed)], device=device, observers=[timer],
                                    warn=warn)
        except (ValueError, TypeError) as e:  # the pipeline's own checks, in the options' names
            message = re.sub(r"`(\w+)`", lambda m: OPTION_OF.get(m.group(1), m.group(0)), str(e))
            raise CLIError(message, code=2 if "`" in str(e) else 1) from e
        _write(args, result, outputs, seen)
    times = {"load": load_seconds, **{k: timer.seconds.get(k, 0.0) for k in ("depth", "denoise", "decode")}}
    total = time.perf_counter() - start
    console.info("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()) + f", total {total:.1f} s")
    return 0


def _write(args, result, outputs: dict, seen: dict) -> None:
    """One job's files, each printed once written: the images with their settings, the filmstrip and attention maps,
    --save-depth's colour depth and --grid's photo | depth | images."""
    from ..generation import depth_picture
    from .png_metadata import png_info
    for image, path, record in zip(result.images, outputs["images"], result.records):
        save_atomic(image, path, args.overwrite, pnginfo=png_info(record))
        print(path, flush=True)
    for path in inside_cli.after_generate(seen, outputs, result.images, args.overwrite, save_atomic):
        print(path, flush=True)
    if outputs["depth"] or outputs["grid"]:
        size = result.images[0].size  # (W, H) of the outputs
        colour = depth_picture(result.depth, size)
        for path in outputs["depth"]:
            save_atomic(colour, path, args.overwrite)
            print(path, flush=True)
        for path in outputs["grid"]:
            labels = ["photo", "depth map" if result.job.depth_map is not None else "depth"]
            labels += [f"seed {x}" for x in result.seeds]
            grid = compose_grid([result.photo.resize(size, resample=3), colour, *result.images], labels=labels,
                                border=2)  # 3 = bicubic
            save_atomic(grid, path, args.overwrite, pnginfo=png_info(result.records[0]))
            print(path, flush=True)


def load_pipeline(root: Path, variant: str | None, dtype: str, device: str, console: Console,
                  exact: bool = False, compile: bool = False, depth_model=None):
    """The pipeline for a command; `exact` (`--exact`) adds to MINIDEPTH_EXACT, `compile` is `--compile`,
    `depth_model` (a name or model.resolve_depth_model's source; None: the checkpoint's DPT) fills the depth slot."""
    import torch
    from ..pipeline import StableDiffusionDepth2ImgPipeline
    console.info(f"loading {root} ({dtype}) on {device}")
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(
        root, torch_dtype=getattr(torch, DTYPES[dtype]), variant=detect_variant(root, "unet", variant), device=device,
        depth_estimator=depth_model)
    pipe.set_exact(exact or pipe.exact)
    if compile:
        pipe.compile()
    return pipe


# ------------------------------------------------------------------------------------------------ other commands
def cmd_depth(args, console: Console) -> int:
    photo = open_image(args.image, console, max_pixels=args.max_pixels)  # a big file: refused before decoding
    paths = [Path(args.out)] + ([Path(args.raw)] if args.raw else [])
    check_outputs(paths, args.overwrite)
    if args.raw and Path(args.raw).suffix.lower() != ".png":
        raise CLIError(f"--raw {args.raw}: the 16-bit depth map is written as PNG; use a .png name", code=2)
    warn_half_on_cpu(console, args.dtype, args.device)
    name = check_depth_model(args.depth_model)  # another model than the checkpoint's DPT needs no checkpoint
    source = resolve_depth_model(name, None)
    root = resolve_model(args.model, variant=args.variant, revision=args.revision) if source is None else None
    import torch
    from ..checkpoints.depth_models import DEFAULT, load_depth_model
    from ..depth import estimate_depth
    from ..generation import depth_picture
    from ..image_processing import to_rgb
    device = pick_device(args.device)
    if args.device is None:
        warn_half_on_cpu(console, args.dtype, device)
    variant = detect_variant(root, "depth_estimator", args.variant) if root is not None else None
    console.info(f"loading the depth model {name} from {root or source.folder} ({args.dtype}) on {device}")
    model, processor = load_depth_model(source or DEFAULT, checkpoint=root, variant=variant, device=device,
                                        dtype=getattr(torch, DTYPES[args.dtype]))
    image = to_rgb(photo)
    depth = estimate_depth(image, model, processor, exact=False)  # (1, h, w), larger = nearer; as generate
    save_atomic(depth_picture(depth, image.size), Path(args.out), args.overwrite)
    print(args.out)
    if args.raw:
        save_atomic(depth_picture(depth, image.size, raw16=True), Path(args.raw), args.overwrite)
        print(args.raw)
    return 0


def cmd_info(args, console: Console) -> int:
    from .png_metadata import parameters_text, read_settings
    if not os.path.isfile(args.png):
        raise CLIError(f"file not found: {args.png}")
    try:
        settings, text = read_settings(args.png)
    except (OSError, ValueError) as e:
        raise CLIError(f"{args.png} is not a readable image ({e})") from e
    if not settings:
        raise CLIError(f"{args.png} holds no generation settings (no `parameters` or `minidepth` PNG text chunk); "
                       "only PNGs saved by `minidepth generate` or AUTOMATIC1111 have them")
    print(json.dumps(settings, indent=2, ensure_ascii=False) if args.json else text or parameters_text(settings))
    console.info(f"rerun with: minidepth generate --from {args.png}")
    return 0


def cmd_schedulers(args, console: Console) -> int:
    print(schedulers_table())
    return 0


def cmd_download(args, console: Console) -> int:
    if Path(args.model).expanduser().is_dir():
        raise CLIError(f"--model {args.model} is already a local folder; pass it to --model directly", code=2)
    folder = download(args.model, Path(args.dir) if args.dir else None, args.variant, args.revision)
    print(folder)
    console.info(f"use it with: minidepth generate --model {args.dir or args.model} ...")
    return 0


def download(repo_id: str, folder: Path | None, variant: str | None, revision: str | None) -> Path:
    """Only the files the pipeline reads (see `checkpoints.hub`): into the Hugging Face cache (where `--model <repo
    id>` finds them again) when `folder` is None, else into that plain folder."""
    from ..checkpoints.hub import download_checkpoint
    try:
        root = download_checkpoint(repo_id, variant=variant, revision=revision, local_dir=folder)
    except Exception as e:  # no connection, unknown repo, gated model, offline mode, ...
        raise CLIError(hub_error(repo_id, e, downloading=True)) from e
    if not (root / "model_index.json").is_file():
        raise CLIError(f"{repo_id} has no model_index.json: not a diffusers checkpoint")
    return root


COMMANDS = {"generate": cmd_generate, "depth": cmd_depth, "info": cmd_info, "schedulers": cmd_schedulers,
            "download": cmd_download}


def run_subcommand(args, console) -> int:
    """A subcommand of its own module (cli_args.SUBCOMMAND_MODULES), imported only now."""
    return importlib.import_module(SUBCOMMAND_MODULES[args.command], __package__).run(args, console)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"minidepth {args.command}"
    console = Console(prog, getattr(args, "quiet", False))
    try:
        return COMMANDS.get(args.command, run_subcommand)(args, console)
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
