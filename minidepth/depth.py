"""Depth for SD2-depth: DPT preprocessing, running the depth model, and the UNet's depth channel.

    image(s) --DPTImageProcessor--> pixel_values (B, 3, 384, 384) in [-1, 1]
             --DPTDepthModel-----> predicted_depth (B, 384, 384), relative inverse depth (near = large)   estimate_depth
             --prepare_depth_map-> depth_mask (B [x2 with CFG], 1, H/8, W/8) in [-1, 1]
    save_depth_image: a viewable colour PNG (and optionally a 16-bit PNG) of a depth map.

Faithful by default to transformers 5 `DPTImageProcessor` and diffusers' `prepare_depth_map`, quirks included; every
deviation is an explicit, documented argument:
  - float numpy / tensor images are divided by 255 like uint8 ones (so [0, 1] images come out near -1): the reference
    does this; `assume_unit_float=True` takes floats as [0, 1] and converts them to uint8 (round(x * 255)) first;
  - for numpy images the reference reads the size as (width, height) = shape[:2], swapping H and W:
    `fix_numpy_size=True` reads (height, width);
  - a flat depth map makes the reference's normalisation 0 / 0 = NaN: `nan_safe=True` (default) gives zeros instead
    (non-flat maps are bit-identical); `nan_safe=False` reproduces the NaN.
Where the reference crashes (grey / RGBA images, a single CHW tensor or HWC array, a depth batch that does not divide
the batch) this module does the sensible thing or raises a ValueError naming the argument.

The depth-model slot. SD2-depth was trained on MiDaS DPT-Hybrid's depth, but the pipeline runs any estimator that
follows this protocol (`pipe.depth_estimator = model; pipe.feature_extractor = processor`, or
`from_pretrained(..., depth_estimator=..., feature_extractor=...)`; by name: checkpoints/depth_models.py):
  - `feature_extractor`: a callable, `processor(images) -> pixel_values` (B, 3, H, W): a tensor, or an object with
    `.pixel_values` / a mapping with "pixel_values" (transformers' image processors return a BatchFeature);
  - `depth_estimator`: a torch.nn.Module, `model(pixel_values) -> (B, h, w)` relative inverse depth (larger = nearer;
    any scale and shift, any h, w): a tensor, or an object with `.predicted_depth` (transformers' output). Its dtype
    and device are those of its first parameter: it must have at least one.
The output is resized to the latent grid and min-max normalised per image to [-1, 1], so the scale does not matter;
the shape of the depth distribution does (the UNet learnt DPT-Hybrid's). `check_depth_estimator` and
`check_feature_extractor` check the structure when a model is assigned; `depth_output` and `pixel_values_of` check
what they return on every call, with a TypeError/ValueError saying what the protocol wants.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .dpt_processing import (PIL_RESAMPLE, RESAMPLE, DPTImageProcessor, DPTProcessorConfig,  # noqa: F401
                             _as_chw, image_list, resize_like_torchvision)

# ------------------------------------------------------------------------------------------------ the slot's protocol
def _loaded_by_name(value, where: str) -> None:
    if isinstance(value, (str, os.PathLike)):
        raise TypeError(f"`{where}` is the name {str(value)!r}, not a model: load it by name with "
                        f"StableDiffusionDepth2ImgPipeline.from_pretrained(..., depth_estimator={str(value)!r}) or "
                        "minidepth.checkpoints.depth_models.load_depth_model")


def check_depth_estimator(model, where: str = "depth_estimator"):
    """`model` if it can fill the depth slot (None too: then every call needs a `depth_map`); else a TypeError /
    ValueError saying what the protocol (module docstring) wants. Runs nothing."""
    if model is None:
        return None
    _loaded_by_name(model, where)
    if not isinstance(model, torch.nn.Module):
        hint = " (wrap it in a torch.nn.Module that holds its weights as parameters)" if callable(model) else ""
        raise TypeError(f"`{where}` must be a torch.nn.Module called as model(pixel_values) -> (B, h, w) relative "
                        f"inverse depth; got {'a function' if callable(model) else 'a ' + type(model).__name__}{hint}")
    if next(model.parameters(), None) is None:
        raise ValueError(f"`{where}` ({type(model).__name__}) has no parameters: the pipeline reads the depth model's "
                         "dtype and device from its first parameter; register one (any nn.Parameter or layer)")
    return model


def check_feature_extractor(processor, where: str = "feature_extractor"):
    """`processor` if it is callable as `processor(images) -> pixel_values` (None too); else a TypeError."""
    if processor is None:
        return None
    _loaded_by_name(processor, where)
    if not callable(processor):
        raise TypeError(f"`{where}` must be callable as processor(images) -> pixel_values (B, 3, H, W); got an "
                        f"object of type {type(processor).__name__}")
    return processor


class CheckedAttribute:
    """An attribute whose value goes through `check` when assigned (the pipeline's depth slot:
    `depth_estimator = CheckedAttribute(check_depth_estimator)`); a refused value leaves the old one in place."""

    def __init__(self, check):
        self.check = check

    def __set_name__(self, owner, name: str) -> None:
        self.name, self.stored = name, f"_{name}"

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(obj, self.stored)

    def __set__(self, obj, value) -> None:
        setattr(obj, self.stored, self.check(value, self.name))


def model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of a depth model: those of its first parameter."""
    check_depth_estimator(model, "model")
    p = next(model.parameters())
    return p.device, p.dtype


