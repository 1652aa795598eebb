"""The settings of a LoRA training run, their checks, and the `minidepth train-lora` command line. No torch here:
option values, the data folder and the outputs are checked before a model loads.

Which settings change the result (`RESULT_FIELDS`) is what a resumed run must share with the run it continues; the
others (where files go, how often to save, memory switches, the device) may differ between the two.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..cli_args import CLIError

TARGETS = ("attn", "attn+ff", "all")
SCHEDULES = ("cosine", "constant")
CROPS = ("center", "random")
FORMATS = ("diffusers", "kohya")
PRECISIONS = ("no", "bf16", "fp16")


class TrainError(ValueError):
    """Bad training input, reported before any training starts (and before anything is written). `code`: the exit
    status of the command (2: a bad option value, 1: missing or unreadable files, another run's checkpoint)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


@dataclass
class TrainConfig:
    model: str = "sd2-community/stable-diffusion-2-depth"  # checkpoint folder or Hub repo id (or a loaded pipeline)
    data: str = ""                      # image folder: NAME.png + NAME.txt, or metadata.jsonl; NAME.depth.png optional
    out: str = "lora.safetensors"       # the trained LoRA
    resolution: int = 512               # square training crops of this side (multiple of 8)
    crop: str = "center"                # center or random (the shorter side is resized to `resolution` first)
    steps: int = 1000                   # optimizer steps
    batch_size: int = 1                 # samples per micro-step, all processes together
    grad_accum: int = 1                 # micro-steps per optimizer step: global batch = batch_size × grad_accum
    lr: float = 1e-4
    weight_decay: float = 1e-2          # AdamW's decoupled weight decay (Loshchilov & Hutter 2019)
    lr_schedule: str = "constant"       # constant or cosine, after `warmup_steps` of linear warm-up
    warmup_steps: int = 0
    max_grad_norm: float = 1.0          # clip the global gradient norm (0: no clipping)
    rank: int = 4
    alpha: float | None = None          # LoRA alpha (scale = alpha / rank); None: alpha = rank
    targets: str = "attn"               # attn | attn+ff | all (all: also ResNet and sampler convs, LoCon)
    train_text_encoder: bool = False
    snr_gamma: float | None = None      # min-SNR weighting (Hang et al. 2023); 5.0 is the paper's value
    noise_offset: float = 0.0
    caption_dropout: float = 0.0        # probability of training a sample with the empty caption (for guidance)
    seed: int = 0
    mixed_precision: str = "no"         # no | bf16 | fp16 (fp16: CUDA only)
    grad_checkpointing: bool = False
    save_every: int = 0                 # checkpoint every N steps into `checkpoints` (0: never)
    checkpoints: str | None = None      # default: OUT's folder / <out stem>-checkpoints
    resume: str | None = None           # a checkpoint folder (step-000100) or the checkpoints folder (the latest)
    log: str | None = None              # CSV: step, loss, lr, seconds
    plot: str | None = None             # loss curve PNG; default: <out stem>-loss.png beside OUT ("" for none)
    depth_cache: str | None = None      # estimated depth maps; default: <out stem>-depth-cache beside OUT
    format: str = "diffusers"           # diffusers or kohya
    allow_empty_captions: bool = False
    overwrite: bool = False
    device: str | None = None           # default: cuda:LOCAL_RANK when CUDA is present, else cpu
    progress: bool = True

    # ------------------------------------------------------------------------------------------ derived paths
    @property
    def out_path(self) -> Path:
        return Path(self.out)

    def _beside_out(self, suffix: str) -> Path:
        return self.out_path.with_name(self.out_path.stem + suffix)

    @property
    def checkpoints_path(self) -> Path:
        return Path(self.checkpoints) if self.checkpoints else self._beside_out("-checkpoints")

    @property
    def plot_path(self) -> Path | None:
        return None if self.plot == "" else Path(self.plot) if self.plot else self._beside_out("-loss.png")

    @property
    def depth_cache_path(self) -> Path:
        return Path(self.depth_cache) if self.depth_cache else self._beside_out("-depth-cache")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum

    def result_settings(self) -> dict:
        """The settings that change the trained LoRA (a resumed run must repeat them)."""
        return {f: getattr(self, f) for f in RESULT_FIELDS}


RESULT_FIELDS = ("resolution", "crop", "steps", "batch_size", "grad_accum", "lr", "weight_decay", "lr_schedule",
                 "warmup_steps", "max_grad_norm", "rank", "alpha", "targets", "train_text_encoder", "snr_gamma",
                 "noise_offset", "caption_dropout", "seed", "mixed_precision", "allow_empty_captions")


def check_config(c: TrainConfig, world: int = 1) -> None:
    """Every setting on its own (TrainError naming the option); data and files are checked by data.py / state.py."""
    def bad(option, accepted):
        raise TrainError(f"--{option.replace('_', '-')} {getattr(c, option)!r}: must be {accepted}", code=2)

    if not isinstance(c.resolution, int) or c.resolution < 8 or c.resolution % 8:
        bad("resolution", "a multiple of 8 (the autoencoder shrinks images 8 times), at least 8")
    for name in ("steps", "batch_size", "grad_accum", "rank"):
        if not isinstance(getattr(c, name), int) or getattr(c, name) < 1:
            bad(name, "an integer >= 1")
    for name, value, ok, accepted in (("crop", c.crop, CROPS, CROPS), ("lr_schedule", c.lr_schedule, SCHEDULES,
                                      SCHEDULES), ("targets", c.targets, TARGETS, TARGETS),
                                      ("format", c.format, FORMATS, FORMATS),
                                      ("mixed_precision", c.mixed_precision, PRECISIONS, PRECISIONS)):
        if value not in ok:
            bad(name, "one of " + ", ".join(accepted))
    for name in ("lr",):
        if not (isinstance(c.lr, (int, float)) and math.isfinite(c.lr) and c.lr > 0):
            bad(name, "a positive number")
    for name in ("weight_decay", "max_grad_norm", "noise_offset"):
        value = getattr(c, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            bad(name, "a number >= 0")
    if not 0 <= c.caption_dropout <= 1:
        bad("caption_dropout", "a probability in [0, 1]")
    if c.snr_gamma is not None and not (math.isfinite(c.snr_gamma) and c.snr_gamma > 0):
        bad("snr_gamma", "a positive number (5.0 in the paper)")
    if c.alpha is not None and not (math.isfinite(c.alpha) and c.alpha > 0):
        bad("alpha", "a positive number")
    if not isinstance(c.warmup_steps, int) or not 0 <= c.warmup_steps <= c.steps:
        bad("warmup_steps", f"an integer in [0, --steps {c.steps}]")
    if not isinstance(c.save_every, int) or c.save_every < 0:
        bad("save_every", "an integer >= 0 (0: no checkpoints)")
    if not isinstance(c.seed, int) or not 0 <= c.seed < 2 ** 63:
        bad("seed", "an integer >= 0")
    if c.batch_size % world:
        raise TrainError(f"--batch-size {c.batch_size} cannot be split evenly over {world} processes; use a multiple "
                         f"of {world} (each process takes batch_size / {world} samples per micro-step)")
    if c.out_path.suffix != ".safetensors":
        raise TrainError(f"--out {c.out}: the LoRA is written as safetensors; use a .safetensors name", code=2)


def check_outputs(c: TrainConfig) -> None:
    """Outputs that exist are replaced only with --overwrite (a resumed run may rewrite its own log)."""
    outputs = [("--out", c.out_path), ("--log", Path(c.log) if c.log else None), ("--plot", c.plot_path)]
    for option, path in outputs:
        if path is None:
            continue
        if path.is_dir():
            raise TrainError(f"{option} {path} is a folder; give a file name")
        if path.exists() and not c.overwrite and not (c.resume and option == "--log"):
            raise TrainError(f"{option} {path} already exists; pass --overwrite to replace it")
        if not _writable_folder(path.parent):
            raise TrainError(f"{option} {path}: cannot write in {path.parent or '.'}")
    if c.plot_path is not None and c.plot_path.suffix.lower() != ".png":
        raise TrainError(f"--plot {c.plot}: the loss curve is a PNG; use a .png name")


def _writable_folder(folder: Path) -> bool:
    folder = folder if str(folder) else Path(".")
    while not folder.exists():
        folder = folder.parent
    return folder.is_dir() and os.access(folder, os.W_OK)


# ------------------------------------------------------------------------------------------------ command line
def add_parser(sub, formatter_class) -> None:
    d = TrainConfig()
    p = sub.add_parser("train-lora", formatter_class=formatter_class,
                       help="fine-tune a LoRA on your photos (with their depth), one process or torchrun",
                       description="Train a LoRA of the depth-conditioned UNet (and optionally the text encoder) on "
                                   "a folder of images with captions (NAME.txt, or metadata.jsonl with file_name and "
                                   "text) and optional 16-bit depth maps (NAME.depth.png; otherwise the checkpoint's "
                                   "DPT estimates them once and caches them). The result loads with "
                                   "load_lora_weights in diffusers and minidepth. Under torchrun the result does not "
                                   "depend on the number of processes.")
    p.add_argument("--model", default=d.model, metavar="PATH_OR_REPO_ID", help="checkpoint folder or Hub repo id")
    p.add_argument("--data", required=True, metavar="DIR", help="the image folder")
    p.add_argument("--out", required=True, metavar="FILE.safetensors", help="the trained LoRA")
    p.add_argument("--format", choices=FORMATS, default=d.format,
                   help="diffusers (unet.*.lora_A/lora_B, alphas in the metadata) or kohya (lora_unet_*)")
    p.add_argument("--resolution", type=int, default=d.resolution, help="side of the square training crops")
    p.add_argument("--crop", choices=CROPS, default=d.crop, help="after resizing the shorter side to --resolution")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="samples per micro-step over all processes (a multiple of the number of processes)")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-steps per optimizer step")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--lr-schedule", choices=SCHEDULES, default=d.lr_schedule, help="after the warm-up")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up from 0")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping (0: none)")
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA rank")
    p.add_argument("--alpha", type=float, help="LoRA alpha, scale = alpha / rank (default: the rank, scale 1)")
    p.add_argument("--targets", choices=TARGETS, default=d.targets,
                   help="attn: attention projections; attn+ff: and feed-forward and proj_in/out; all: and the "
                        "ResNet and sampler convolutions (LoCon)")
    p.add_argument("--train-text-encoder", action="store_true", help="also LoRA on the text encoder's attention")
    p.add_argument("--snr-gamma", type=float, help="min-SNR loss weighting (Hang et al. 2023), e.g. 5.0")
    p.add_argument("--noise-offset", type=float, default=d.noise_offset, help="e.g. 0.05")
    p.add_argument("--caption-dropout", type=float, default=d.caption_dropout,
                   help="probability of an empty caption (keeps classifier-free guidance working)")
    p.add_argument("--allow-empty-captions", action="store_true",
                   help="train images without a caption with the empty caption (default: an error)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--mixed-precision", choices=PRECISIONS, default=d.mixed_precision,
                   help="autocast precision (bf16 / fp16 on GPUs; the LoRA weights stay float32)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute the UNet blocks in the backward pass: less memory, ~30%% more time")
    p.add_argument("--save-every", type=int, default=d.save_every, metavar="N",
                   help="write a checkpoint (LoRA, optimizer, random states, data position) every N steps")
    p.add_argument("--checkpoints", metavar="DIR", help="checkpoint folder (default: <out stem>-checkpoints)")
    p.add_argument("--resume", metavar="DIR", help="continue from a checkpoint (step-N folder, or the checkpoints "
                                                   "folder for its latest); same settings required")
    p.add_argument("--log", "--log-csv", dest="log", metavar="FILE.csv",
                   help="CSV with step, loss, lr, seconds (under torchrun write --log-csv: torchrun's own parser "
                        "takes --log for its --log-dir)")
    p.add_argument("--plot", metavar="FILE.png", help="loss curve (default: <out stem>-loss.png; '' for none)")
    p.add_argument("--depth-cache", metavar="DIR", help="estimated depth maps (default: <out stem>-depth-cache)")
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], help="default: cuda (LOCAL_RANK) when present")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def config_from_args(args) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return TrainConfig(**values, progress=not args.quiet)


def run(args, console) -> int:
    """`minidepth train-lora`: check everything, then train (minidepth/train/loop.py)."""
    config = config_from_args(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        check_config(config, world)
        check_outputs(config)
        from .data import scan_folder
        scan_folder(config.data, config.allow_empty_captions, console.warn if int(os.environ.get("RANK", "0")) == 0
                    else None)
        from .state import check_resume
        if config.resume:
            check_resume(config)
    except TrainError as e:
        raise CLIError(str(e), code=e.code) from e
    from ..cli_model import resolve_model
    config.model = str(resolve_model(config.model))  # a folder, or the Hub repo id downloaded / found in the cache
    from .loop import train_lora
    try:
        result = train_lora(config, console=console)
    except TrainError as e:
        raise CLIError(str(e), code=e.code) from e
    if int(os.environ.get("RANK", "0")) == 0:
        print(result.out, flush=True)
    return 0
