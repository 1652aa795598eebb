"""A denoising filmstrip: what the model believes the finished image is, at chosen steps of one generation.

    with record_filmstrip(pipe, every=5) as film:          # or steps=[0, 10, -1]
        image = pipe("a marble statue", image=photo).images[0]
    film.save("statue-filmstrip.png")                      # photo | depth | step 1 ... step 40 | final
    film.strip(decoder="linear")                           # the cheap latent -> RGB preview instead of the VAE

At UNet call i with timestep t the model predicts, from the noisy latents, the clean latents x0 it is heading for.
With abar = alphas_cumprod[t] (the scheduler's noise schedule) and x the UNet's latent input (its first 4 channels;
every scheduler feeds the UNet this variance-preserving x = sqrt(abar) x0 + sqrt(1 - abar) eps: the sigma-space
samplers divide their latents by sqrt(sigma^2 + 1) in `scale_model_input`, and abar = 1 / (1 + sigma^2)):

    epsilon prediction    x0 = (x - sqrt(1 - abar) * eps) / sqrt(abar)
    v prediction          x0 = sqrt(abar) * x - sqrt(1 - abar) * v
    sample prediction     x0 = the model output

where the model output is the GUIDED one, u + s (c - u), as the pipeline uses it. A fractional t (Karras sigmas)
interpolates log sigma between the two neighbouring training steps, the inverse of the schedulers' sigma -> t rule.

The recorder is an observer of the pipeline (minidepth/observers.py): `step_done` hands it, at every UNet call, the
scaled latents the UNet saw (`model_input`) and the guided output (`noise_pred`), the very tensors the scheduler steps
with; it reads them and changes nothing, so the image is bit-identical with and without recording. Only the chosen
frames' x0 are kept (4 x h x w each). The photo comes with `image_ready`, the final image with `decoded`, and the depth
from a forward hook on the depth estimator (its raw output, before the resize to the latent grid) or, for a given
depth map, from `depth_ready`.
Decoders: "vae" decodes each x0 with the autoencoder (exact, one VAE decode per frame: costly on a CPU at 512x512);
"linear" maps each latent pixel to RGB with a 4x3 matrix (`LATENT_RGB`, no network) and resizes 8x.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ..observers import Observer

# Linear latent -> RGB preview: rgb = LATENT_RGB^T z + LATENT_RGB_BIAS, z = the UNet's (scaled) latents, rgb in [-1, 1].
# A least-squares fit of (8x8-averaged image colours) on (latents) over encoded images, for the kl-f8 autoencoder of
# Stable Diffusion 1.x/2.x (SD2-depth uses that autoencoder): rows = latent channels, columns = R, G, B. Values of the
# public fit by keturn (discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204); refit them on any
# checkpoint with `python scripts/fit_latent_preview.py --model DIR` (it prints this table).
LATENT_RGB = ((0.298, 0.207, 0.208),
              (0.187, 0.286, 0.173),
              (-0.158, 0.189, 0.264),
              (-0.184, -0.271, -0.473))
LATENT_RGB_BIAS = (0.0, 0.0, 0.0)


@dataclass
class Frame:
    call: int                 # UNet call index in the generation (0 = first), as `callback_on_step_end`'s i
    calls: int                # UNet calls in the generation
    timestep: float
    x0: torch.Tensor          # (B, 4, h, w) float32 on the CPU: the predicted clean latents (scaled, UNet space)


# ------------------------------------------------------------------------------------------------ the maths
def alpha_bar(scheduler, t: float) -> float:
    """abar at timestep t: alphas_cumprod[t] for an integer t, log-sigma interpolation between neighbours otherwise."""
    abar = scheduler.alphas_cumprod.double().cpu()
    lo = min(max(int(math.floor(t)), 0), len(abar) - 1)
    hi, w = min(lo + 1, len(abar) - 1), t - lo
    if w == 0 or hi == lo:
        return float(abar[lo])
    log_sigma = lambda a: 0.5 * math.log((1 - a) / a)
    sigma = math.exp((1 - w) * log_sigma(float(abar[lo])) + w * log_sigma(float(abar[hi])))
    return 1 / (1 + sigma ** 2)


def predict_x0(x: torch.Tensor, output: torch.Tensor, abar: float, prediction_type: str = "epsilon") -> torch.Tensor:
    """The clean latents from the (variance-preserving) UNet input x and its output (module docstring)."""
    x, output = x.double(), output.double()
    if prediction_type == "epsilon":
        return (x - math.sqrt(1 - abar) * output) / math.sqrt(abar)
    if prediction_type == "v_prediction":
        return math.sqrt(abar) * x - math.sqrt(1 - abar) * output
    if prediction_type == "sample":
        return output
    raise ValueError(f"prediction_type {prediction_type!r} is not supported (epsilon, v_prediction, sample)")


def latent_preview(x0: torch.Tensor, size: tuple[int, int] | None = None) -> list[PIL.Image.Image]:
    """(B, 4, h, w) scaled latents -> RGB previews through `LATENT_RGB`, resized (bicubic) to `size` = (W, H)."""
    weights = torch.tensor(LATENT_RGB, dtype=torch.float32)
    rgb = torch.einsum("bchw,cr->brhw", x0.float().cpu(), weights) + torch.tensor(LATENT_RGB_BIAS)[None, :, None, None]
    arrays = ((rgb * 0.5 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    images = [PIL.Image.fromarray(a) for a in arrays]
    return [im.resize(size, PIL.Image.BICUBIC) for im in images] if size else images


def fit_latent_preview(latents: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares: (4x3 weights, 3 biases) with images_avg ~ weights^T z + bias, for latents (B, 4, h, w) and the
    images they encode (B, 3, 8h, 8w) in [-1, 1], each image averaged over its 8x8 blocks."""
    targets = F.adaptive_avg_pool2d(images.double(), latents.shape[-2:])                   # (B, 3, h, w)
    z = latents.double().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])                 # (N, 4)
    y = targets.permute(0, 2, 3, 1).reshape(-1, 3)                                         # (N, 3)
    design = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)                   # (N, 5)
    solution = torch.linalg.lstsq(design, y).solution                                      # (5, 3)
    return solution[:4], solution[4]


