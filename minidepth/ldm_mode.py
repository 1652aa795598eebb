"""LDM-faithful mode: `pipe(prompt, image, mode="ldm")` does what Stability's original script does, not what diffusers does.

The original: `scripts/gradio/depth2img.py` of github.com/Stability-AI/stablediffusion, with `ldm/data/util.py` (AddMiDaS),
`ldm/modules/midas/` (api.py, midas/transforms.py), `ldm/models/diffusion/ddim.py` (DDIMSampler) and
`ldm/modules/diffusionmodules/util.py`. Each rule below names the line it follows; the code is our own.

                              diffusers (mode="diffusers")              LDM script (mode="ldm")
  image size                  floored to multiples of 8 (LANCZOS)       padded with edge pixels (bottom, right) to multiples
                                                                        of 64, at least 128 x 128; no resize
  image -> [-1, 1]            x / 255 * 2 - 1                           x / 127.5 - 1 (float32)
  depth model input           384 x 384 squash, bilinear (uint8)        aspect kept, "minimal" rule, sides multiples of 32,
                                                                        cubic, on floats; (x - 0.5) / 0.5
  depth model                 DPT-Hybrid, LayerNorm eps 1e-12           the same weights, LayerNorm eps 1e-6 (timm)
  depth -> UNet channel       bicubic to latent size, min/max [-1, 1]   bicubic to the MiDaS input size, bicubic to latent
                                                                        size, min/max to [-1, 1] (the same formula)
  posterior sample            one encode, tiled to the batch            the image tiled, one encode of the whole batch
  sampler                     the pipeline's scheduler (PNDM)           DDIM, LDM's uniform grid range(0, T, T // N) + 1
  noising / first step        add_noise at timesteps[0]; first step     noised at ddim_alphas[t_enc], first step at
                              at the same timestep                      ddim_timesteps[t_enc - 1] (one grid step lower)
  steps run                   int(N * strength)                         t_enc = min(int(strength * N), N - 1)
  strength 1                  pure noise at timesteps[0]                pure noise (not scaled), t_enc = N - 1
  guidance on                 guidance_scale > 1                        guidance_scale != 1
  decoding                    latents / 0.18215                         (1 / 0.18215) * latents
  "pil" output                round(x * 255)                            x * 255 truncated (numpy astype(uint8))
  defaults                    guidance 7.5, strength 0.8                guidance 9.0, strength 0.9

The off-by-one, reproduced on purpose: the latent is noised to the level of grid entry `t_enc` (`stochastic_encode` with
`ddim_alphas[t_enc]`), but `decode` runs the grid entries `t_enc - 1, ..., 0`, so the first UNet call is told a timestep
one grid step lower (less noisy) than the latent really is. With N = 50, strength 0.9: noised at t = 901, denoised from
881 in 45 steps. The grid also need not have N entries: range(0, 1000, 1000 // N) has 31 entries for N = 30.

Not reproduced (documented differences):
  - cv2.INTER_CUBIC: we have no OpenCV at run time and resize with torch's bicubic (align_corners=False,
    antialias=False): the same kernel (Keys, a = -0.75, half-pixel centres, edge clamping), rounding differs; measured
    against opencv 5.0 on uniform noise in [0, 1]: at most 5e-5, mean 4e-6 (768x512 -> 576x384).
  - the invisible watermark ("SDV2", imwatermark) the script puts on its outputs, and its autocast("cuda"): we compute
    in the pipeline's dtype, the sampler arithmetic in float32 (as LDM's float32 buffers do).
  - random numbers: the script draws from torch's global generator (the posterior sample on the CPU, the noise on the
    model's device); we draw from `generator` in the same order (1: posterior sample, 2: noise, 3...: eta > 0 noise).
    On a CPU, generator=torch.Generator().manual_seed(s) gives the numbers seed_everything(s) would.
  - prompts go through the pipeline's tokenizer (SD2's "!" quirk, see tokenizer.py) rather than open_clip's.
  - the depth model runs once per call and is repeated over the batch (the script runs it on the repeated batch).
  - t_enc = 0 (N = 1, or strength < 1 / N) would decode the noised image without a single step: refused here.
  - N whose grid step T // N divides T - 1 = 999 (of the script's 1-50: N = 3, 9, 27, 36, 37; and most N > 100) make
    the grid end at 1000, which the original cannot index (IndexError in make_ddim_sampling_parameters): ValueError.
  - training (`LatentDepth2ImageDiffusion.get_input`) adds 0.001 to max - min; the script (and we) do not. A flat depth
    map gives zeros with nan_safe_depth=True (NaN in the script, nan_safe_depth=False).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .image_processing import OUTPUT_TYPES, to_rgb
from .models.dpt import DPTDepthModel
from .noise import randn_tensor

logger = logging.getLogger(__name__)
LDM_DEFAULTS = {"guidance_scale": 9.0, "strength": 0.9}  # depth2img.py's gradio sliders: scale 9.0, strength 0.9
MIDAS_SIZE, MIDAS_MULTIPLE = 384, 32                       # api.py load_midas_transform("dpt_hybrid")
MIDAS_LAYER_NORM_EPS = 1e-6                                # timm's ViT LayerNorm (MiDaS builds its DPT with timm)


# ------------------------------------------------------------------------------------------------ the image
def padded_size(width: int, height: int, multiple: int = 64, minimum: int = 128) -> tuple[int, int]:
    """depth2img.py `pad_image`: `np.max(((2, 2), np.ceil(size / 64)), axis=0) * 64` -> (width, height)."""
    return tuple(max(minimum // multiple, math.ceil(s / multiple)) * multiple for s in (width, height))


def pad_image(image: PIL.Image.Image) -> np.ndarray:
    """depth2img.py `pad_image`: `np.pad(np.array(image), ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")` -- the last
    row and column repeated down and to the right. Returns (H, W, 3) uint8."""
    width, height = padded_size(*image.size)
    a = np.array(to_rgb(image))
    return np.pad(a, ((0, height - a.shape[0]), (0, width - a.shape[1]), (0, 0)), mode="edge")


def image_to_tensor(padded: np.ndarray) -> torch.Tensor:
    """depth2img.py `make_batch_sd`: `torch.from_numpy(image).to(torch.float32) / 127.5 - 1.0`, HWC -> (1, 3, H, W)."""
    return (torch.from_numpy(padded).to(torch.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]


# ------------------------------------------------------------------------------------------------ MiDaS input and depth
def midas_size(width: int, height: int, net: int = MIDAS_SIZE, multiple: int = MIDAS_MULTIPLE) -> tuple[int, int]:
    """midas/transforms.py `Resize.get_size`, keep_aspect_ratio=True, resize_method="minimal": scale both sides by
    the factor that is closer to 1 (w: net / width, h: net / height; the height's on a tie), then round each side
    to a multiple of 32 (`np.round`, half to even). 768x512 -> 576x384, 512x512 -> 384x384. Returns (width, height)."""
    scale_w, scale_h = net / width, net / height
    scale = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h
    return tuple(int(np.round(scale * s / multiple) * multiple) for s in (width, height))


def midas_input(image: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1] -> the depth model's input (1, 3, h, w), following AddMiDaS and the MiDaS transform:
    `pt2np`: (x + 1) * 0.5 (float32); `Resize`: cv2.INTER_CUBIC to `midas_size` (here torch bicubic, see the module
    docstring); `NormalizeImage(mean=0.5, std=0.5)`: (x - 0.5) / 0.5 (numpy computes it in float64 and `PrepareForNet`
    casts to float32: one rounding of the same exact value as this float32 expression)."""
    x = (image + 1.0) * 0.5
    w, h = midas_size(x.shape[-1], x.shape[-2])
    if (h, w) != tuple(x.shape[-2:]):  # cv2.resize to the same size is a copy
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=False)
    return (x - 0.5) / 0.5


