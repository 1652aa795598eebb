"""The `minidepth` command's options: the argument parser, the scheduler table, and the checks that need no model.

Nothing here imports torch: `minidepth --help`, `--version`, `schedulers` and every check in `check_generate` run in a
fraction of a second, before any model is loaded.
"""

from __future__ import annotations

import argparse
import importlib
import math
import numbers
import re

from .. import __version__
from ..image_files import FILE_FACTOR, MAX_PIXELS  # torch-free: the size policy
from ..schedulers.names import A1111_NAMES, SCHEDULER_TABLE, SCHEDULERS  # noqa: F401  (torch-free)
from .errors import CLIError

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-depth"  # = checkpoints.hub.DEFAULT_MODEL_ID (not imported: speed)
MAX_SEED = 2 ** 63 - 1

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DEFAULT_DEPTH_MODEL = "dpt-hybrid"  # = checkpoints.depth_models.DEFAULT (and NAMES below; not imported: speed)
DEPTH_MODELS = (DEFAULT_DEPTH_MODEL, "depth-anything-v2-small", "depth-anything-v2-base", "depth-anything-v2-large")
DEVICES = ["cpu", "cuda", "mps"]

# The subcommands that live in their own module: name -> module with `add_parser(sub, formatter_class)` and
# `run(args, console)`. None of them imports torch (or gradio) at import time, so `minidepth --help` stays quick.
SUBCOMMAND_MODULES = {"batch": ".batch", "tour": ".inside", "parity": ".parity", "convert": ".convert",
                      "serve": ".serve", "train-lora": ".train"}

# generate's settings that `--from IMAGE.png` restores, with their defaults (the parser leaves unset options out)
GENERATE_DEFAULTS = {"image": None, "prompt": None, "negative_prompt": None, "strength": 0.8, "steps": 50,
                     "guidance": 7.5, "seed": None, "scheduler": None, "eta": 0.0, "clip_skip": None, "width": None,
                     "height": None, "depth_map": None, "model": DEFAULT_MODEL, "variant": None, "revision": None,
                     "dtype": "fp32", "mode": "diffusers", "depth_model": None}
LDM_DEFAULTS = {"strength": 0.9, "guidance": 9.0}  # --mode ldm: the original script's defaults (minidepth/ldm_mode.py)
# the pipeline's argument names -> the options that set them (to translate its ValueErrors)
OPTION_OF = {"strength": "--strength", "num_inference_steps": "--steps", "guidance_scale": "--guidance",
             "num_images_per_prompt": "--num-images", "prompt": "--prompt", "negative_prompt": "--negative-prompt",
             "image": "--image", "depth_map": "--depth-map", "eta": "--eta", "clip_skip": "--clip-skip",
             "max_pixels": "--max-pixels"}


