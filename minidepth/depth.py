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

# ------------------------------------------------------------------------------------------------ estimating depth
def estimate_depth(image, model, processor: DPTImageProcessor | None = None, *, device=None,
                   dtype: torch.dtype | None = None, exact: bool | None = None) -> torch.Tensor:
    """Raw DPT output for image(s): (B, 384, 384) relative inverse depth (near = large, >= 0, arbitrary scale).
    `pixel_values` are cast to `dtype` (default: the model's) and moved to `device` (default: the model's).
    `exact=False`: the fast CPU kernels, as the pipeline runs by default (the same numbers as its depth estimate);
    `True`: PyTorch's default kernels, as in transformers; `None`: whichever the caller has on (a pipeline step)."""
    from .fast_kernels import fast_kernels
    pixel_values = (processor or DPTImageProcessor())(image)
    pixel_values = pixel_values.to(device=device or model.device, dtype=dtype or model.dtype)
    with torch.no_grad(), (contextlib.nullcontext() if exact is None else fast_kernels(enabled=not exact)):
        return model(pixel_values)


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
                      depth_estimator=None, feature_extractor: DPTImageProcessor | None = None,
                      vae_scale_factor: int = 8, nan_safe: bool = True, fix_numpy_size: bool = False) -> torch.Tensor:
    """The UNet's depth channel, (batch_size [x2 with CFG], 1, H/8, W/8) in [-1, 1], as diffusers builds it:

    1. size (H, W) from the FIRST image (see `_size_from_first_image`);
    2. depth: `depth_map` if given (any scale), else the DPT's prediction for `image` (under autocast for 16-bit
       dtypes), in `dtype` on `device`;
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


def read_depth_map(path: str):
    """A depth-map file -> (H, W) float32 numpy array, larger = nearer (the DPT convention): a .npy array, or a grayscale
    image (8/16-bit PNG such as the `--raw` output of `minidepth depth`).
    ValueError naming the file when it is missing, unreadable, in colour, not 2-D or not finite."""
    from PIL import Image
    if not os.path.isfile(path):
        raise ValueError(f"file not found: {path}")
    try:
        if path.lower().endswith(".npy"):
            array = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as img:
                img.load()
                array = np.asarray(img)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable .npy array or image ({e})") from e
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        if not (np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2])):
            raise ValueError(f"{path} is a colour image; pass a grayscale depth image (e.g. the --raw "
                             "output of `minidepth depth`) or a .npy array")
        array = array[..., 0]
    array = np.squeeze(array)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{path} holds an array of shape {array.shape}; expected a 2-D (H, W) depth map")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{path} contains NaN or infinite values")
    return array
