"""The training loop: one optimizer step = `grad_accum` micro-steps of `batch_size` samples (all processes together),
AdamW on the LoRA parameters only, warm-up then constant or cosine learning rate, gradient clipping.

Many processes (torchrun: RANK, WORLD_SIZE, LOCAL_RANK): the UNet (and the text encoder when it trains) is wrapped in
DistributedDataParallel (NCCL on GPUs, gloo on the CPU; GPU = LOCAL_RANK). Sample j of a micro-step goes to process
j // (batch_size / W), and its crop, timestep and noise come from the generator of (seed, step, j) (data.py), so the
samples are the same for any W. Each process backpropagates

    sum over its samples of loss_j  ×  W / G          (G = batch_size × grad_accum, the global batch)

and DDP averages the gradients over the W processes: (1/W) Σ_processes (W/G) Σ_its samples ∇loss_j = (1/G) Σ_j ∇loss_j,
the gradient of the global batch's mean loss, whatever W is. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import lora
from ..console import Console
from . import objective, state
from .data import DepthCache, fingerprint, load_sample, sample_generator, sample_order, scan_folder
from ..checkpoints.depth_models import depth_model_key
from .config import TrainConfig, TrainError, check_config, check_outputs


@dataclass
class TrainResult:
    out: Path                       # the LoRA file
    history: list[dict]             # per step: step, loss, lr, seconds
    checkpoints: list[Path]         # the checkpoint folders written by this run
    pipeline: object                # the pipeline, with the trained adapter "trained" active


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))


def learning_rate_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, then 1 (constant) or half a cosine down to 0 (diffusers'
    get_cosine_schedule_with_warmup: 0.5 (1 + cos(pi · progress)))."""
    if step < config.warmup_steps:
        return step / max(1, config.warmup_steps)
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------------------ memory
def enable_gradient_checkpointing(unet) -> None:
    """Recompute each down / mid / up block in the backward pass instead of keeping its activations
    (torch.utils.checkpoint, non-reentrant). Set on the block instances: the model files are unchanged."""
    from torch.utils.checkpoint import checkpoint
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        block.forward = functools.partial(checkpoint, type(block).forward.__get__(block), use_reentrant=False)


def disable_gradient_checkpointing(unet) -> None:
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        block.__dict__.pop("forward", None)