def pixel_values_of(output, processor=None) -> torch.Tensor:
    """What a feature extractor returned -> the (B, 3, H, W) tensor: a tensor, `.pixel_values` or ["pixel_values"]
    (a list of arrays is stacked). TypeError / ValueError naming the processor otherwise."""
    name = type(processor).__name__ if processor is not None else "the feature extractor"
    values = output
    if not isinstance(values, torch.Tensor):
        values = output.get("pixel_values") if hasattr(output, "get") else getattr(output, "pixel_values", None)
        if isinstance(values, np.ndarray):
            values = torch.from_numpy(values)
        elif isinstance(values, (list, tuple)) and values:
            values = torch.stack([torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v
                                  for v in values])
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{name} returned a {type(output).__name__}; the feature extractor must return pixel_values, "
                        "a (B, 3, H, W) tensor (or an object with .pixel_values, as transformers' processors do)")
    if values.ndim != 4 or values.shape[1] != 3 or not values.is_floating_point():
        raise ValueError(f"{name} returned pixel_values of shape {tuple(values.shape)} and dtype {values.dtype}; the "
                         "feature extractor must return a floating-point (B, 3, H, W) tensor")
    return values


def depth_output(output, model=None, batch: int | None = None) -> torch.Tensor:
    """What a depth model returned -> its (B, h, w) depth: the tensor itself or `.predicted_depth` (transformers).
    TypeError / ValueError naming the model and saying what the protocol wants otherwise."""
    name = type(model).__name__ if model is not None else "the depth estimator"
    depth = output
    if not isinstance(depth, torch.Tensor):
        depth = output.get("predicted_depth") if hasattr(output, "get") else getattr(output, "predicted_depth", None)
    if not isinstance(depth, torch.Tensor):
        raise TypeError(f"{name} returned a {type(output).__name__}; a depth estimator must return a (B, h, w) tensor "
                        "of relative inverse depth (or an object with .predicted_depth, as transformers' do)")
    if depth.ndim != 3:
        fix = " (drop the channel: depth[:, 0])" if depth.ndim == 4 and depth.shape[1] == 1 else ""
        raise ValueError(f"{name} returned depth of shape {tuple(depth.shape)}; a depth estimator must return "
                         f"(B, h, w), one map per image, larger = nearer{fix}")
    if batch is not None and depth.shape[0] != batch:
        raise ValueError(f"{name} returned {depth.shape[0]} depth maps for {batch} images (shape "
                         f"{tuple(depth.shape)}); it must return one (h, w) map per image")
    if not depth.is_floating_point():
        raise TypeError(f"{name} returned depth of dtype {depth.dtype}; it must be floating point")
    return depth


# ------------------------------------------------------------------------------------------------ estimating depth
def estimate_depth(image, model, processor=None, *, device=None,
                   dtype: torch.dtype | None = None, exact: bool | None = None) -> torch.Tensor:
    """The depth model's raw output for image(s): (B, h, w) relative inverse depth (near = large, arbitrary scale;
    (B, 384, 384) for SD2-depth's DPT). `model` and `processor` follow the slot's protocol (module docstring;
    `processor` None: SD2-depth's DPT preprocessing). `pixel_values` are cast to `dtype` and moved to `device`
    (defaults: the model's first parameter's).
    `exact=False`: the fast CPU kernels, as the pipeline runs by default (the same numbers as its depth estimate);
    `True`: PyTorch's default kernels, as in transformers; `None`: whichever the caller has on (a pipeline step)."""
    from .fast_kernels import fast_kernels
    model_device, model_dtype = model_device_dtype(model)
    processor = check_feature_extractor(processor, "processor") or DPTImageProcessor()
    pixel_values = pixel_values_of(processor(image), processor)
    pixel_values = pixel_values.to(device=device or model_device, dtype=dtype or model_dtype)
    with torch.no_grad(), (contextlib.nullcontext() if exact is None else fast_kernels(enabled=not exact)):
        return depth_output(model(pixel_values), model, pixel_values.shape[0])


