"""`minidepth train-lora`: the command line of LoRA training (minidepth/train/; the settings: train/config.py)."""

from __future__ import annotations

import dataclasses
import os

from ..train.config import FORMATS, CROPS, PRECISIONS, SCHEDULES, TARGETS, TrainConfig, TrainError, check_config, check_outputs
from .args import CLIError, depth_model_option, max_pixels_option


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
    p.add_argument("--depth-cache", metavar="DIR", help="estimated depth maps (default: <out stem>-depth-cache; "
                                                        "kept per depth model)")
    depth_model_option(p)
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], help="default: cuda (LOCAL_RANK) when present")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    max_pixels_option(p)


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
        from ..train.data import scan_folder
        scan_folder(config.data, config.allow_empty_captions, console.warn if int(os.environ.get("RANK", "0")) == 0
                    else None, config.max_pixels)
        from ..train.state import check_resume
        if config.resume:
            check_resume(config)
    except TrainError as e:
        raise CLIError(str(e), code=e.code) from e
    from .model import resolve_model
    config.model = str(resolve_model(config.model))  # a folder, or the Hub repo id downloaded / found in the cache
    from ..train.loop import train_lora
    try:
        result = train_lora(config, console=console)
    except TrainError as e:
        raise CLIError(str(e), code=e.code) from e
    if int(os.environ.get("RANK", "0")) == 0:
        print(result.out, flush=True)
    return 0