@contextlib.contextmanager
def midas_layer_norms(model: torch.nn.Module, eps: float = MIDAS_LAYER_NORM_EPS):
    """Run the DPT with timm's LayerNorm eps (1e-6), as MiDaS does; the pipeline's eps comes back afterwards."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    saved = [m.eps for m in norms]
    for m in norms:
        m.eps = eps
    try:
        yield model
    finally:
        for m, e in zip(norms, saved):
            m.eps = e


def depth_condition(depth: torch.Tensor, midas_hw: tuple[int, int], latent_hw: tuple[int, int],
                    nan_safe: bool = True) -> torch.Tensor:
    """The DPT's output (B, h, w) -> the UNet's depth channel (B, 1, H/8, W/8) in [-1, 1], depth2img.py `paint`:
    api.py `MiDaSInference.forward`: bicubic to the MiDaS input size (align_corners=False); then bicubic to the latent
    size (`size=z.shape[2:]`); then per image `2 * (cc - amin) / (amax - amin) - 1` over dims [1, 2, 3], no epsilon."""
    cc = F.interpolate(depth.unsqueeze(1).float(), size=midas_hw, mode="bicubic", align_corners=False)
    cc = F.interpolate(cc, size=latent_hw, mode="bicubic", align_corners=False)
    lo, hi = torch.amin(cc, dim=[1, 2, 3], keepdim=True), torch.amax(cc, dim=[1, 2, 3], keepdim=True)
    if nan_safe and bool((hi == lo).any()):
        return torch.where(hi == lo, torch.zeros_like(cc), 2.0 * (cc - lo) / (hi - lo) - 1.0)
    return 2.0 * (cc - lo) / (hi - lo) - 1.0


# ------------------------------------------------------------------------------------------------ LDM's DDIM
def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """util.py `make_ddim_timesteps("uniform", N, T)`: `range(0, T, T // N)` + 1 ("to get the final alpha values
    right"). Not always N entries: N = 30 gives 31 (1, 34, ..., 991); the original's length assert is commented out."""
    return np.asarray(list(range(0, num_train_timesteps, num_train_timesteps // num_steps))) + 1


def t_enc_for(strength: float, num_steps: int) -> int:
    """depth2img.py `predict`: `t_enc = min(int(strength * steps), steps - 1)`, the number of denoising steps and the
    grid index the image is noised to."""
    return min(int(strength * num_steps), num_steps - 1)


@dataclass
class LDMSchedule:
    """ddim.py `make_schedule` (float32, like the sampler's buffers): the grid and, per grid entry i,
    alphas[i] = alpha_bar[grid[i]], alphas_prev[i] = alpha_bar[grid[i - 1]] (alpha_bar[0] for i = 0), sigmas[i]."""
    timesteps: np.ndarray
    alphas: torch.Tensor
    alphas_prev: torch.Tensor
    sqrt_one_minus_alphas: torch.Tensor
    sigmas: torch.Tensor

    @classmethod
    def make(cls, alphas_cumprod: torch.Tensor, num_steps: int, eta: float = 0.0) -> LDMSchedule:
        ts = ddim_timesteps(num_steps, alphas_cumprod.shape[0])
        if ts[-1] >= alphas_cumprod.shape[0]:  # the original: IndexError in make_ddim_sampling_parameters
            raise ValueError(f"mode='ldm': with {num_steps} steps LDM's grid range(0, {alphas_cumprod.shape[0]}, "
                             f"{alphas_cumprod.shape[0] // num_steps}) + 1 ends at {ts[-1]}, past the last training "
                             "timestep (the original script fails with an IndexError); choose another number of steps")
        ac = alphas_cumprod.to(torch.float32)
        alphas = ac[ts]                                              # make_ddim_sampling_parameters
        alphas_prev = torch.cat([ac[:1], ac[ts[:-1]]])
        a, ap = alphas.double(), alphas_prev.double()                # float64 there (numpy / torch mixed)
        sigmas = (eta * torch.sqrt((1 - ap) / (1 - a) * (1 - a / ap))).float()
        return cls(ts, alphas, alphas_prev, torch.sqrt(1.0 - alphas), sigmas)


def ldm_alphas_cumprod(scheduler_config) -> torch.Tensor:
    """ddpm.py `register_schedule`: betas linear in sqrt(beta) in float64, cumprod in float64, stored as float32 (the
    checkpoint's `alphas_cumprod` buffer, which `load_state_dict` puts in the model)."""
    from .checkpoints.single_file import ddpm_buffers
    return ddpm_buffers(dict(scheduler_config))["alphas_cumprod"]


def stochastic_encode(z: torch.Tensor, schedule: LDMSchedule, t_enc: int, noise: torch.Tensor) -> torch.Tensor:
    """ddim.py `stochastic_encode(x0, t)` with t = t_enc, an index into the grid:
    sqrt(ddim_alphas)[t] * x0 + ddim_sqrt_one_minus_alphas[t] * noise."""
    return torch.sqrt(schedule.alphas)[t_enc] * z + schedule.sqrt_one_minus_alphas[t_enc] * noise


def p_sample_ddim(x: torch.Tensor, e_t: torch.Tensor, schedule: LDMSchedule, index: int,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """ddim.py `p_sample_ddim` after the model call (eps parameterisation, no quantize / threshold):
    pred_x0 = (x - sqrt(1 - a_t) e_t) / sqrt(a_t);  dir_xt = sqrt(1 - a_prev - sigma_t^2) e_t;
    x_prev = sqrt(a_prev) pred_x0 + dir_xt + sigma_t * noise (noise only when eta > 0; sigma_t = 0 adds exact zeros)."""
    a_t, a_prev = schedule.alphas[index], schedule.alphas_prev[index]
    sigma_t, sqrt_one_minus_at = schedule.sigmas[index], schedule.sqrt_one_minus_alphas[index]
    pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
    dir_xt = (1.0 - a_prev - sigma_t ** 2).sqrt() * e_t
    x_prev = a_prev.sqrt() * pred_x0 + dir_xt
    return x_prev if noise is None else x_prev + sigma_t * noise


# ------------------------------------------------------------------------------------------------ the whole job
def _single_image(image) -> PIL.Image.Image:
    """The script takes one PIL image (gradio type="pil"); numpy uint8 HWC is accepted too."""
    if isinstance(image, (list, tuple)):
        if len(image) != 1:
            raise ValueError(f"mode='ldm' takes one image (the original script repeats it over the batch); "
                             f"got a list of {len(image)}")
        image = image[0]
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3):
        image = PIL.Image.fromarray(image)
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"mode='ldm' takes a PIL image (or a uint8 HWC numpy array), like the original script; "
                        f"got {type(image).__name__}")
    if min(image.size) < 1:
        raise ValueError(f"`image` has size {image.width}x{image.height}")
    return to_rgb(image, warn=True)


@torch.no_grad()
def generate_ldm(pipe, *, prompt=None, image=None, depth_map=None, strength=None, num_inference_steps=50,
                 guidance_scale=None, negative_prompt=None, num_images_per_prompt=1, eta=0.0, generator=None,
                 prompt_embeds=None, negative_prompt_embeds=None, output_type="pil", return_dict=True,
                 cross_attention_kwargs=None, clip_skip=None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), nan_safe_depth=True, mode="ldm",
                 crop_padding: bool = False, **kwargs):
    """`pipe(..., mode="ldm")`. `crop_padding=True` crops the images back to the input's size (the script returns them
    padded); latents (output_type="latent") are never cropped. Returns what the pipeline returns."""
    from .pipeline_io import PipelineOutput, check_call_arguments, split_lora_scale
    if mode != "ldm":
        raise ValueError(f"`mode` must be 'diffusers' or 'ldm', got {mode!r}")
    if kwargs:
        logger.warning("ignoring unknown arguments: %s", ", ".join(sorted(kwargs)))
    strength = LDM_DEFAULTS["strength"] if strength is None else strength
    guidance_scale = LDM_DEFAULTS["guidance_scale"] if guidance_scale is None else guidance_scale
    if depth_map is not None:
        raise ValueError("mode='ldm' estimates depth with MiDaS as the original script does; `depth_map` is not "
                         "supported there (use mode='diffusers')")
    pipe._check_lora_scale(cross_attention_kwargs)
    check_call_arguments(pipe, prompt=prompt, image=image, strength=strength, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                         num_images_per_prompt=num_images_per_prompt, generator=generator,
                         prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                         output_type=output_type, clip_skip=clip_skip, callback_steps=None,
                         callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                         allowed_tensor_inputs=("latents",), depth_map=None)
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"`eta` must be a number >= 0, got {eta!r}")
    n, t_enc = num_inference_steps, t_enc_for(strength, num_inference_steps)
    if t_enc < 1:
        raise ValueError(f"mode='ldm': t_enc = min(int(strength * steps), steps - 1) = {t_enc} for strength "
                         f"{strength}, {n} steps: no denoising step (the original script would decode the noised "
                         "image); use at least 2 steps and strength >= 1 / steps")
    num_train = pipe.scheduler.config["num_train_timesteps"]
    if n > num_train:
        raise ValueError(f"`num_inference_steps`={n} is more than the {num_train} training timesteps")
    if not isinstance(pipe.depth_estimator, DPTDepthModel):
        raise ValueError(f"mode='ldm' runs MiDaS DPT-Hybrid as the original script does (its own preprocessing and "
                         f"LayerNorm eps); the depth slot holds a {type(pipe.depth_estimator).__name__}: use "
                         "mode='diffusers' with another depth model")
    original = _single_image(image)
    device, dtype, vae_dtype = pipe.device, pipe.dtype, next(pipe.vae.parameters()).dtype
    batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
    batch = batch_size * num_images_per_prompt
    do_cfg = guidance_scale != 1  # ddim.py p_sample_ddim: no guidance only when the scale is exactly 1

    # make_batch_sd: pad, [-1, 1], the MiDaS input; all repeated over the batch
    x = image_to_tensor(pad_image(original))                                     # (1, 3, H, W)
    midas_in = midas_input(x)                                                     # (1, 3, h, w)
    x = x.repeat(batch, 1, 1, 1)

    # z = get_first_stage_encoding(encode_first_stage(jpg)): posterior sample of the whole batch (random draw 1)
    with pipe._running(pipe.vae, "encode"):
        z = pipe.vae.encode(x.to(device=device, dtype=vae_dtype)).sample(generator)
    z = (pipe.vae.config.scaling_factor * z).float()

    # c = cond_stage_model.encode(txt); uc = get_unconditional_conditioning(n, "") (or the negative prompt)
    cond, uncond = pipe.encode_prompt(prompt, num_images_per_prompt, do_cfg, negative_prompt, prompt_embeds,
                                      negative_prompt_embeds, clip_skip,
                                      lora_scale=(cross_attention_kwargs or {}).get("scale"))
    context = torch.cat([uncond, cond]) if do_cfg else cond                       # c_in = cat([uc, c])

    # the depth channel: depth_model(midas_in), bicubic, bicubic, min/max (the same for c and uc: c_concat)
    with pipe._running(pipe.depth_estimator, "depth"), midas_layer_norms(pipe.depth_estimator) as dpt:
        depth = dpt(midas_in.to(device=device, dtype=dpt.dtype))                # (1, h, w)
    c_cat = depth_condition(depth, tuple(midas_in.shape[-2:]), tuple(z.shape[-2:]), nan_safe_depth)
    c_cat = c_cat.repeat(batch, 1, 1, 1).to(dtype)
    c_cat = torch.cat([c_cat] * 2) if do_cfg else c_cat

    # stochastic_encode at grid index t_enc (random draw 2); strength 1: pure noise (do_full_sample)
    schedule = LDMSchedule.make(ldm_alphas_cumprod(pipe.scheduler.config), n, eta)
    noise = randn_tensor(z.shape, generator=generator, device=device, dtype=z.dtype)
    latents = noise if strength == 1 else stochastic_encode(z, schedule, t_enc, noise)

    # decode(z_enc, cond, t_enc): grid entries t_enc - 1 ... 0 (the off-by-one, see the module docstring)
    steps = np.flip(schedule.timesteps[:t_enc])
    lora, cross_attention_kwargs = split_lora_scale(cross_attention_kwargs)  # strength -> adapters.lora_scale
    with pipe._running(pipe.unet, "denoise", lora), tqdm(total=len(steps), **pipe._progress_bar_config) as bar:
        for i, step in enumerate(steps):
            index = t_enc - i - 1
            x_in = torch.cat([latents] * 2) if do_cfg else latents
            ts = torch.full((x_in.shape[0],), int(step), device=device, dtype=torch.long)
            x_in = torch.cat([x_in.to(dtype), c_cat], dim=1)                    # hybrid: cat([x] + c_concat, 1)
            out = pipe.unet(x_in, ts, encoder_hidden_states=context,
                            cross_attention_kwargs=cross_attention_kwargs).float()
            if do_cfg:
                e_uncond, e_cond = out.chunk(2)
                out = e_uncond + guidance_scale * (e_cond - e_uncond)
            step_noise = None
            if eta > 0:  # noise_like(x.shape) (random draws 3...)
                step_noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=latents.dtype)
            latents = p_sample_ddim(latents, out, schedule, index, step_noise)
            if callback_on_step_end is not None:
                result = callback_on_step_end(pipe, i, int(step), {"latents": latents}) or {}
                latents = result.get("latents", latents)
            bar.update()

    # decode_first_stage: (1 / scale_factor) * z; (x + 1) / 2 clamped; "pil": * 255 truncated to uint8
    if output_type == "latent":
        images = latents
    else:
        with pipe._running(pipe.vae, "decode"):
            decoded = pipe.vae.decode(((1.0 / pipe.vae.config.scaling_factor) * latents).to(vae_dtype))
        images = torch.clamp((decoded.float() + 1.0) / 2.0, min=0.0, max=1.0)
        if crop_padding:
            images = images[..., :original.height, :original.width]
        images = _output(images, output_type)
    return PipelineOutput(images=images) if return_dict else (images,)


def _output(images: torch.Tensor, output_type: str):
    """(B, 3, H, W) in [0, 1] -> "pt" as is, "np" NHWC float32, "pil": `(x * 255).astype(np.uint8)` (truncation)."""
    assert output_type in OUTPUT_TYPES
    if output_type == "pt":
        return images
    array = images.cpu().numpy().transpose(0, 2, 3, 1)
    if output_type == "np":
        return array
    return [PIL.Image.fromarray(a) for a in (array * 255).astype(np.uint8)]
