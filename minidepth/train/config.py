"""The settings of a LoRA training run and their checks. No torch here: option values, the data folder and the
outputs are checked before a model loads (the command line is minidepth/cli/train.py).

Which settings change the result (`RESULT_FIELDS`) is what a resumed run must share with the run it continues; the
others (where files go, how often to save, memory switches, the device) may differ between the two.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..image_files import MAX_PIXELS, check_max_pixels


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
    depth_model: str | None = None      # estimates the depth maps (and is recorded): a name, folder or repo id of
                                        # checkpoints/depth_models.py; None: "dpt-hybrid", the checkpoint's own
    format: str = "diffusers"           # diffusers or kohya
    allow_empty_captions: bool = False
    overwrite: bool = False
    max_pixels: int = MAX_PIXELS        # the size policy (image_files.py): crops of at most this many pixels, image
                                        # and depth files of at most 16 x as many (refused before decoding)
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
    try:
        check_max_pixels(c.max_pixels, "--max-pixels")
    except ValueError as e:
        raise TrainError(str(e), code=2) from e
    if c.resolution ** 2 > c.max_pixels:
        bad("resolution", f"at most {int(c.max_pixels ** 0.5)}: {c.resolution}x{c.resolution} crops are above "
                          f"--max-pixels {c.max_pixels} (raise it for larger crops)")
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
    if c.depth_model is not None:
        from ..checkpoints.depth_models import check_depth_model_name
        try:
            check_depth_model_name(c.depth_model)
        except ValueError as e:
            raise TrainError(f"--depth-model: {e}", code=2) from e
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
