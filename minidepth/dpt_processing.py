"""DPT preprocessing: image(s) -> `pixel_values` for the depth model, as transformers 5's `DPTImageProcessor` does it.

    image(s) --DPTImageProcessor--> pixel_values (B, 3, 384, 384) in [-1, 1]     (SD2-depth's preprocessor_config.json)

A foundation module (no model, no checkpoint code): the depth stage (depth.py) and the checkpoint loaders both use it.
Quirks and their explicit fixes are listed in depth.py's docstring.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

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
        return cls(DPTProcessorConfig.from_dict(json.loads(Path(folder, "preprocessor_config.json").read_text())), **kwargs)

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
