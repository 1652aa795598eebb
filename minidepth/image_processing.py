"""Images in and out of the autoencoder, as diffusers' `VaeImageProcessor` does it, plus input checking.

Accepted image inputs (one image or a list, all the same kind):
  - PIL images (any size; width and height are floored to multiples of 8 with a LANCZOS resize when they change;
    all images take the first image's size). RGBA / LA / P / L / I;16 images are converted to RGB with a warning --
    the reference would crash deep inside the autoencoder instead.
  - numpy float arrays in [0, 1], HWC or NHWC (nearest-resized to multiples of 8).
  - torch tensors CHW or NCHW: values in [0, 1] are mapped to [-1, 1]; a tensor whose minimum is < 0 is taken as already
    in [-1, 1]; a tensor with 4 channels is taken as autoencoder latents (only valid together with a `depth_map`).
Outputs: "pil" (list of PIL), "np" (NHWC float32 in [0, 1]), "pt" (NCHW float in [0, 1]), "latent" (the latents).
"""

from __future__ import annotations

import os
import warnings
from typing import Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .image_files import MAX_PIXELS, check_generation_size, check_max_pixels, open_image_file

ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor, list]
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> PIL.Image.Image:
    """Open an image file as RGB, with an error that names the file when it is missing or not an image. A file above
    16 x `max_pixels` pixels is refused from its header, before it is decoded (image_files.TooLarge, a ValueError):
    the size policy of minidepth/image_files.py."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with open_image_file(path, max_pixels=max_pixels) as img:
            img.load()
            return to_rgb(img)
    except PIL.UnidentifiedImageError as e:
        raise ValueError(f"image file {path} is not a readable image ({e})") from e
    except OSError as e:  # truncated files
        raise ValueError(f"image file {path} could not be read ({e})") from e


def to_rgb(img: PIL.Image.Image, warn: bool = False) -> PIL.Image.Image:
    if img.mode == "RGB":
        return img
    if warn:
        warnings.warn(f"image: converting a PIL image of mode {img.mode!r} to RGB (the model takes 3 channels)",
                      stacklevel=3)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits before converting
        arr = np.asarray(img, dtype=np.float64)
        img = PIL.Image.fromarray(np.clip(arr / max(arr.max(), 1) * 255, 0, 255).round().astype(np.uint8), "L")
    return img.convert("RGB")


def check_image(image, name: str = "image") -> list:
    """Validate `image` and return it as a list of PIL images / arrays / tensors (PIL converted to RGB)."""
    if image is None:
        raise ValueError(f"`{name}` is required: pass a PIL image, a numpy array, a torch tensor or a list of them")
    items = image if isinstance(image, (list, tuple)) else [image]
    if len(items) == 0:
        raise ValueError(f"`{name}` is an empty list; pass at least one image")
    kinds = {type(x) for x in items}
    if not all(isinstance(x, (PIL.Image.Image, np.ndarray, torch.Tensor)) for x in items):
        bad = next(x for x in items if not isinstance(x, (PIL.Image.Image, np.ndarray, torch.Tensor)))
        raise TypeError(f"`{name}` must be a PIL.Image.Image, numpy.ndarray, torch.Tensor or a list of them; "
                        f"got {type(bad).__name__}")
    if len({PIL.Image.Image if issubclass(k, PIL.Image.Image) else k for k in kinds}) > 1:
        raise TypeError(f"`{name}`: all images in a list must be of the same kind, got {sorted(k.__name__ for k in kinds)}")
    out = []
    for i, x in enumerate(items):
        where = f"`{name}`" if len(items) == 1 else f"`{name}[{i}]`"
        if isinstance(x, PIL.Image.Image):
            if x.width == 0 or x.height == 0:
                raise ValueError(f"{where} has size {x.width}x{x.height}; images must be at least 8x8 pixels")
            x = to_rgb(x, warn=True)
            size = (x.height, x.width)
        else:
            if x.ndim not in (3, 4):
                raise ValueError(f"{where} has shape {tuple(x.shape)}; expected HWC/NHWC (numpy) or CHW/NCHW (torch)")
            size = tuple(x.shape[-3:-1]) if isinstance(x, np.ndarray) else tuple(x.shape[-2:])
            values = torch.as_tensor(x) if isinstance(x, np.ndarray) else x
            if values.numel() and values.is_floating_point() and not torch.isfinite(values).all():
                raise ValueError(f"{where} contains NaN or infinite values")
        if min(size) < 8:
            raise ValueError(f"{where} is {size[0]}x{size[1]} pixels; images must be at least 8x8 pixels")
        out.append(x)
    return out


def check_image_size(image, max_pixels: int = MAX_PIXELS, name: str = "image") -> None:
    """Refuse an image whose generation size is above `max_pixels` (image_files.TooLarge, a ValueError naming `name`,
    the size and the limit), before any model runs: PIL images by their size, arrays and tensors by their last two
    spatial sides, latents (4-channel tensors) by 8 x theirs. Anything else is left to `check_image`."""
    max_pixels = check_max_pixels(max_pixels)
    items = image if isinstance(image, (list, tuple)) else [image]
    for i, x in enumerate(items):
        if isinstance(x, PIL.Image.Image):
            w, h = x.size
        elif isinstance(x, np.ndarray) and x.ndim in (3, 4):
            h, w = x.shape[-3:-1]
        elif isinstance(x, torch.Tensor) and x.ndim in (3, 4):
            h, w = (s * 8 if x.shape[-3] == 4 else s for s in x.shape[-2:])
        else:
            continue
        where = f"`{name}`" if len(items) == 1 else f"`{name}[{i}]`"
        check_generation_size((int(w), int(h)), where, max_pixels)


def is_latents(image) -> bool:
    """A 4-channel tensor is taken as autoencoder latents (the reference's rule)."""
    first = image[0] if isinstance(image, (list, tuple)) else image
    return isinstance(first, torch.Tensor) and first.ndim >= 3 and first.shape[-3] == 4


def _floor_to(x: int, multiple: int) -> int:
    return x - x % multiple


def preprocess(image: ImageInput, vae_scale_factor: int = 8) -> torch.Tensor:
    """Image(s) -> (B, 3, H, W) float tensor in [-1, 1] with H, W multiples of `vae_scale_factor` (or latents as-is)."""
    items = check_image(image)
    if isinstance(items[0], PIL.Image.Image):
        height, width = (_floor_to(s, vae_scale_factor) for s in (items[0].height, items[0].width))
        items = [img.resize((width, height), resample=PIL.Image.LANCZOS) for img in items]
        x = np.stack([np.asarray(img).astype(np.float32) / 255.0 for img in items])  # (B, H, W, C)
        x = torch.from_numpy(x.transpose(0, 3, 1, 2))  # (B, C, H, W)
    elif isinstance(items[0], np.ndarray):
        x = np.concatenate(items) if items[0].ndim == 4 else np.stack(items)  # (B, H, W, C)
        x = torch.from_numpy(x.transpose(0, 3, 1, 2))  # (B, C, H, W)
        x = F.interpolate(x, size=tuple(_floor_to(s, vae_scale_factor) for s in x.shape[-2:]))  # nearest
    else:
        x = torch.cat(items) if items[0].ndim == 4 else torch.stack(items)  # (B, C, H, W)
        if x.shape[1] == 4:
            return x  # latents
        x = F.interpolate(x, size=tuple(_floor_to(s, vae_scale_factor) for s in x.shape[-2:]))  # nearest
    if x.shape[1] != 3:
        raise ValueError(f"`image` has {x.shape[1]} channels; expected 3 (RGB) or 4 (latents, with a depth_map)")
    if x.min() < 0:  # already in [-1, 1] (the reference warns that this is deprecated)
        return x
    return 2.0 * x - 1.0


def postprocess(image: torch.Tensor, output_type: str = "pil"):
    """(B, 3, H, W) decoder output in [-1, 1] -> the requested output type; "latent" returns the input unchanged."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if output_type == "latent":
        return image
    image = (image * 0.5 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    array = image.cpu().permute(0, 2, 3, 1).float().numpy()  # (B, H, W, C)
    if output_type == "np":
        return array
    return [PIL.Image.fromarray(a) for a in (array * 255).round().astype("uint8")]
