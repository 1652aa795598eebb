"""`minidepth convert`: the original single file <-> a diffusers folder; the direction follows from SOURCE.

    minidepth convert 512-depth-ema.safetensors --out sd2-depth            # -> a folder diffusers loads
    minidepth convert 512-depth-ema.ckpt --out sd2-depth --fp16            # + the *.fp16.safetensors variant files
    minidepth convert my-finetune/ --out my-finetune.safetensors           # -> one file in the original names

Exit status: 0 done, 1 the conversion failed (a file that is not SD2-depth, a corrupt file, ...), 2 bad usage.
The work is done by `minidepth.checkpoints.single_file`; nothing here imports torch, so `minidepth --help` stays quick.
"""

from __future__ import annotations

from pathlib import Path

DESCRIPTION = (
    "Convert between the original single-file checkpoint (512-depth-ema.safetensors / .ckpt, what AUTOMATIC1111 and "
    "the Stability scripts read) and a diffusers folder (what diffusers and `minidepth generate --model` read). A "
    "file SOURCE becomes a folder --out; a folder SOURCE becomes a single file --out (*.safetensors or *.ckpt). "
    "Writing a single file from a folder: the 12 DDPM schedule buffers are computed from the scheduler config; "
    "OpenCLIP's last block, text_projection, logit_scale, the MiDaS classifier head and the EMA counters are not in "
    "a diffusers folder and are left out (SD2 never uses them; the LDM code and AUTOMATIC1111 load with "
    "strict=False). Pickles (.ckpt) are only read with torch.load(weights_only=True).")


def add_parser(sub, formatter_class) -> None:
    """Register the `convert` subcommand (called by `cli_args.build_parser`, like every subcommand module)."""
    p = sub.add_parser("convert", formatter_class=formatter_class, description=DESCRIPTION,
                       help="original single file <-> diffusers folder")
    p.add_argument("source", metavar="SOURCE", help="a single file (.safetensors/.ckpt) or a diffusers folder")
    p.add_argument("--out", required=True, metavar="TARGET",
                   help="the folder to write (from a file) or the .safetensors/.ckpt file to write (from a folder)")
    p.add_argument("--fp16", action="store_true",
                   help="folder output: also write the *.fp16.safetensors variant files; file output: store fp16")
    p.add_argument("--config", metavar="FOLDER",
                   help="file input: a diffusers-layout folder whose config/tokenizer files to use instead of the "
                        "packaged SD2-depth ones (weights in it are not read)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--quiet", "-q", action="store_true", help="no information lines on stderr")


def _check(args) -> None:
    """Everything that needs no model, as CLIError with exit status 2."""
    from .args import CLIError
    source, out = Path(args.source), Path(args.out)
    if not source.exists():
        raise CLIError(f"SOURCE {source} does not exist", code=2)
    if source.is_dir():
        if not (source / "model_index.json").is_file():
            raise CLIError(f"SOURCE {source} is a folder without model_index.json: not a diffusers checkpoint",
                               code=2)
        if out.suffix not in (".safetensors", ".ckpt"):
            raise CLIError(f"--out {out}: a folder converts to one file; name it *.safetensors or *.ckpt", code=2)
        if out.exists() and not args.overwrite:
            raise CLIError(f"--out {out} exists; pass --overwrite to replace it", code=2)
    else:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise CLIError(f"--out {out} exists and is not an empty folder; choose a new folder", code=2)
    if args.config and not Path(args.config).is_dir():
        raise CLIError(f"--config {args.config} is not a folder", code=2)


def run(args, console) -> int:
    _check(args)
    from ..checkpoints.single_file import convert
    direction = "diffusers folder -> single file" if Path(args.source).is_dir() else "single file -> diffusers folder"
    console.info(f"converting {args.source} ({direction})")
    target = convert(args.source, args.out, fp16=args.fp16, config=args.config)
    print(target)
    return 0