# ------------------------------------------------------------------------------------------------ setup
def _load(config: TrainConfig, device: torch.device, console: Console):
    from ..checkpoints.depth_models import DEFAULT, load_depth_model
    if not isinstance(config.model, (str, os.PathLike)):  # an already loaded pipeline; `depth_model` replaces its own
        if config.depth_model not in (None, DEFAULT):
            config.model.depth_estimator, config.model.feature_extractor = load_depth_model(config.depth_model,
                                                                                            device=device)
        return config.model
    from ..pipeline import StableDiffusionDepth2ImgPipeline
    console.info(f"loading {config.model} on {device}")
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(str(config.model), device=device,
                                                            depth_estimator=config.depth_model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _device(config: TrainConfig, world: int, local_rank: int) -> torch.device:
    name = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA device is available")
    if name == "cuda":
        torch.cuda.set_device(local_rank if world > 1 else torch.cuda.current_device())
        return torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if config.mixed_precision == "fp16":
        raise TrainError("--mixed-precision fp16 needs a CUDA GPU (bf16 also runs on CPUs, slowly)")
    return torch.device(name)


def train_lora(config: TrainConfig | None = None, *, console: Console | None = None, **kwargs) -> TrainResult:
    """Check everything (TrainError before anything is written), load the model, train, write the outputs."""
    config = dataclasses.replace(config, **kwargs) if config is not None else TrainConfig(**kwargs)
    rank, world, local_rank = distributed()
    console = console or Console("minidepth train-lora", quiet=not config.progress)
    if rank != 0:
        console = Console(console.prog, quiet=True)  # one process speaks (warnings included: they are the same)
    check_config(config, world)
    check_outputs(config)
    examples = scan_folder(config.data, config.allow_empty_captions, console.warn if rank == 0 else None,
                           config.max_pixels)
    if config.resume:
        state.check_resume(config)
    device = _device(config, world, local_rank)
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(config, examples, device, rank, world, console)
    finally:
        if world > 1:
            import torch.distributed as dist
            dist.destroy_process_group()


def _train(config: TrainConfig, examples, device, rank: int, world: int, console: Console) -> TrainResult:
    from ..schedulers import DDPMScheduler
    pipe = _load(config, device, console)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training noise schedule (as diffusers')
    model_name = str(config.model) if isinstance(config.model, (str, os.PathLike)) else type(config.model).__name__
    settings = state.run_settings(config, model_name, fingerprint(examples), scheduler.config.prediction_type)
    saved = state.check_resume(config, settings) if config.resume else None

    cache = DepthCache(config.depth_cache_path, depth_model_key(config.depth_model))
    missing = cache.missing(examples)
    if missing and getattr(pipe, "depth_estimator", None) is None:
        raise TrainError(f"{len(missing)} photo(s) need a depth map ({missing[0].image.name}, ...) but the pipeline has "
                         "no depth estimator; add NAME.depth.png files")
    if rank == 0 and missing:  # the only files written before training: the DPT's depth maps
        cache.estimate(examples, pipe, progress=config.progress)
    _barrier(world)

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)
    if half is not None:
        for model in (pipe.unet, pipe.vae, pipe.text_encoder):
            model.to(half)  # frozen weights in 16 bits; the LoRA weights are added in float32 below
    for model in (pipe.unet, pipe.text_encoder, pipe.vae):
        lora.remove_adapters(model, objective.ADAPTER)  # a pipeline trained before: start again
    pipe.vae.requires_grad_(False)
    params = objective.add_trainable_lora(pipe.unet, objective.target_layers(pipe.unet, config.targets),
                                          config.rank, config.alpha, config.seed, "unet")
    if config.train_text_encoder:
        params += objective.add_trainable_lora(pipe.text_encoder, objective.text_target_layers(pipe.text_encoder),
                                               config.rank, config.alpha, config.seed, "text_encoder")
    else:
        pipe.text_encoder.requires_grad_(False)
    if config.grad_checkpointing:
        enable_gradient_checkpointing(pipe.unet)
    unet, text_encoder = pipe.unet, pipe.text_encoder
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [device.index] if device.type == "cuda" else None
        unet = DDP(unet, device_ids=ids)
        if config.train_text_encoder:
            text_encoder = DDP(text_encoder, device_ids=ids)

    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(learning_rate_factor, config=config))
    scaler = torch.amp.GradScaler(device.type, enabled=config.mixed_precision == "fp16")
    history, start = [], 0
    if saved is not None:
        start, history = _restore(config, pipe, optimizer, schedule, scaler)
        console.info(f"resuming at step {start} from {state.find_checkpoint(config.resume)}")

    written = []
    try:
        run = TrainingRun(config, pipe, examples, cache, scheduler, device, rank, world, unet, text_encoder, half)
        _loop(run, start, optimizer, schedule, scaler, params, history, settings, written, console)
        if rank == 0:
            state.write_lora(config.out_path, pipe.unet, pipe.text_encoder, config.format)
            if config.plot_path is not None:
                state.plot_losses(config.plot_path, history)
            console.info(f"wrote {config.out_path}" + (f" and {config.plot_path}" if config.plot_path else ""))
        _barrier(world)
    finally:
        disable_gradient_checkpointing(pipe.unet)
    return TrainResult(config.out_path, history, written, pipe)


def _restore(config, pipe, optimizer, schedule, scaler) -> tuple[int, list[dict]]:
    payload = state.load_checkpoint(state.find_checkpoint(config.resume))
    current = {**{f"unet.{k}": v for k, v in objective.lora_parameters(pipe.unet).items()},
               **{f"text_encoder.{k}": v for k, v in objective.lora_parameters(pipe.text_encoder).items()}}
    if set(current) != set(payload["lora"]):
        raise TrainError(f"--resume: the checkpoint's LoRA layers differ from this run's ({len(payload['lora'])} "
                         f"tensors, expected {len(current)})")
    with torch.no_grad():
        for name, p in current.items():
            p.copy_(payload["lora"][name])
    optimizer.load_state_dict(payload["optimizer"])
    schedule.load_state_dict(payload["lr_scheduler"])
    if payload.get("scaler"):
        scaler.load_state_dict(payload["scaler"])
    state.set_rng_states(payload["rng"])
    return payload["step"], list(payload["history"])


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


