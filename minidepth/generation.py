"""One generation path for every front end: checked settings in, images and the record of their settings out.

    from minidepth.generation import Job, generate
    job = Job(prompt="a marble statue", photo=Image.open("photo.jpg"), photo_path="photo.jpg",
              model="weights/stable-diffusion-2-depth", seed=7, steps=30)
    [result] = generate(pipe, [job], device="cpu")
    result.images[0]       # a PIL image
    result.records[0]      # its settings, seed included: what `minidepth generate` writes into the PNG

`minidepth generate`, `minidepth batch` and the page of `minidepth serve` all come here, so the same settings give the
same pixels and the same record in each. A front end parses its input into `Job`s, calls `check` on each before a
model loads, then `generate`, and writes the files (cli/png_metadata.py turns a record into PNG text).

The rules, kept here once:
  - size: the photo is resized to `width` x `height` when they are given (one alone keeps the aspect ratio, rounded to
    multiples of 8); the pipeline then floors the sides to multiples of 8 (LANCZOS), or pads them in ldm mode; that
    size is at most `max_pixels` (2048 x 2048 by default), and a photo or depth-map file above 16 times as many
    pixels is refused from its header, before it is decoded (the size policy: minidepth/image_files.py);
  - seeds: image i of a job is made with its own generator seeded `seed + i`; a job without a seed gets one drawn
    (`resolve_seed`): seeds never depend on the process or on the other jobs of a batch;
  - scheduler: a fresh one for every call (schedulers keep state), by its short name (`schedulers.names`) built from
    the checkpoint's own config, the one the pipeline had when it first came here; `None` is the checkpoint's own;
  - several jobs in one call run as ONE pipeline call (a UNet batch), which needs them to share their settings:
    `groups` says which do;
  - warnings (a photo resized, a depth map stretched, an eta without effect, a scheduler ignored in ldm mode) go to
    the caller's `warn`, in the command line's words (option names); each front end shows them its own way.

torch, PIL and the pipeline are imported inside the functions: the command line imports this module before any check,
and `minidepth --help` must stay quick.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import random
import time
import weakref
from pathlib import Path
from typing import Any, Callable

from .image_files import MAX_PIXELS
from .observers import Observer

Warn = Callable[[str], None]


# ------------------------------------------------------------------------------------------------ the settings
@dataclasses.dataclass(kw_only=True)
class Job:
    """The settings of one generation: one photo and prompt, `num_images` images.

    `photo` is a loaded PIL image in any mode (converted to RGB here); None reads `photo_path` when the job runs (a
    batch of thousands of jobs need not hold every photo in memory). `photo_path` is recorded (resolved, with the
    file's SHA-256) so that `generate --from` finds the photo again. Likewise `depth_map` (an (H, W) array, larger =
    nearer) or None with `depth_map_path` (read when the job runs; None for both: the depth model estimates it).
    `model`, `depth_model` (None: "dpt-hybrid", the checkpoint's own), `variant`, `revision` and `dtype` only go into
    the record: the pipeline is already loaded, with that depth model in its slot.
    `max_pixels`: the size policy (minidepth/image_files.py): images of at most that many pixels, input files of at
    most 16 times as many (refused from their header, before they are decoded); not part of the record."""

    prompt: str
    photo: Any = None
    photo_path: str
    model: str
    depth_model: str | None = None
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    strength: float = 0.8
    steps: int = 50
    guidance: float = 7.5
    seed: int | None = None
    scheduler: str | None = None
    eta: float = 0.0
    clip_skip: int | None = None
    depth_map: Any = None
    depth_map_path: str | None = None
    num_images: int = 1
    mode: str = "diffusers"
    crop_padding: bool = False
    variant: str | None = None
    revision: str | None = None
    dtype: str = "fp32"
    max_pixels: int = MAX_PIXELS


@dataclasses.dataclass
class Result:
    """What one job made. `record` holds the settings without the seed; `records[i]` is image i's, seed included."""

    job: Job
    images: list
    seeds: list[int]
    record: dict
    photo: Any          # the RGB photo the pipeline was given (already resized when width/height asked for it)
    depth: Any          # (1, h, w) tensor: the given depth map, or the DPT's estimate (what a depth panel shows)

    @property
    def records(self) -> list[dict]:
        return [{**self.record, "seed": seed} for seed in self.seeds]


@dataclasses.dataclass(frozen=True)
class Wording:
    """How `check`'s messages name the photo and the depth map. The defaults are the command line's options; the web
    page passes its own words (its uploads live in temporary folders whose paths mean nothing to the user)."""

    photo: str = "--image {path}"
    depth_map: str = "--depth-map {path}"
    resize_hint: str = " (--width/--height choose the size)"
    small_hint: str = " (or pass --width/--height to resize it)"
    large_hint: str = "; pass --width/--height for a smaller size, or raise --max-pixels"
    limit: str = "--max-pixels"  # how the limit is raised, in a file's refusal


# ------------------------------------------------------------------------------------------------ before the model
def target_size(size: tuple[int, int], width: int | None, height: int | None) -> tuple[int, int]:
    """`size` = (W, H) of the photo -> the size it is resized to: `width` x `height`; one alone keeps the aspect ratio
    (rounded to a multiple of 8); neither: the photo's own size."""
    w, h = size
    if width is None and height is None:
        return size
    if width is None:
        width = max(8, round(w * height / h / 8) * 8)
    if height is None:
        height = max(8, round(h * width / w / 8) * 8)
    return width, height


def photo_size(job: Job, wording: Wording | None = None) -> tuple[int, int]:
    """(W, H) of the job's photo (only the file's header is read when the photo is not loaded; a file above the size
    policy's file limit is refused there: image_files.TooLarge)."""
    if job.photo is not None:
        return job.photo.size
    from .image_files import open_image_file
    wording = wording or Wording()
    with open_image_file(job.photo_path, wording.photo.format(path=job.photo_path), max_pixels=job.max_pixels,
                         raise_with=wording.limit) as img:
        return img.size


def output_size(job: Job) -> tuple[int, int]:
    """(W, H) of the images: the photo at its target size, floored to multiples of 8 (the pipeline's rule); in ldm
    mode the target size itself (the pipeline pads it to multiples of 64, and `crop_padding` crops back to it)."""
    w, h = target_size(photo_size(job), job.width, job.height)
    return (w, h) if job.mode == "ldm" else (w - w % 8, h - h % 8)


def check(job: Job, warn: Warn | None = None, wording: Wording = Wording()) -> None:
    """The checks and warnings that need no model, for a front end to run before one loads: a photo under 8x8
    (ValueError), a generation above `job.max_pixels` and a photo file above the size policy's file limit
    (image_files.TooLarge, a ValueError), the resize to multiples of 8, and a depth map whose aspect ratio is not the
    image's (stretched)."""
    from .image_files import check_generation_size
    warn = warn or (lambda message: None)
    photo = wording.photo.format(path=job.photo_path)
    size = target_size(photo_size(job, wording), job.width, job.height)
    w, h = output_size(job)
    if min(w, h) < 8:
        pw, ph = photo_size(job)
        raise ValueError(f"{photo} is {pw}x{ph} pixels; images must be at least 8x8{wording.small_hint}")
    shown = photo if size == photo_size(job) else f"{photo}, resized,"
    check_generation_size(size, shown, job.max_pixels, wording.large_hint)
    if (w, h) != size:
        warn(f"{photo} is {size[0]}x{size[1]} pixels; sides must be multiples of 8, so it is resized to {w}x{h}"
             f"{wording.resize_hint}")
    depth = _depth_array(job)
    if depth is not None:
        dh, dw = depth.shape
        if abs((dw / dh) / (w / h) - 1) > 0.01:
            warn(f"{wording.depth_map.format(path=job.depth_map_path)} is {dw}x{dh} but the image is {w}x{h}: the "
                 f"depth map is stretched from aspect ratio {dw / dh:.2f} to {w / h:.2f}")


def resolve_seed(seed: int | None, say: Warn | None = None) -> int:
    """`seed` itself, or for None / -1 a seed drawn at random, told to `say` so that the user can make it again."""
    if seed is not None and seed != -1:
        return seed
    seed = random.randrange(2 ** 32)
    if say is not None:
        say(f"seed: {seed}  (pass --seed {seed} to get the same image again)")
    return seed


def batch_key(job: Job) -> tuple:
    """Jobs with equal keys can share one pipeline call: everything but the prompt, the photo and the seed."""
    return (output_size(job), job.steps, job.strength, job.guidance, job.scheduler, job.negative_prompt or "",
            job.eta, job.clip_skip, job.mode, job.crop_padding, job.depth_model or "dpt-hybrid")


def can_share_a_call(job: Job) -> bool:
    """One image, no own depth map, diffusers mode: the reference pipeline tiles ONE image list over
    num_images_per_prompt and one depth map over the batch, which would pair prompts with the wrong photos in a mixed
    batch; ldm mode takes one photo per call."""
    return job.num_images == 1 and job.depth_map is None and not job.depth_map_path and job.mode == "diffusers"


def groups(jobs: list[Job], batch_size: int) -> list[list[int]]:
    """The jobs that can run together, as lists of positions in `jobs` (so callers keep their own data alongside):
    equal `batch_key`s in order of first appearance, cut into groups of at most `batch_size`; a job that cannot
    share a call (`can_share_a_call`) runs alone."""
    out: list[list[int]] = []
    open_group: dict[tuple, list[int]] = {}
    for index, job in enumerate(jobs):
        if batch_size == 1 or not can_share_a_call(job):
            out.append([index])
            continue
        key = batch_key(job)
        group = open_group.get(key)
        if group is None or len(group) == batch_size:
            group = open_group[key] = []
            out.append(group)
        group.append(index)
    return out


# ------------------------------------------------------------------------------------------------ the generation
def generate(pipe, jobs: list[Job], *, device, observers=(), warn: Warn | None = None,
             progress: Callable[[int, int], None] | None = None) -> list[Result]:
    """Run `jobs` as ONE pipeline call (several jobs: they must share settings, see `groups`); one Result per job.

    `device`: where the generators live (the pipeline's device). `observers`: watch the call (minidepth/observers.py).
    `warn`: receives the warnings. `progress(done, total)`: after each UNet call, with the number of UNet calls of
    the run. The pipeline's own ValueError/TypeError (argument checks) come through unchanged, in its argument names."""
    import torch
    from .schedulers.names import a1111_name
    first = jobs[0]
    if len(jobs) > 1 and not all(can_share_a_call(j) and batch_key(j) == batch_key(first) for j in jobs):
        raise ValueError("jobs of one call must share their settings, with one image each and no own depth map "
                         "(generation.groups finds the jobs that can)")
    warn = warn or (lambda message: None)
    ldm = first.mode == "ldm"
    pipe.scheduler = fresh_scheduler(pipe, first.scheduler)
    sampler = "DDIM" if ldm else a1111_name(first.scheduler, pipe.scheduler)
    if ldm and first.scheduler:
        warn(f"--scheduler {first.scheduler} is ignored with --mode ldm (LDM's own DDIM sampler)")
    if first.eta and not ldm and "eta" not in inspect.signature(pipe.scheduler.step).parameters:
        warn(f"--eta {first.eta} has no effect with {type(pipe.scheduler).__name__} (only ddim uses eta)")

    n = first.num_images
    seeds = [[resolve_seed(job.seed) + i for i in range(n)] for job in jobs]
    generators = [torch.Generator(device).manual_seed(seed) for job_seeds in seeds for seed in job_seeds]
    photos = [_rgb_photo(job) for job in jobs]
    depth = _depth_array(first)
    depth_map = torch.from_numpy(depth)[None] if depth is not None else None
    one = len(jobs) == 1
    negative = first.negative_prompt if one or first.negative_prompt is None else [first.negative_prompt] * len(jobs)
    call = dict(prompt=first.prompt if one else [j.prompt for j in jobs], image=photos[0] if one else photos,
                depth_map=depth_map, strength=first.strength, num_inference_steps=first.steps,
                guidance_scale=first.guidance, negative_prompt=negative, num_images_per_prompt=n, eta=first.eta,
                clip_skip=first.clip_skip, generator=generators[0] if len(generators) == 1 else generators,
                max_pixels=first.max_pixels)
    if ldm:
        call.update(mode="ldm", crop_padding=first.crop_padding)
    watching = list(observers)
    if progress is not None:
        from .ldm_mode import t_enc_for
        counter = _Progress(progress, t_enc_for(first.strength, first.steps) if ldm else 1)
        watching.append(counter)
        call["callback_on_step_end"] = counter.on_step

    from .depth import depth_output
    estimated = []  # the depth model's output, kept for the depth panel (no second run)
    hook = pipe.depth_estimator.register_forward_hook(
        lambda module, inputs, output: estimated.append(depth_output(output, module)))
    try:
        with pipe.observing(*watching):
            images = pipe(**call).images
    finally:
        hook.remove()

    results = []
    for k, job in enumerate(jobs):
        mine = images[k * n:(k + 1) * n]
        record = generation_record(job, sampler=sampler, size=mine[0].size, device=str(device).split(":")[0])
        shown = depth_map if depth_map is not None else estimated[0][k:k + 1] if estimated else None
        results.append(Result(job=job, images=mine, seeds=seeds[k], record=record, photo=photos[k], depth=shown))
    return results


_OWN_SCHEDULER_CONFIG: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fresh_scheduler(pipe, name: str | None):
    """A new scheduler for one call: `name` (a short name of schedulers.names) or, for None, the checkpoint's own
    class, both from the config the pipeline's scheduler had the first time it came here (its noise schedule)."""
    from .schedulers.names import scheduler_by_name
    config = _OWN_SCHEDULER_CONFIG.setdefault(pipe, dict(pipe.scheduler.config))
    return scheduler_by_name(name, config)


def _rgb_photo(job: Job):
    """The job's photo in RGB, resized (LANCZOS, as the pipeline resizes) when width/height ask for another size."""
    from PIL import Image

    from .image_files import open_image_file
    from .image_processing import to_rgb
    photo = job.photo
    if photo is None:
        with open_image_file(job.photo_path, max_pixels=job.max_pixels) as img:  # refused before decoding
            img.load()
            photo = img
    size = target_size(photo.size, job.width, job.height)
    image = to_rgb(photo)
    return image if size == photo.size else image.resize(size, resample=Image.LANCZOS)


def _depth_array(job: Job):
    """The job's depth map as an (H, W) array: the one given, or read from `depth_map_path`; None for neither."""
    if job.depth_map is not None or not job.depth_map_path:
        return job.depth_map
    from .image_files import read_depth_map
    return read_depth_map(job.depth_map_path, job.max_pixels)


class _Progress(Observer):
    """Counts UNet calls for `report(done, total)`: the total from `denoising_started` (one entry per UNet call; ldm
    mode announces none, so its count is given up front), a tick from the pipeline's step callback (both modes)."""

    def __init__(self, report: Callable[[int, int], None], total: int):
        self.report, self.total = report, total

    def denoising_started(self, pipe, *, timesteps, **data) -> None:
        self.total = len(timesteps)

    def on_step(self, pipe, index, timestep, tensors) -> dict:
        self.report(index + 1, self.total)
        return {}  # changes nothing


class StageTimes(Observer):
    """Seconds spent in each stage of the pipeline ("prompt", "depth", "encode", "denoise", "decode"), summed over
    the calls it watched. On CUDA it waits for the GPU at the end of each stage, so the time is the stage's own."""

    def __init__(self, device="cpu"):
        self.seconds: dict[str, float] = {}
        self.cuda = str(device).startswith("cuda")
        self._started: dict[str, float] = {}

    def stage_started(self, pipe, *, stage, **data) -> None:
        self._started[stage] = time.perf_counter()

    def stage_finished(self, pipe, *, stage, **data) -> None:
        if self.cuda:
            import torch
            torch.cuda.synchronize()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - self._started.pop(stage)


# ------------------------------------------------------------------------------------------------ the record
def generation_record(job: Job, *, sampler: str, size, device: str) -> dict:
    """The settings stored with each image (cli/png_metadata.py writes them as PNG text; `generate --from` reads them
    back): the job's settings, the sampler's AUTOMATIC1111 name, the images' `size`, the photo and depth map as full
    paths (with the photo's SHA-256), the checkpoint and the depth model that made the depth (a name, a repo id or a
    folder's full path). Without the seed: `Result.records` adds each image's."""
    from . import __version__
    folder = Path(job.model).expanduser()
    record = {"version": __version__, "prompt": job.prompt, "negative_prompt": job.negative_prompt,
              "steps": job.steps, "strength": job.strength, "guidance": job.guidance, "scheduler": job.scheduler,
              "sampler": sampler, "eta": job.eta, "clip_skip": job.clip_skip, "width": job.width,
              "height": job.height, "size": list(size), "image": str(Path(job.photo_path).resolve()),
              "image_sha256": hashlib.sha256(Path(job.photo_path).read_bytes()).hexdigest(),
              "depth_map": str(Path(job.depth_map_path).resolve()) if job.depth_map_path else None,
              "model": str(folder.resolve()) if folder.is_dir() else job.model,
              "model_name": folder.resolve().name if folder.is_dir() else job.model.split("/")[-1],
              "depth_model": _depth_model_name(job.depth_model),
              "variant": job.variant, "revision": job.revision, "dtype": job.dtype, "device": device}
    if job.mode == "ldm":
        record["mode"] = "ldm"  # restored by `generate --from`
    return record


def _depth_model_name(name: str | None) -> str:
    """The depth model as recorded: its name or repo id, a folder as its full path."""
    folder = Path(name or "dpt-hybrid").expanduser()
    return str(folder.resolve()) if name and folder.is_dir() else name or "dpt-hybrid"


# ------------------------------------------------------------------------------------------------ the depth panel
def depth_picture(depth, size: tuple[int, int], raw16: bool = False):
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


__all__ = ["Job", "Result", "Wording", "StageTimes", "check", "generate", "groups", "batch_key", "resolve_seed",
           "fresh_scheduler", "generation_record", "depth_picture", "target_size", "output_size"]