# ------------------------------------------------------------------------------------------------ the recorder
class FilmstripRecorder(Observer):
    """Context manager and pipeline observer: x0 at the chosen UNet calls (`every` k-th and the last, or the indices
    `steps`, negative ones counted from the end; neither: about 8 frames), plus the photo, the depth and the final
    image. Entering it adds it to `pipe.observing(...)` and hooks the depth estimator; leaving removes both."""

    def __init__(self, pipe, every: int | None = None, steps: list[int] | None = None):
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"filmstrip: every must be a positive int, got {every!r}")
        if steps is not None and (not steps or any(isinstance(s, bool) or not isinstance(s, int) for s in steps)):
            raise ValueError(f"filmstrip: steps must be a non-empty list of ints, got {steps!r}")
        self.pipe, self.every, self.steps = pipe, every, steps
        self.frames: list[Frame] = []
        self.photo = self.depth = self.final = None
        self._stack: contextlib.ExitStack | None = None
        self._chosen: set[int] = set()
        self._calls = 0

    def __enter__(self) -> FilmstripRecorder:
        stack = contextlib.ExitStack()
        pipe = self.pipe
        stack.enter_context(pipe.observing(self))
        if pipe.depth_estimator is not None:
            stack.callback(pipe.depth_estimator.register_forward_hook(self._on_dpt).remove)
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def chosen_calls(self, calls: int) -> list[int]:
        """The UNet call indices recorded in a generation of `calls` calls."""
        if self.steps is not None:
            bad = [s for s in self.steps if not -calls <= s < calls]
            if bad:
                raise ValueError(f"filmstrip: steps {bad} out of range; this generation makes {calls} UNet calls "
                                 f"(0 .. {calls - 1}, or -1 for the last)")
            return sorted({s % calls for s in self.steps})
        every = self.every or max(1, math.ceil(calls / 8))
        return sorted(set(range(0, calls, every)) | {calls - 1})

    # -- observing (the pipeline's events, minidepth/observers.py; and the depth estimator's forward hook)
    def image_ready(self, pipe, *, image: torch.Tensor, **data) -> None:
        self.photo = image.detach().float().cpu() if image.shape[1] == 3 else None

    def _on_dpt(self, module, args, output) -> None:
        from ..depth import depth_output
        self.depth = depth_output(output, module).detach().float().cpu()  # (B, h, w), larger = nearer

    def depth_ready(self, pipe, *, depth_mask: torch.Tensor, depth_map_given: bool, **data) -> None:
        if depth_map_given or self.depth is None:
            self.depth = depth_mask.detach().float().cpu()[:, 0]  # the UNet's depth channel (B, h, w)

    def denoising_started(self, pipe, *, timesteps, **data) -> None:
        self._calls = len(timesteps)
        self._chosen = set(self.chosen_calls(self._calls))
        self.frames, self.final = [], None

    def step_done(self, pipe, *, index: int, timestep, model_input: torch.Tensor, noise_pred: torch.Tensor,
                  **data) -> None:
        """x0 from the UNet's (scaled, depth-less) input and its guided output, u + s (c - u), at a chosen call."""
        if index not in self._chosen:
            return
        t = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        scheduler = pipe.scheduler
        with torch.no_grad():
            x0 = predict_x0(model_input, noise_pred, alpha_bar(scheduler, t),
                            scheduler.config.get("prediction_type", "epsilon"))
        self.frames.append(Frame(index, self._calls, t, x0.float().cpu()))

    def decoded(self, pipe, *, images, output_type: str, latents: torch.Tensor, **data) -> None:
        from ..image_processing import postprocess
        if output_type == "pil":
            self.final = list(images)
        elif output_type == "np":
            self.final = [PIL.Image.fromarray((x * 255).round().astype(np.uint8)) for x in images]
        elif output_type == "pt":
            self.final = postprocess(images * 2 - 1, "pil")
        else:  # latents: decoded when the strip is drawn
            self.final = latents.detach().float().cpu()

    # -- pictures
    @torch.no_grad()
    def images(self, decoder: str = "vae", index: int = 0) -> list[PIL.Image.Image]:
        """One image per frame for batch row `index`: the VAE's decoding of x0 ("vae") or the linear preview."""
        if not self.frames:
            raise RuntimeError("no frames were recorded: run the pipeline inside `with record_filmstrip(pipe)`")
        if decoder == "linear":
            h, w = self.frames[0].x0.shape[-2:]
            f = self.pipe.vae_scale_factor
            return [latent_preview(fr.x0[index:index + 1], (w * f, h * f))[0] for fr in self.frames]
        if decoder != "vae":
            raise ValueError(f"decoder must be 'vae' or 'linear', got {decoder!r}")
        return [self._vae_decode(fr.x0[index:index + 1]) for fr in self.frames]

    def _vae_decode(self, latents: torch.Tensor) -> PIL.Image.Image:
        from ..image_processing import postprocess
        pipe = self.pipe
        with pipe._running(pipe.vae, "decode"):  # observers see a "decode" stage (no `decoded` event)
            vae = pipe.vae
            weight = next(vae.parameters())
            z = latents.to(device=weight.device, dtype=weight.dtype) / vae.config.scaling_factor
            return postprocess(vae.decode(z), "pil")[0]

    def strip(self, decoder: str = "vae", index: int = 0, border: int = 2) -> PIL.Image.Image:
        """photo | depth | x0 at each frame | final image, in one row with captions."""
        from ..depth import colorize_depth
        frames = self.images(decoder, index)
        size = frames[0].size
        tiles, labels = [], []
        if self.photo is not None:
            photo = self.photo[min(index, len(self.photo) - 1)]
            array = ((photo * 0.5 + 0.5).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            tiles.append(PIL.Image.fromarray(array).resize(size, PIL.Image.BICUBIC))
            labels.append("photo")
        if self.depth is not None:
            depth = self.depth[min(index, len(self.depth) - 1)]
            depth = F.interpolate(depth[None, None], size=size[::-1], mode="bicubic", align_corners=False)[0, 0]
            tiles.append(PIL.Image.fromarray(colorize_depth(depth), "RGB"))
            labels.append("depth")
        for frame, image in zip(self.frames, frames):
            tiles.append(image)
            labels.append(f"x0 @ {frame.call + 1}/{frame.calls} (t={frame.timestep:g})")
        final = self.final
        if isinstance(final, torch.Tensor):
            final = [self._vae_decode(final[index:index + 1])]
        if final is not None:
            tiles.append(final[min(index, len(final) - 1)].resize(size, PIL.Image.BICUBIC))
            labels.append("final")
        return tile_row(tiles, labels, border)

    def save(self, path: str | Path, decoder: str = "vae", index: int = 0) -> Path:
        path = Path(path)
        self.strip(decoder, index).save(path)
        return path


def record_filmstrip(pipe, every: int | None = None, steps: list[int] | None = None) -> FilmstripRecorder:
    """`with record_filmstrip(pipe, every=5) as film: pipe(...)`, then `film.save("filmstrip.png")`."""
    return FilmstripRecorder(pipe, every, steps)


def tile_row(tiles: list[PIL.Image.Image], labels: list[str], border: int = 2) -> PIL.Image.Image:
    """Equal-sized tiles left to right on white, each with its caption underneath."""
    from PIL import ImageDraw, ImageFont
    w, h = tiles[0].size
    font_size = max(10, min(24, h // 14))
    strip = round(font_size * 1.6)
    out = PIL.Image.new("RGB", (len(tiles) * (w + border) + border, h + strip + 2 * border), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=font_size)
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        x = border + i * (w + border)
        out.paste(tile.convert("RGB"), (x, border))
        while len(label) > 1 and draw.textlength(label, font=font) > w - 2:
            label = label[:-2] + "…"
        draw.text((x + w / 2, border + h + strip / 2), label, fill=(30, 30, 30), font=font, anchor="mm")
    return out