# ------------------------------------------------------------------------------------------------ the steps
@dataclass
class TrainingRun:
    config: TrainConfig
    pipe: object
    examples: list
    cache: DepthCache
    scheduler: object
    device: torch.device
    rank: int
    world: int
    unet: torch.nn.Module              # DDP-wrapped under torchrun
    text_encoder: torch.nn.Module      # DDP-wrapped under torchrun when it trains
    half: torch.dtype | None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.half) if self.half else contextlib.nullcontext()

    def micro_batch_loss(self, step: int, order: list[int], indices: range) -> torch.Tensor:
        """The (b,) losses of this process's samples `indices` (positions in the step's global batch)."""
        from ..depth import prepare_depth_map
        c, pipe = self.config, self.pipe
        generators = [sample_generator(c.seed, step, j) for j in indices]
        chosen = [self.examples[order[j]] for j in indices]
        items = [load_sample(e, c.resolution, c.crop, g, self.cache) for e, g in zip(chosen, generators)]
        pixels = torch.stack([px for px, _ in items]).to(self.device)
        depth = torch.cat([prepare_depth_map(px, depth_map=d, batch_size=1, dtype=torch.float32, device=self.device,
                                             vae_scale_factor=pipe.vae_scale_factor) for px, d in items])
        latent = (pipe.vae.config.latent_channels, c.resolution // pipe.vae_scale_factor,
                  c.resolution // pipe.vae_scale_factor)
        draws = objective.draw(generators, latent, self.scheduler.config.num_train_timesteps, c.caption_dropout,
                               c.noise_offset)
        captions = ["" if drop else e.caption for e, drop in zip(chosen, draws.drop_caption)]
        with self.autocast():
            x0 = objective.encode_latents(pipe.vae, pixels.to(next(pipe.vae.parameters()).dtype), draws.posterior_eps).float()
            with torch.set_grad_enabled(c.train_text_encoder):
                text = objective.encode_text(self.text_encoder, pipe.tokenizer, captions, self.device)
            return objective.per_sample_loss(self.unet, self.scheduler, x0, depth, text, draws, c.snr_gamma)


def _loop(run: TrainingRun, start: int, optimizer, schedule, scaler, params, history, settings, written, console) -> None:
    from tqdm.auto import tqdm
    c, world = run.config, run.world
    per_process = c.batch_size // world
    bar = tqdm(total=c.steps, initial=start, desc="train", unit="step", disable=not c.progress or run.rank != 0)
    for step in range(start, c.steps):
        began = time.perf_counter()
        order = sample_order(len(run.examples), c.seed, step * c.global_batch, c.global_batch)
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64, device=run.device)
        for m in range(c.grad_accum):
            first = m * c.batch_size + run.rank * per_process
            sync = world == 1 or m == c.grad_accum - 1
            contexts = [] if sync else [run.unet.no_sync()] + \
                ([run.text_encoder.no_sync()] if c.train_text_encoder else [])
            with contextlib.ExitStack() as stack:
                for context in contexts:
                    stack.enter_context(context)
                losses = run.micro_batch_loss(step, order, range(first, first + per_process))
                scaler.scale(losses.sum() * (world / c.global_batch)).backward()
            total += losses.detach().double().sum()
        if world > 1:
            import torch.distributed as dist
            dist.all_reduce(total)
        scaler.unscale_(optimizer)
        if c.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
        lr = schedule.get_last_lr()[0]
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        loss = float(total) / c.global_batch
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss} at step {step + 1}; lower --lr (or use bf16)")
        history.append({"step": step + 1, "loss": loss, "lr": lr, "seconds": time.perf_counter() - began})
        bar.set_postfix(loss=f"{loss:.4f}", s_step=f"{history[-1]['seconds']:.2f}")
        bar.update()
        if run.rank == 0:
            if c.log:
                state.write_log(Path(c.log), history)
            if c.save_every and (step + 1) % c.save_every == 0:
                written.append(_checkpoint(run, step + 1, optimizer, schedule, scaler, history, settings))
    bar.close()


def _checkpoint(run: TrainingRun, step: int, optimizer, schedule, scaler, history, settings) -> Path:
    pipe = run.pipe
    lora_state = {**{f"unet.{k}": v.detach().cpu().clone() for k, v in objective.lora_parameters(pipe.unet).items()},
                  **{f"text_encoder.{k}": v.detach().cpu().clone()
                     for k, v in objective.lora_parameters(pipe.text_encoder).items()}}
    payload = {"lora": lora_state, "optimizer": optimizer.state_dict(), "lr_scheduler": schedule.state_dict(),
               "scaler": scaler.state_dict() if scaler.is_enabled() else {}, "rng": state.rng_states(),
               "history": history, "step": step, "samples_seen": step * run.config.global_batch}
    return state.save_checkpoint(run.config.checkpoints_path, step, settings, step * run.config.global_batch,
                                 payload, pipe.unet, pipe.text_encoder)