def _autocast(device: torch.device, dtype: torch.dtype):
    """diffusers runs the DPT under `torch.autocast(device.type, dtype)` (not on MPS); for float32 that is a no-op."""
    if dtype in (torch.float16, torch.bfloat16) and device.type != "mps":
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------ the depth channel
DEPTH_PIL_MODES = ("L", "I;16", "I;16B", "I;16L", "I", "F")


def _depth_array(x, where: str) -> torch.Tensor:
    if isinstance(x, PIL.Image.Image):
        if x.mode not in DEPTH_PIL_MODES:
            raise ValueError(f"{where} is a PIL image of mode {x.mode!r}; depth maps must be single-channel "
                             f"({', '.join(DEPTH_PIL_MODES)}), e.g. image.convert('L') or a 16-bit PNG")
        x = np.array(x)
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "fiu":
            raise TypeError(f"{where} has dtype {x.dtype}; expected integer or floating point depth values")
        x = torch.from_numpy(np.ascontiguousarray(x if x.dtype.kind == "f" else x.astype(np.float32)))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where} must be a torch tensor, numpy array, PIL image or a list of them; "
                        f"got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{where} has dtype {x.dtype}; expected integer or floating point depth values")
    return x


def depth_tensor(depth_map) -> torch.Tensor:
    """A user depth map -> (B, H, W) tensor, any value scale. Accepts tensors / arrays (H, W), (B, H, W) or
    (B, 1, H, W), PIL images (L, I;16, I, F) and lists of single maps."""
    if isinstance(depth_map, (list, tuple)):
        if not depth_map:
            raise ValueError("`depth_map` is an empty list")
        maps = [_depth_array(m, f"`depth_map[{i}]`") for i, m in enumerate(depth_map)]
        if any(m.ndim != 2 for m in maps) or len({tuple(m.shape) for m in maps}) > 1:
            raise ValueError(f"`depth_map`: list items must be (H, W) maps of one size, got shapes "
                             f"{[tuple(m.shape) for m in maps]}")
        d = torch.stack(maps)
    else:
        d = _depth_array(depth_map, "`depth_map`")
    if d.ndim == 2:
        d = d[None]
    elif d.ndim == 4 and d.shape[1] == 1:
        d = d[:, 0]
    if d.ndim != 3:
        raise ValueError(f"`depth_map` has shape {tuple(d.shape)}; expected (H, W), (B, H, W) or (B, 1, H, W)")
    if d.numel() == 0:
        raise ValueError(f"`depth_map` is empty (shape {tuple(d.shape)})")
    if d.is_floating_point() and not torch.isfinite(d).all():
        raise ValueError("`depth_map` contains NaN or infinite values")
    return d


def _size_from_first_image(first, fix_numpy_size: bool) -> tuple[int, int]:
    """(height, width) by diffusers' rules: PIL .size is (W, H); tensors end in (H, W); numpy: diffusers reads
    `width, height = shape[:-1]` of an HWC array, i.e. swaps them (kept unless `fix_numpy_size`)."""
    if isinstance(first, PIL.Image.Image):
        return first.height, first.width
    if isinstance(first, np.ndarray):
        h, w = first.shape[:2]
        return (h, w) if fix_numpy_size else (w, h)
    return tuple(first.shape[-2:])


def _check_batch(n: int, batch_size: int, source: str) -> None:
    if n > batch_size or batch_size % n:
        raise ValueError(f"`{source}` gives {n} depth maps, which does not divide the batch of {batch_size} "
                         "(prompts x num_images_per_prompt); pass 1 map or one per prompt")


