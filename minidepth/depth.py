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
import platform
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .checkpoints import read_json
from .image_processing import to_rgb

RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL codes used in preprocessor_config.json
PIL_RESAMPLE = {2: PIL.Image.BILINEAR, 3: PIL.Image.BICUBIC}


# ------------------------------------------------------------------------------------------------ image inputs
def image_list(image, name: str = "image") -> list:
    """One image or a batch -> a list of single images: PIL, numpy (H, W[, C]) or tensors ([C,] H, W)."""
    if isinstance(image, PIL.Image.Image):
        return [image]
    if isinstance(image, (np.ndarray, torch.Tensor)):
        if image.ndim == 4:
            return list(image)
        if image.ndim in (2, 3):
            return [image]
        raise ValueError(f"`{name}` has shape {tuple(image.shape)}; expected a single image (numpy HWC, torch CHW) "
                         "or a batch (numpy NHWC, torch NCHW)")
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError(f"`{name}` is an empty list; pass at least one image")
        for i, x in enumerate(image):
            if not isinstance(x, (PIL.Image.Image, np.ndarray, torch.Tensor)):
                raise TypeError(f"`{name}[{i}]` is a {type(x).__name__}; expected a PIL image, numpy array or tensor")
            if not isinstance(x, PIL.Image.Image) and x.ndim not in (2, 3):
                raise ValueError(f"`{name}[{i}]` has shape {tuple(x.shape)}; list items must be single images")
        return list(image)
    raise TypeError(f"`{name}` must be a PIL image, numpy array, torch tensor or a list of them; "
                    f"got {type(image).__name__}")


def _as_chw(x, where: str) -> torch.Tensor:
    """A single image -> (3, H, W) tensor, dtype kept (uint8 stays uint8). numpy is channels-last, torch
    channels-first. Grey is repeated to 3 channels and alpha dropped (the reference would crash in the DPT)."""
    if isinstance(x, PIL.Image.Image):
        x = np.array(to_rgb(x))  # (H, W, 3) uint8
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x if x.ndim == 3 else x[..., None])).permute(2, 0, 1)
    elif x.ndim == 2:
        x = x[None]
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{where} has dtype {x.dtype}; expected uint8 or floating point pixel values")
    if x.shape[0] not in (1, 3, 4):
        raise ValueError(f"{where} has {x.shape[0]} channels (shape {tuple(x.shape)}); expected 1, 3 or 4 "
                         "(numpy images are (H, W, C), tensors (C, H, W))")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{where} contains NaN or infinite values")
    if min(x.shape[1:]) == 0:
        raise ValueError(f"{where} is empty (shape {tuple(x.shape)})")
    return (x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3]).contiguous()


# ------------------------------------------------------------------------------------------------ preprocessing
@dataclass(frozen=True)
class DPTProcessorConfig:
    size: tuple[int, int] = (384, 384)      # (height, width)
    resample: int = 2                       # PIL code: 2 bilinear, 3 bicubic
    keep_aspect_ratio: bool = False
    ensure_multiple_of: int = 1
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def sd2_depth(cls) -> DPTProcessorConfig:
        return cls()

    @classmethod
    def from_dict(cls, d: dict) -> DPTProcessorConfig:
        """From `preprocessor_config.json`. Traps: `size` is a {"height", "width"} dict; `resample` is a PIL code;
        `rescale_factor` 0.00392156862745098 is 1/255 (the torch backend fuses it into mean and std: 127.5)."""
        for key in ("do_pad", "do_center_crop", "do_reduce_labels"):
            if d.get(key):
                raise ValueError(f"preprocessor config: {key}=true is not supported")
        resample = d.get("resample", 2)
        if resample not in RESAMPLE:
            raise ValueError(f"preprocessor config: resample={resample} is not supported (only {sorted(RESAMPLE)})")
        kw = {k: d[k] for k in ("keep_aspect_ratio", "ensure_multiple_of", "do_resize", "do_rescale",
                                "rescale_factor", "do_normalize") if d.get(k) is not None}
        kw.update({k: tuple(d[k]) for k in ("image_mean", "image_std") if d.get(k) is not None})
        if d.get("size") is not None:
            kw["size"] = (d["size"]["height"], d["size"]["width"])
        return cls(resample=resample, **kw)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """transformers' DPT rule: scale to `size` (keep_aspect_ratio: change the side that moves least) and round
        each side to a multiple of `ensure_multiple_of`."""
        sh, sw = self.size[0] / height, self.size[1] / width
        if self.keep_aspect_ratio:
            sh = sw = sw if abs(1 - sw) < abs(1 - sh) else sh
        m = self.ensure_multiple_of
        return tuple(max(round(s * v / m) * m, 0) for s, v in ((sh, height), (sw, width)))


def _native_uint8_bilinear() -> bool:
    """torchvision resizes uint8 bilinearly in uint8 on AVX2/AVX512/ARM CPUs, else via float32 + round."""
    return (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
            or platform.machine() in ("aarch64", "arm64"))


