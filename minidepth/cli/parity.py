"""`minidepth parity`: the stage-by-stage parity report against diffusers, on the command line.

    minidepth parity --model weights/sd2-depth --image photo.jpg --prompt "a red house" --steps 4 --json parity.json

Exit status: 0 when every stage is within tolerance, 1 when one is not, 2 on bad usage (an option value, a missing
image or checkpoint, or diffusers/transformers not installed). The work is done by `minidepth.parity.compare`; nothing
here imports torch, so `minidepth --help` stays quick.
"""

from __future__ import annotations

import sys
from pathlib import Path

DESCRIPTION = (
    "Run minidepth on --model and diffusers on --reference-model (default: the same checkpoint) with the same photo, "
    "prompt and seeded generators, and compare every stage: token ids, text embeddings, the DPT depth estimate, the "
    "depth channel, the posterior sample, the noised latents, each denoising step's UNet output and latents, and the "
    "decoded image. A stage is within tolerance when max|ours - ref| <= tolerance * max|ref|; defaults: 0 (exact) on "
    "the CPU, 1e-4 in fp32 and 1e-2 in fp16/bf16 on GPUs. At the first stage beyond tolerance, that network is rerun "
    "on both sides with forward hooks and the first differing module is named. Exit status: 0 all within tolerance, "
    "1 a stage is not, 2 bad usage. Needs the reference libraries: pip install \"minidepth[parity]\".")


def add_parser(sub, formatter_class) -> None:
    """Register the `parity` subcommand (called by `cli_args.build_parser`, like every subcommand module)."""
    p = sub.add_parser("parity", formatter_class=formatter_class, description=DESCRIPTION,
                       help="compare every stage with diffusers (a parity report)")
    p.add_argument("--model", required=True, metavar="PATH_OR_REPO_ID", help="the checkpoint minidepth runs")
    p.add_argument("--reference-model", metavar="PATH_OR_REPO_ID",
                   help="the checkpoint diffusers runs (default: --model)")
    p.add_argument("--image", required=True, metavar="IN", help="input photo (sides are floored to multiples of 8)")
    p.add_argument("--prompt", required=True, metavar="TEXT")
    p.add_argument("--negative-prompt", metavar="TEXT")
    p.add_argument("--steps", type=int, default=10, help="scheduler steps for the full schedule")
    p.add_argument("--strength", type=float, default=0.8, help="int(steps * strength) steps run, in (0, 1]")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--scheduler", metavar="NAME",
                   help="a `generate --scheduler` name (see `minidepth schedulers`); default: the checkpoint's own")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's eta")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], default="cpu")
    p.add_argument("--tolerance", type=float, metavar="T",
                   help="allowed max relative difference for every stage (default: per device and dtype, see above)")
    p.add_argument("--fast", action="store_true",
                   help="run minidepth with its default fast CPU kernels instead of exact mode (default tolerance "
                        "then 1e-3): how far the default is from diffusers")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON ({\"stages\": [...], ...})")
    p.add_argument("--save-diff", metavar="PNG", help="write a heat map of |difference| of the decoded image")
    p.add_argument("--overwrite", action="store_true", help="replace --json / --save-diff files that exist")
    p.add_argument("--quiet", "-q", action="store_true", help="no information lines on stderr")


def _check(args, cli) -> None:
    """Everything that needs no model, as CLIError with exit status 2."""
    def bad(message):
        raise cli.CLIError(message, code=2)
    if args.steps < 1:
        bad(f"--steps {args.steps}: must be at least 1")
    if not 0 < args.strength <= 1:
        bad(f"--strength {args.strength}: must be in (0, 1]")
    if int(args.steps * args.strength) < 1:
        bad(f"--steps {args.steps} with --strength {args.strength} runs no denoising step (int(steps * strength) "
            "= 0); raise either")
    if args.tolerance is not None and not args.tolerance >= 0:
        bad(f"--tolerance {args.tolerance}: must be >= 0")
    if args.scheduler is not None and args.scheduler not in cli.SCHEDULERS:
        bad(f"--scheduler {args.scheduler}: one of {', '.join(cli.SCHEDULERS)}")
    if not Path(args.image).is_file():
        bad(f"--image: image file not found: {args.image}")
    for option, path in (("--json", args.json), ("--save-diff", args.save_diff)):
        if path is None:
            continue
        if not Path(path).resolve().parent.is_dir():
            bad(f"{option} {path}: the folder {Path(path).parent} does not exist")
        if Path(path).exists() and not args.overwrite:
            bad(f"{option} {path}: the file exists; pass --overwrite to replace it")


def run(args, console=None) -> int:
    """The `parity` subcommand: print the table (stdout) and the verdict; 0 / 1 / 2 as described above."""
    from . import command as cli
    info = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    _check(args, cli)
    from .. import parity
    try:
        versions = parity.require_references()
    except parity.ReferenceMissing as e:
        raise cli.CLIError(str(e), code=2) from None
    parity.quiet_loading()
    for name, pinned in parity.REFERENCE_VERSIONS.items():
        if versions[name] != pinned:
            print(f"minidepth parity: warning: {name} {versions[name]} is installed; minidepth's parity is checked "
                  f"against {pinned} (pip install \"minidepth[parity]\")", file=sys.stderr)
    try:
        model = cli.resolve_model(args.model)
        reference = cli.resolve_model(args.reference_model) if args.reference_model else None
    except cli.CLIError as e:
        raise cli.CLIError(str(e), code=2) from None
    cli.pick_device(args.device)
    try:
        from PIL import Image, UnidentifiedImageError
        Image.open(args.image).verify()
    except (OSError, UnidentifiedImageError) as e:
        raise cli.CLIError(f"--image {args.image}: not a readable image ({e})", code=2) from None
    info(f"running minidepth on {model} and diffusers {versions['diffusers']} on {reference or model} "
         f"({args.dtype}, {args.device}) ...")
    report = parity.compare(model, reference, image=args.image, prompt=args.prompt,
                            negative_prompt=args.negative_prompt, steps=args.steps, strength=args.strength,
                            guidance_scale=args.guidance, eta=args.eta, scheduler=args.scheduler, seed=args.seed,
                            dtype=args.dtype, device=args.device, tolerance=args.tolerance, fast=args.fast)
    print(report.table())
    print(report.summary())
    if args.json:
        report.save_json(args.json)
        info(f"wrote {args.json}")
    if args.save_diff:
        top = report.save_diff(args.save_diff)
        info(f"wrote {args.save_diff} (white = the largest difference, {top:.3g})")
    return 0 if report.ok else 1
