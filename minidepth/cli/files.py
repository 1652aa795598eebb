"""The `minidepth` command's files: reading photos and depth maps (with a warning for every silent conversion),
planning and checking outputs, atomic writes, and the labelled grid. Only PIL and numpy are imported here (no torch),
so every input and output is checked before a model loads.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..console import Console  # noqa: F401  (the front ends' Console)
from ..image_files import MAX_PIXELS
from .args import CLIError

MODE_NAMES = {"L": "a grey", "LA": "a grey + alpha", "La": "a grey + alpha", "P": "a palette",
              "PA": "a palette + alpha", "RGBA": "an RGBA", "RGBa": "an RGBa", "RGBX": "an RGBX", "CMYK": "a CMYK",
              "1": "a black-and-white (1-bit)", "I": "a 32-bit grey", "F": "a floating-point grey",
              "I;16": "a 16-bit grey", "I;16B": "a 16-bit grey", "I;16L": "a 16-bit grey", "YCbCr": "a YCbCr",
              "LAB": "a Lab", "HSV": "an HSV"}


def once(warn):
    """`warn`, but each distinct message only the first time (a setting warned about once, not once per job)."""
    seen = set()

    def warn_once(message: str) -> None:
        if message not in seen:
            seen.add(message)
            warn(message)
    return warn_once


# ------------------------------------------------------------------------------------------------ inputs
def open_image(path: str, console: Console, option: str = "--image", max_pixels: int = MAX_PIXELS,
               limit: str = "--max-pixels"):
    """An image file as a loaded PIL image in its own mode (RGB conversion: `image_processing.to_rgb`, later), with
    a warning when it is not 8-bit RGB; CLIError naming the option when it is missing or unreadable, or above the
    size policy's file limit (16 x `max_pixels` pixels: refused from its header, before it is decoded; `limit` names
    how the limit is raised)."""
    from PIL import UnidentifiedImageError

    from ..image_files import TooLarge, open_image_file
    if not os.path.isfile(path):
        raise CLIError(f"{option}: image file not found: {path}")
    try:
        with open_image_file(path, f"{option} {path}", max_pixels=max_pixels, raise_with=limit) as img:
            sixteen_bit_rgb = img.mode == "RGB" and any(";16" in str(t.args) for t in img.tile)
            img.load()
    except TooLarge as e:
        raise CLIError(str(e)) from e
    except UnidentifiedImageError as e:
        raise CLIError(f"{option}: {path} is not a readable image ({e})") from e
    except (OSError, ValueError) as e:  # truncated files, bad headers
        raise CLIError(f"{option}: {path} could not be read ({e})") from e
    if img.mode != "RGB":
        kind = MODE_NAMES.get(img.mode, f"a {img.mode}")
        extra = "; the alpha channel is dropped" if "A" in img.mode or img.mode in ("RGBa", "La") else \
            "; scaled to 8 bits (0..max -> 0..255)" if img.mode.startswith("I") else ""
        console.warn(f"{option} {path} is {kind} image (PIL mode {img.mode}); converted to 8-bit RGB{extra}")
    elif sixteen_bit_rgb:
        console.warn(f"{option} {path} is a 16-bit RGB image; reduced to 8 bits per channel")
    return img


def read_depth_map(path: str, max_pixels: int = MAX_PIXELS):
    """`--depth-map FILE` -> (H, W) float32 numpy array (`depth.read_depth_map`, torch-free: image_files.py), its
    errors as the option's (a file above 16 x `max_pixels` pixels is refused before it is decoded)."""
    from ..image_files import read_depth_map as read
    try:
        return read(path, max_pixels)
    except ValueError as e:
        raise CLIError(f"--depth-map: {str(e).replace('`max_pixels`', '--max-pixels')}") from e


# ------------------------------------------------------------------------------------------------ outputs
def planned_outputs(out: Path, num_images: int, save_depth: bool, grid: bool) -> dict[str, list[Path]]:
    """Every file `generate` will write: out.png, or out-1.png ... out-N.png; out-depth.png; out-grid.png."""
    stem, suffix = out.with_suffix(""), out.suffix or ".png"
    images = [stem.with_suffix(suffix)] if num_images == 1 else \
        [stem.with_name(f"{stem.name}-{i}{suffix}") for i in range(1, num_images + 1)]
    return {"images": images,
            "depth": [stem.with_name(f"{stem.name}-depth.png")] if save_depth else [],
            "grid": [stem.with_name(f"{stem.name}-grid.png")] if grid else []}


def check_outputs(paths: list[Path], overwrite: bool) -> None:
    """Fail before any work if an output exists (without --overwrite) or cannot be written as an image."""
    from PIL import Image
    extensions = Image.registered_extensions()
    for path in paths:
        if path.suffix.lower() not in extensions or extensions[path.suffix.lower()] not in Image.SAVE:
            raise CLIError(f"cannot write {path}: unknown image file extension {path.suffix!r} (use .png)", code=2)
        if path.is_dir():
            raise CLIError(f"output {path} is a folder; give a file name such as {path / 'out.png'}", code=2)
        if path.exists() and not overwrite:
            raise CLIError(f"output {path} already exists; pass --overwrite to replace it, or choose another --out")
    if len(set(paths)) != len(paths):
        dup = sorted({str(p) for p in paths if paths.count(p) > 1})
        raise CLIError(f"two outputs would share a file name: {', '.join(dup)} (photos with the same name?)", code=2)


def save_atomic(image, path: Path, overwrite: bool = False, pnginfo=None) -> None:
    """Write a PIL image to `path` through a temporary file in the same folder + os.replace (atomic on POSIX/NTFS).
    `pnginfo` (a PngInfo) is stored in PNG files only."""
    from PIL import Image
    if path.exists() and not overwrite:  # appeared while we were computing
        raise CLIError(f"output {path} already exists; pass --overwrite to replace it, or choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = Image.registered_extensions()[path.suffix.lower()]
    extra = {"pnginfo": pnginfo} if pnginfo is not None and fmt == "PNG" else {}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt, **extra)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # includes KeyboardInterrupt: never leave the temporary file behind
        Path(tmp).unlink(missing_ok=True)
        raise


def compose_grid(images: list, height: int | None = None, labels: list[str] | None = None, border: int = 0):
    """Side by side, left to right, all scaled to the same height (the last image's by default). With `border`, a
    white frame of that many pixels around and between the tiles; with `labels`, a caption strip under each tile."""
    from PIL import Image, ImageDraw, ImageFont
    height = height or images[-1].height
    scaled = [im if im.height == height else
              im.resize((max(1, round(im.width * height / im.height)), height), Image.BICUBIC) for im in images]
    font_size = max(10, min(32, height // 16))
    strip = round(font_size * 1.5) if labels else 0
    width = sum(im.width for im in scaled) + border * (len(scaled) + 1)
    grid = Image.new("RGB", (width, height + strip + 2 * border), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=font_size) if labels else None
    x = border
    for i, im in enumerate(scaled):
        grid.paste(im.convert("RGB"), (x, border))
        if labels:
            text = labels[i]
            while text and draw.textlength(text, font=font) > im.width - 2 and len(text) > 1:
                text = text[:-2] + "…"
            draw.text((x + im.width / 2, border + height + strip / 2), text, fill=(30, 30, 30), font=font,
                      anchor="mm")
        x += im.width + border
    return grid