def resize_like_torchvision(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """`torchvision.transforms.v2.functional.resize(x, size, mode, antialias=True)` for (B, C, H, W) tensors."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    native = x.dtype in (torch.float32, torch.float64)
    if x.dtype == torch.uint8 and x.device.type == "cpu":
        native = mode == "bicubic" or _native_uint8_bilinear()
    if native:
        return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
    y = F.interpolate(x.float(), size=size, mode=mode, align_corners=False, antialias=True)
    if mode == "bicubic" and x.dtype == torch.uint8:
        y = y.clamp_(0, 255)
    return (y if x.is_floating_point() else y.round_()).to(x.dtype)


class DPTImageProcessor:
    """Image(s) -> DPT `pixel_values` (B, 3, 384, 384) float32, as transformers 5 does it.

    backend="torch" (default) = `DPTImageProcessor` (torchvision): uint8 CHW -> antialiased bilinear resize on uint8 ->
        float32 -> (x - 127.5) / 127.5;
    backend="pil" = `DPTImageProcessorPil` (= transformers 4.x): PIL bilinear resize on uint8 -> float64 x 1/255 ->
        float32 -> (x - 0.5) / 0.5. The two differ by at most one uint8 step (2/255; mean ~3e-4 on a photo).
    Inputs: PIL images, numpy HWC / NHWC, torch CHW / NCHW, or lists of single images.
    """

    def __init__(self, config: DPTProcessorConfig | None = None, backend: str = "torch",
                 assume_unit_float: bool = False):
        if backend not in ("torch", "pil"):
            raise ValueError(f"`backend` must be 'torch' or 'pil', got {backend!r}")
        self.config = config or DPTProcessorConfig.sd2_depth()
        self.backend, self.assume_unit_float = backend, assume_unit_float

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **kwargs) -> DPTImageProcessor:
        """A hub `feature_extractor/` folder (preprocessor_config.json)."""
        return cls(DPTProcessorConfig.from_dict(read_json(os.path.join(folder, "preprocessor_config.json"))), **kwargs)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `preprocessor_config.json` (transformers' DPTImageProcessor reads it too)."""
        import json
        c = self.config
        config = {"image_processor_type": "DPTImageProcessor", "do_resize": c.do_resize,
                  "size": {"height": c.size[0], "width": c.size[1]}, "resample": c.resample,
                  "keep_aspect_ratio": c.keep_aspect_ratio, "ensure_multiple_of": c.ensure_multiple_of,
                  "do_rescale": c.do_rescale, "rescale_factor": c.rescale_factor, "do_normalize": c.do_normalize,
                  "image_mean": list(c.image_mean), "image_std": list(c.image_std)}
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
            f.write(json.dumps(config, indent=2) + "\n")

    def __call__(self, images) -> torch.Tensor:
        items = image_list(images, "images")
        out = []
        for i, item in enumerate(items):
            where = "`images`" if len(items) == 1 else f"`images[{i}]`"
            x = _as_chw(item, where)
            if self.assume_unit_float and x.is_floating_point():
                if x.min() < 0 or x.max() > 1:
                    raise ValueError(f"{where}: assume_unit_float=True needs float values in [0, 1], got "
                                     f"[{x.min().item():.4g}, {x.max().item():.4g}]")
                x = (x * 255).round().to(torch.uint8)  # then exactly what the uint8 image gives
            out.append(self._torch(x) if self.backend == "torch" else self._pil(x))
        if len({tuple(x.shape) for x in out}) > 1:
            raise ValueError("images of different aspect ratios give pixel_values of different sizes; "
                             "process them one at a time")
        return torch.stack(out)

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.do_resize:
            x = resize_like_torchvision(x[None], c.output_size(*x.shape[-2:]), RESAMPLE[c.resample])[0]
        if c.do_normalize:  # rescale fused into normalisation: mean / factor, std / factor (127.5 for SD2-depth)
            mean, std = (torch.tensor(v, dtype=torch.float32, device=x.device) for v in (c.image_mean, c.image_std))
            if c.do_rescale:
                mean, std = mean * (1.0 / c.rescale_factor), std * (1.0 / c.rescale_factor)
            return (x.to(torch.float32) - mean[:, None, None]) / std[:, None, None]
        return (x * c.rescale_factor if c.do_rescale else x).float()

    def _pil(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        a = x.cpu().numpy().transpose(1, 2, 0)  # (H, W, 3)
        if c.do_resize:
            a = _pil_resize(a, c.output_size(*a.shape[:2]), PIL_RESAMPLE[c.resample])
        if c.do_rescale:
            a = (a.astype(np.float64) * c.rescale_factor).astype(np.float32)
        if c.do_normalize:
            a = a if np.issubdtype(a.dtype, np.floating) else a.astype(np.float32)
            a = (a - np.array(c.image_mean, dtype=a.dtype)) / np.array(c.image_std, dtype=a.dtype)
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float()


def _pil_resize(a: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    """transformers' `image_transforms.resize`: through a uint8 PIL image; floats in [0, 1] go via x 255 (truncated)
    and come back x 1/255; integer-valued floats in [0, 255] are cast."""
    rescaled = False
    if a.dtype != np.uint8:
        if np.allclose(a, a.astype(int)):
            if a.min() < 0 or a.max() > 255:
                raise ValueError(f"`images`: values in [{a.min()}, {a.max()}] cannot be converted to uint8")
        elif a.min() >= 0 and a.max() <= 1:
            a, rescaled = (a.astype(np.float64) * 255).astype(np.float32), True
        else:
            raise ValueError(f"`images`: float values in [{a.min()}, {a.max()}] are neither in [0, 1] nor [0, 255]")
    img = PIL.Image.fromarray(a.astype(np.uint8)).resize((size[1], size[0]), resample=resample)
    out = np.asarray(img)
    return (out.astype(np.float64) * (1 / 255)).astype(np.float32) if rescaled else out


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