# ------------------------------------------------------------------------------------------------ checks, no model
def check_generate(s: dict, num_images: int, num_train_timesteps: int = 1000) -> None:
    """The option values `generate` can check before anything is loaded; CLIError(code=2) naming the option."""
    def bad(option, value, accepted):
        raise CLIError(f"{option} {value}: must be {accepted}", code=2)

    for key, kind in (("strength", STRENGTH), ("steps", STEPS), ("guidance", GUIDANCE), ("seed", SEED),
                      ("eta", ETA), ("clip_skip", CLIP_SKIP), ("width", SIDE), ("height", SIDE)):
        if s.get(key) is not None:  # values of `--from` (a PNG's JSON) or of the page: numbers of the right kind
            try:
                s[key] = kind(s[key])
            except argparse.ArgumentTypeError as e:
                raise CLIError(f"--{key.replace('_', '-')} {e}", code=2) from None
    if not 0 <= s["strength"] <= 1:
        bad("--strength", s["strength"], "a number in [0, 1] (1 repaints everything)")
    if not 1 <= s["steps"] <= num_train_timesteps:
        bad("--steps", s["steps"], f"an integer in [1, {num_train_timesteps}] (the model's training timesteps)")
    if s.get("mode", "diffusers") not in ("diffusers", "ldm"):
        bad("--mode", s["mode"], "diffusers or ldm")
    if s.get("mode") == "ldm":
        if s.get("depth_model") not in (None, DEFAULT_DEPTH_MODEL):
            raise CLIError(f"--depth-model {s['depth_model']} cannot be used with --mode ldm (the original script runs "
                           "MiDaS DPT-Hybrid, its own preprocessing included)", code=2)
        if s["depth_map"]:
            raise CLIError("--depth-map cannot be used with --mode ldm (the original script always estimates the "
                           "depth with MiDaS)", code=2)
        if min(int(s["steps"] * s["strength"]), s["steps"] - 1) < 1:
            raise CLIError(f"--mode ldm: --steps {s['steps']} with --strength {s['strength']} leaves no denoising "
                           "step (min(int(steps * strength), steps - 1) is 0); use at least 2 steps", code=2)
        if (num_train_timesteps - 1) % (num_train_timesteps // s["steps"]) == 0:  # the grid would end at T
            raise CLIError(f"--mode ldm: --steps {s['steps']} makes LDM's timestep grid end past the last training "
                           "timestep (the original script fails there); choose another number of steps", code=2)
    elif int(s["steps"] * s["strength"]) < 1:
        raise CLIError(f"--steps {s['steps']} with --strength {s['strength']} leaves no denoising step "
                       "(int(steps * strength) is 0); raise either of them", code=2)
    if not math.isfinite(s["guidance"]):
        bad("--guidance", s["guidance"], "a finite number (guidance is on when > 1)")
    if num_images < 1:
        bad("--num-images", num_images, "an integer >= 1")
    seed = s["seed"]
    if seed is not None and not (seed == -1 or 0 <= seed <= MAX_SEED - num_images):
        bad("--seed", seed, f"-1 (a random seed) or an integer in [0, {MAX_SEED - num_images}]")
    if not (math.isfinite(s["eta"]) and s["eta"] >= 0):
        bad("--eta", s["eta"], "a number >= 0 (0: deterministic DDIM, 1: DDPM-like noise)")
    if s["clip_skip"] is not None and s["clip_skip"] < 0:
        bad("--clip-skip", s["clip_skip"], "an integer >= 0 (the number of final CLIP layers to skip)")
    for option, value in (("--width", s["width"]), ("--height", s["height"])):
        if value is not None and (value < 8 or value % 8):
            nearest = max(8, round(value / 8) * 8)
            bad(option, value, f"a multiple of 8, at least 8 (e.g. {nearest})")
    if s["scheduler"] is not None and s["scheduler"] not in SCHEDULERS:
        bad("--scheduler", s["scheduler"], f"one of {', '.join(SCHEDULERS)}")
    if s["dtype"] not in DTYPES:
        bad("--dtype", s["dtype"], f"one of {', '.join(DTYPES)}")


def check_attention_slicing(value: str | None) -> str | int | None:
    if value is None or value in ("auto", "max"):
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise CLIError(f"--attention-slicing {value}: must be auto, max or a positive number of heads", code=2)


# ------------------------------------------------------------------------------------------------ numbers
def _shown(value) -> str:
    return value if isinstance(value, str) and value.strip() else repr(value)


def to_integer(value, name: str, accepted: str = "an integer") -> int:
    """`value` as an int: an int, an integral float (30.0: JSON files and the page's number fields send those) or
    its text; ValueError "NAME VALUE: must be ACCEPTED" for anything else (NaN, inf, 2.5, "abc", true, None)."""
    if not isinstance(value, bool):
        if isinstance(value, numbers.Integral):
            return int(value)
        number = value
        if isinstance(value, str):
            text = value.strip()
            if re.fullmatch(r"[+-]?\d+", text):
                return int(text)
            try:
                number = float(text)
            except ValueError:
                number = None
        if isinstance(number, numbers.Real) and math.isfinite(number) and float(number).is_integer():
            return int(number)
    raise ValueError(f"{name} {_shown(value)}: must be {accepted}")


def to_number(value, name: str, accepted: str = "a finite number") -> float:
    """`value` as a finite float (a number or its text); ValueError "NAME VALUE: must be ACCEPTED" for NaN, inf,
    text that is no number, true/false and None."""
    if not isinstance(value, bool):
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        if isinstance(number, numbers.Real) and math.isfinite(number):
            return float(number)
    raise ValueError(f"{name} {_shown(value)}: must be {accepted}")


def integer(accepted: str, minimum: int | None = None):
    """An argparse type: `to_integer`, at least `minimum`; its refusal reads "--steps nan: must be ..." (_Parser)."""
    def parse(text: str) -> int:
        try:
            value = to_integer(text, "", accepted)
        except ValueError:
            value = None
        if value is None or (minimum is not None and value < minimum):
            raise argparse.ArgumentTypeError(f"{text}: must be {accepted}")
        return value
    parse.__name__ = "integer"
    return parse


def number(accepted: str):
    """An argparse type: `to_number` (NaN and inf refused, naming the option)."""
    def parse(text: str) -> float:
        try:
            return to_number(text, "", accepted)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: must be {accepted}") from None
    parse.__name__ = "number"
    return parse


# the option types of generate and batch: a value that is no number of the kind (nan, inf, 2.5 steps) is refused
# while parsing, naming the option; the ranges are check_generate's
STRENGTH = number("a number in [0, 1] (1 repaints everything)")
STEPS = integer("an integer >= 1 (the number of scheduler steps)")
GUIDANCE = number("a finite number (guidance is on when > 1)")
SEED = integer(f"-1 (a random seed) or an integer in [0, {MAX_SEED}]")
ETA = number("a number >= 0 (0: deterministic DDIM, 1: DDPM-like noise)")
CLIP_SKIP = integer("an integer >= 0 (the number of final CLIP layers to skip)")
SIDE = integer("a multiple of 8, at least 8")
COUNT = integer("an integer >= 1")


def max_pixels_option(p) -> None:
    """`--max-pixels N` (generate, depth, batch, serve, train-lora): the size policy of minidepth/image_files.py."""
    p.add_argument("--max-pixels", type=integer("an integer >= 64 (pixels; 8x8 is the smallest image)", 64),
                   default=MAX_PIXELS, metavar="N",
                   help=f"the largest image to generate (or train on), in pixels, after --width/--height where "
                        f"they apply (default: {MAX_PIXELS} = 2048x2048); an input file with more than {FILE_FACTOR} "
                        "times as many pixels is refused before it is decoded (README 'Limits and safety')")


# ------------------------------------------------------------------------------------------------ the parser
class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show "(default: X)" only where there is a default worth showing and the help does not already say it."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        typed = re.fullmatch(r"argument ([^:/ ]+)\S*: (.*?): (must be .*)", message, re.S)  # integer() / number()
        if typed:
            message = f"{typed.group(1)} {typed.group(2)}: {typed.group(3)}"  # "--steps nan: must be ..."
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def depth_model_option(p, restorable: bool = False, default: str | None = None) -> None:
    """`--depth-model NAME_OR_PATH` (generate, depth, batch, serve, train-lora, tour)."""
    p.add_argument("--depth-model", default=argparse.SUPPRESS if restorable else default, metavar="NAME_OR_PATH",
                   help=f"the depth model: {', '.join(DEPTH_MODELS)} (default: {DEFAULT_DEPTH_MODEL}, the checkpoint's "
                        "own, which SD2-depth was trained on), a folder (config.json + weights + "
                        "preprocessor_config.json) or a Hub repo id; README 'Depth models'")


def check_depth_model(name: str | None, option: str = "--depth-model") -> str | None:
    """The offline check of a --depth-model value (a name, a folder, a repo id): CLIError(code=2) saying why not."""
    if name is None:
        return None
    from ..checkpoints.depth_models import check_depth_model_name
    try:
        return check_depth_model_name(name)
    except ValueError as e:
        raise CLIError(f"{option}: {e}", code=2) from e


def _model_options(p, variant_help: str, restorable: bool = False) -> None:
    default = argparse.SUPPRESS if restorable else DEFAULT_MODEL
    p.add_argument("--model", default=default, metavar="PATH_OR_REPO_ID",
                   help=f"checkpoint folder (e.g. made by `minidepth download --dir ...`) or Hugging Face repo id "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--variant", choices=["fp16"], default=argparse.SUPPRESS if restorable else None, help=variant_help)
    p.add_argument("--revision", default=argparse.SUPPRESS if restorable else None,
                   help="Hub branch, tag or commit (repo ids only)")


def _run_options(p, dtype_default) -> None:
    p.add_argument("--dtype", choices=list(DTYPES), default=dtype_default,
                   help="computation precision (default: fp32; fp16/bf16 halve memory, but are slow on a CPU)")
    p.add_argument("--device", choices=DEVICES, help="where to run (default: cuda, else mps, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="no progress bar and no information lines on stderr; warnings, errors and the written file "
                        "names (stdout) remain")


def build_parser() -> argparse.ArgumentParser:
    from .inside import add_generate_options
    parser = _Parser(prog="minidepth", description="Stable Diffusion 2 depth-to-image in plain PyTorch.",
                     epilog="Run `minidepth <command> --help` for the options of each command.")
    parser.add_argument("--version", action="version", version=f"minidepth {__version__}")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{" + ",".join(["generate", "depth", "info", "schedulers", "download",
                                                        *SUBCOMMAND_MODULES]) + "}")
    fmt, unset = _Help, argparse.SUPPRESS  # unset: left out of the namespace, so --from can fill it in

    g = sub.add_parser("generate", formatter_class=fmt, help="make new images that keep a photo's 3-D layout",
                       description="Generate images from a photo and a prompt; the photo's estimated depth map "
                                   "keeps the layout, --strength sets how much of the photo is repainted. The "
                                   "settings are saved in each PNG (AUTOMATIC1111's `parameters` text + JSON): "
                                   "`minidepth info OUT.png` shows them, `generate --from OUT.png` reruns them.")
    g.add_argument("--image", nargs="+", action="extend", default=unset, metavar="IN",
                   help="input photo(s) (any format Pillow reads); with several, --out is a folder")
    g.add_argument("--prompt", default=unset, metavar="TEXT", help="what the new image should show")
    g.add_argument("--negative-prompt", default=unset, metavar="TEXT",
                   help="what it should not show (used when --guidance > 1)")
    g.add_argument("--from", dest="from_png", metavar="PNG",
                   help="rerun the settings saved in a PNG made by `minidepth generate` (prompt, seed, steps, photo, "
                        "...); options given as well override them")
    g.add_argument("--strength", type=STRENGTH, default=unset,
                   help="how much noise is added to the photo, in [0, 1]: 1 repaints everything, small values stay "
                        "close to the photo; int(steps * strength) denoising steps run (default: 0.8; 0.9 with "
                        "--mode ldm)")
    g.add_argument("--steps", type=STEPS, default=unset,
                   help="number of scheduler steps for the full schedule (default: 50)")
    g.add_argument("--guidance", type=GUIDANCE, default=unset,
                   help="classifier-free guidance scale (CFG scale); > 1 follows the prompt more closely, 1 turns "
                        "guidance off (default: 7.5; 9.0 with --mode ldm)")
    g.add_argument("--seed", type=SEED, default=unset,
                   help="random seed for reproducible images; -1 or none: a random one, printed (image i of "
                        "--num-images uses seed + i - 1)")
    g.add_argument("--scheduler", choices=list(SCHEDULERS), default=unset, metavar="NAME",
                   help="sampler: " + ", ".join(SCHEDULERS) + " (default: the checkpoint's own, pndm for "
                        "stable-diffusion-2-depth; `minidepth schedulers` describes them)")
    g.add_argument("--eta", type=ETA, default=unset,
                   help="DDIM's eta: 0 is deterministic, 1 adds DDPM-like noise (ddim only; default: 0)")
    g.add_argument("--clip-skip", type=CLIP_SKIP, default=unset, metavar="N",
                   help="skip the last N CLIP text layers (diffusers' clip_skip; AUTOMATIC1111's 'Clip skip' is N + 1)")
    g.add_argument("--width", type=SIDE, default=unset,
                   help="resize the photo to this width first (multiple of 8; alone: the height follows the aspect "
                        "ratio)")
    g.add_argument("--height", type=SIDE, default=unset, help="resize the photo to this height first (as --width)")
    g.add_argument("--depth-map", default=unset, metavar="FILE",
                   help="use this depth map instead of estimating one: grayscale image (8/16-bit, brighter = nearer, "
                        "e.g. the --raw output of `minidepth depth`) or a .npy (H, W) array")
    g.add_argument("--mode", choices=["diffusers", "ldm"], default=unset,
                   help="diffusers: diffusers' pipeline (default); ldm: Stability's original script (photo padded to "
                        "multiples of 64, LDM's DDIM, guidance 9.0, strength 0.9; --scheduler ignored)")
    g.add_argument("--crop-padding", action="store_true",
                   help="--mode ldm: crop the outputs back to the photo's size (the script keeps the padding)")
    g.add_argument("--num-images", type=COUNT, default=1, metavar="N",
                   help="images per photo; several are saved as OUT-1.png, OUT-2.png, ...")
    _model_options(g, "load the half-precision weight files (auto-detected for folders that only have them)",
                   restorable=True)
    depth_model_option(g, restorable=True)
    _run_options(g, unset)
    max_pixels_option(g)
    g.add_argument("--exact", action="store_true",
                   help="diffusers' kernels: images bit-identical to diffusers' (default: faster CPU kernels for the "
                        "same maths, within 1e-3 of them; see `pipe.set_exact`)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet: the first image compiles (minutes on a CPU); pays on GPUs, was slower than "
                        "the default kernels on a 2-core AMD CPU (benchmarks/README.md)")
    g.add_argument("--attention-slicing", nargs="?", const="auto", metavar="auto|max|N",
                   help="compute attention in slices to save memory (auto: half the heads at a time)")
    g.add_argument("--vae-slicing", action="store_true", help="decode several images one at a time (less memory)")
    g.add_argument("--vae-tiling", action="store_true", help="encode/decode large images in tiles (less memory)")
    g.add_argument("--cpu-offload", action="store_true",
                   help="keep the models on the CPU and move each to the GPU only while it runs (needs cuda/mps)")
    g.add_argument("--out", metavar="PATH", help="output image (default: <image name>-depth2img.png in the current "
                                                 "folder; with several --image: a folder); the extension picks the "
                                                 "format, and PNGs get the settings")
    g.add_argument("--save-depth", action="store_true", help="also save the depth map as a colour image, OUT-depth.png "
                                                              "(near = bright yellow, far = dark purple)")
    g.add_argument("--grid", action="store_true", help="also save photo | depth | output(s) side by side with labels, "
                                                        "OUT-grid.png")
    add_generate_options(g)  # --filmstrip, --attention-maps (minidepth/inside/cli.py)

    d = sub.add_parser("depth", formatter_class=fmt, help="estimate a depth map only (no diffusion)",
                       description="Estimate the relative depth of a photo with the checkpoint's DPT model, or "
                                   "with --depth-model (only the depth model is loaded; another one than "
                                   "dpt-hybrid needs no checkpoint).")
    d.add_argument("--image", required=True, metavar="IN", help="input photo")
    d.add_argument("--out", required=True, metavar="PATH", help="colour depth image (near = bright yellow)")
    d.add_argument("--raw", metavar="PATH", help="also save a 16-bit grayscale PNG (brighter = nearer, min..max -> "
                                                 "0..65535), usable as `generate --depth-map`")
    _model_options(d, "load the half-precision weight file (auto-detected for folders that only have it)")
    depth_model_option(d, default=DEFAULT_DEPTH_MODEL)
    _run_options(d, "fp32")
    max_pixels_option(d)

    i = sub.add_parser("info", formatter_class=fmt, help="show the settings saved in a generated PNG",
                       description="Print the generation settings stored in a PNG (AUTOMATIC1111's `parameters` "
                                   "format; also reads images made by AUTOMATIC1111).")
    i.add_argument("png", metavar="IMAGE.png")
    i.add_argument("--json", action="store_true", help="print minidepth's JSON record instead")

    sub.add_parser("schedulers", formatter_class=fmt, help="list the samplers for --scheduler",
                   description="List the samplers `generate --scheduler` accepts, with AUTOMATIC1111's names.")

    w = sub.add_parser("download", formatter_class=fmt, help="fetch a checkpoint for offline use",
                       description="Download only the files minidepth reads (configs, tokenizer, one weight file "
                                   "per model) and print the folder; pass that folder as --model afterwards.")
    w.add_argument("--model", default=DEFAULT_MODEL, metavar="REPO_ID", help="Hugging Face repo id")
    w.add_argument("--variant", choices=["fp16"], help="download the half-precision weight files instead (half size)")
    w.add_argument("--dir", metavar="FOLDER", help="download into this plain folder (e.g. weights/stable-diffusion-2-"
                                                   "depth) instead of the Hugging Face cache")
    w.add_argument("--revision", help="branch, tag or commit")
    for module in SUBCOMMAND_MODULES.values():  # each: add_parser(sub, formatter_class) and run(args, console)
        importlib.import_module(module, __package__).add_parser(sub, fmt)
    return parser


def schedulers_table() -> str:
    width = max(map(len, SCHEDULER_TABLE)) + 2
    lines = [f"{'name':<{width}}{'AUTOMATIC1111':<17}description"]
    lines += [f"{name:<{width}}{a1111:<17}{text}" for name, (_, _, a1111, text) in SCHEDULER_TABLE.items()]
    return "\n".join(lines)