def prepare_depth_map(image, depth_map=None, batch_size: int = 1, do_classifier_free_guidance: bool = False,
                      dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", *,
                      depth_estimator=None, feature_extractor=None,
                      vae_scale_factor: int = 8, nan_safe: bool = True, fix_numpy_size: bool = False) -> torch.Tensor:
    """The UNet's depth channel, (batch_size [x2 with CFG], 1, H/8, W/8) in [-1, 1], as diffusers builds it:

    1. size (H, W) from the FIRST image (see `_size_from_first_image`);
    2. depth: `depth_map` if given (any scale), else `depth_estimator`'s prediction for `image` (under autocast for
       16-bit dtypes), in `dtype` on `device` (any model of the slot's protocol, module docstring);
    3. bicubic resize (align_corners=False) to (H // 8, W // 8);
    4. per sample `2 (d - min) / (max - min) - 1`, no epsilon. A flat sample (max == min before or after the resize)
       gives zeros with `nan_safe` (the reference: NaN, or noise when the resize is not exactly flat);
    5. tile the batch (d0, d1, d0, d1, ...) up to `batch_size`, which must be a multiple; duplicate for CFG.
    """
    device = torch.device(device)
    images = image_list(image)
    height, width = _size_from_first_image(images[0], fix_numpy_size)
    if depth_map is None:
        _check_batch(len(images), batch_size, "image")
        if depth_estimator is None:
            raise ValueError("`depth_map` is None, so the depth is estimated from `image`: pass `depth_estimator` "
                             "(and `feature_extractor`)")
        source = "image"
        with _autocast(device, dtype):
            depth = estimate_depth(images, depth_estimator, feature_extractor, device=device, dtype=dtype)
        if not torch.isfinite(depth).all():
            raise RuntimeError(f"the depth estimator produced NaN or infinite values in {depth.dtype}; "
                               "run it in float32")
    else:
        source = "depth_map"
        depth = depth_tensor(depth_map).to(device=device, dtype=dtype)
    size = (height // vae_scale_factor, width // vae_scale_factor)
    if min(size) == 0:
        raise ValueError(f"`image` is {height}x{width} pixels; the depth channel needs at least "
                         f"{vae_scale_factor}x{vae_scale_factor}")
    flat_input = torch.amax(depth, dim=[1, 2]) == torch.amin(depth, dim=[1, 2])       # (B,)
    depth = F.interpolate(depth.unsqueeze(1), size=size, mode="bicubic", align_corners=False)  # (B, 1, h, w)
    d_min = torch.amin(depth, dim=[1, 2, 3], keepdim=True)
    d_max = torch.amax(depth, dim=[1, 2, 3], keepdim=True)
    depth = 2.0 * (depth - d_min) / (d_max - d_min) - 1.0
    if nan_safe:
        flat = (d_max == d_min) | flat_input[:, None, None, None]
        depth = torch.where(flat, torch.zeros_like(depth), depth)
    depth = depth.to(dtype)
    _check_batch(depth.shape[0], batch_size, source)
    depth = depth.repeat(batch_size // depth.shape[0], 1, 1, 1)
    return torch.cat([depth] * 2) if do_classifier_free_guidance else depth


# ------------------------------------------------------------------------------------------------ saving
# A perceptual dark-to-bright colour ramp (close to matplotlib's "inferno"): near (large inverse depth) is bright.
_RAMP = np.array([(0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85),
                  (227, 89, 51), (249, 140, 10), (249, 201, 50), (252, 255, 164)], dtype=np.float64)


def colorize_depth(depth) -> np.ndarray:
    """(H, W) depth -> (H, W, 3) uint8 colour image, min-max normalised (a flat map is all dark)."""
    d = _single_map(depth)
    lo, hi = d.min(), d.max()
    t = (d - lo) / (hi - lo) if hi > lo else np.zeros_like(d)
    stops = np.linspace(0, 1, len(_RAMP))
    rgb = np.stack([np.interp(t, stops, _RAMP[:, c]) for c in range(3)], axis=-1)
    return rgb.round().astype(np.uint8)


def _single_map(depth) -> np.ndarray:
    if isinstance(depth, torch.Tensor):
        depth = depth.detach().float().cpu().numpy()
    if not isinstance(depth, np.ndarray):
        raise TypeError(f"`depth` must be a torch tensor or numpy array, got {type(depth).__name__}")
    d = np.asarray(depth, dtype=np.float64)
    while d.ndim > 2 and d.shape[0] == 1:
        d = d[0]
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"`depth` has shape {depth.shape}; expected one map: (H, W), (1, H, W) or (1, 1, H, W)")
    if not np.isfinite(d).all():
        raise ValueError("`depth` contains NaN or infinite values")
    return d


def save_depth_image(depth, path_png: str | os.PathLike,
                     raw16_path: str | os.PathLike | None = None) -> PIL.Image.Image:
    """Write a colour-mapped PNG of one depth map (near = bright) and, with `raw16_path`, a 16-bit grey PNG
    (PIL mode I;16, min-max normalised to 0..65535 as MiDaS writes them) for other tools. Returns the colour image."""
    image = PIL.Image.fromarray(colorize_depth(depth), "RGB")
    image.save(path_png)
    if raw16_path is not None:
        d = _single_map(depth)
        lo, hi = d.min(), d.max()
        t = (d - lo) / (hi - lo) if hi > lo else np.zeros_like(d)
        PIL.Image.fromarray(np.round(t * 65535).astype(np.uint16)).save(raw16_path)
    return image


# reading depth-map files, under the size policy: minidepth/image_files.py (torch-free, so that the command line checks
# a --depth-map before torch is imported); `minidepth.depth.read_depth_map(path, max_pixels=...)` is that function
from .image_files import read_depth_map  # noqa: E402,F401
