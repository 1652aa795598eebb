"""Photos and depth maps from files, under ONE size policy for every entry point: the Python API
(`load_image`, `read_depth_map`, the pipeline's `__call__`), `minidepth generate`, `depth`, `batch`, `train-lora` and
the page of `minidepth serve`.

The policy (README, "Limits and safety"):
  - images are generated at most `max_pixels` pixels, MAX_PIXELS = 2048 x 2048 by default, counted at the size the
    generation runs at (after --width/--height): `check_generation_size`. SD2-depth is trained at 512-768 pixels a
    side, and at 2048 x 2048 the UNet's attention already needs many GB;
  - an input FILE with more than FILE_FACTOR x max_pixels pixels (16 x 4.2 = 67 Mpx by default) is refused from its
    header, before anything is decoded (`open_image_file`, `read_depth_map`): decoding it alone would take hundreds
    of MB, and a 17 KB PNG can claim 12000 x 12000 pixels. A 12 Mpx phone photo passes; it only needs --width/--height
    to be generated;
  - PIL's own guard stays: an image above 2 x PIL.Image.MAX_IMAGE_PIXELS (179 Mpx) raises DecompressionBombError in
    `Image.open`, reported here as the same refusal (TooLarge). PIL's DecompressionBombWarning (above 89 Mpx) is
    silenced: the limit here, lower by default, decides.

A refusal is a `TooLarge` (a ValueError) naming the file, its size, the limit and how to go on. `name` is how the
caller names the file ("--image photo.png", "the photo"), `raise_with` how the limit is raised; the library's own
words are the argument's, "`max_pixels`", which the command line turns into --max-pixels (cli/args.OPTION_OF).

Only the standard library is imported at import time (PIL and numpy inside the functions): the command line reads
MAX_PIXELS for its options, and checks its files, before torch is imported.
"""

from __future__ import annotations

import numbers
import os
import re

MAX_PIXELS = 2048 * 2048      # the largest generation, in pixels (after --width/--height)
FILE_FACTOR = 16              # an input file may have FILE_FACTOR x max_pixels pixels before it is decoded
API_LIMIT = "`max_pixels`"    # how the library's messages name the limit


class TooLarge(ValueError):
    """An image or a depth map above the size policy (a ValueError: code that reports those reports this too)."""


def file_limit(max_pixels: int = MAX_PIXELS) -> int:
    """The most pixels (values, for a .npy) an input file may have before it is decoded."""
    return FILE_FACTOR * max_pixels


def mpx(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} Mpx"


def check_max_pixels(value, name: str = API_LIMIT) -> int:
    """A limit given by the user: an integer >= 64 (8 x 8 pixels, the smallest image); ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 64:
        raise ValueError(f"{name} {value!r}: must be an integer >= 64 (pixels; 8x8 is the smallest image)")
    return int(value)


def _limit_text(max_pixels: int) -> str:
    side = int(max_pixels ** 0.5)
    return f"{mpx(max_pixels)} ({side}x{side})" if side * side == max_pixels else mpx(max_pixels)


# ------------------------------------------------------------------------------------------------ the two checks
def refuse_large_file(name: str, described: str, values: int, decoded_bytes: int, max_pixels: int = MAX_PIXELS,
                      raise_with: str = API_LIMIT) -> None:
    """TooLarge when a file holds more than `file_limit(max_pixels)` pixels (`values`). `described`: its size in
    words ("is 12000x12000 pixels"); `decoded_bytes`: what decoding it would take at least."""
    if values > file_limit(max_pixels):
        raise TooLarge(f"{name} {described} ({mpx(values)}): a file may have at most {mpx(file_limit(max_pixels))} "
                       f"({FILE_FACTOR} x the largest image, {_limit_text(max_pixels)}) before it is decoded, and "
                       f"decoding this one alone would take {decoded_bytes / 1e6:,.0f} MB; make it smaller first, or "
                       f"raise {raise_with}")


def check_generation_size(size: tuple[int, int], name: str, max_pixels: int = MAX_PIXELS,
                          how: str = f"; resize it, or pass a larger {API_LIMIT}") -> None:
    """TooLarge when a generation at `size` = (W, H) would exceed `max_pixels`. `how`: what the user can do, in the
    caller's words (the command line: "; pass --width/--height for a smaller size, or raise --max-pixels")."""
    w, h = size
    if w * h > max_pixels:
        raise TooLarge(f"{name} is {w}x{h} pixels ({mpx(w * h)}): images are generated at most "
                       f"{_limit_text(max_pixels)}{how}")


# ------------------------------------------------------------------------------------------------ photos
def open_image_file(path, name: str | None = None, *, max_pixels: int = MAX_PIXELS, raise_with: str = API_LIMIT):
    """The image file opened lazily (PIL has read its header; nothing is decoded until `.load()`), after refusing it
    when it is above the file limit (TooLarge, the file closed again). A missing or unreadable file raises what
    `PIL.Image.open` raises (FileNotFoundError, PIL.UnidentifiedImageError, OSError): the callers word those."""
    import warnings

    from PIL import Image
    name = name or f"image file {path}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the file limit below decides
        try:
            img = Image.open(path)
        except Image.DecompressionBombError as e:
            raise _bomb(name, e, max_pixels, raise_with) from None
    try:
        w, h = img.size
        bands = len(img.getbands()) * (2 if ";16" in img.mode else 4 if img.mode in ("I", "F") else 1)
        refuse_large_file(name, f"is {w}x{h} pixels", w * h, w * h * bands, max_pixels, raise_with)
    except BaseException:
        img.close()
        raise
    return img


def _bomb(name: str, error: Exception, max_pixels: int, raise_with: str) -> TooLarge:
    """PIL's DecompressionBombError (its message holds the pixel count), as the policy's refusal."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    pixels = int(found.group(1)) if found else None
    if pixels is not None and pixels > file_limit(max_pixels):
        try:
            refuse_large_file(name, f"claims {pixels:,} pixels, which PIL refuses as a possible decompression bomb",
                              pixels, pixels, max_pixels, raise_with)
        except TooLarge as refusal:
            return refusal
    return TooLarge(f"{name}: PIL refuses to open it as a possible decompression bomb ({error}); that limit holds "
                    f"whatever {raise_with} says: make the file smaller first")


# ------------------------------------------------------------------------------------------------ depth maps
def read_depth_map(path, max_pixels: int = MAX_PIXELS):
    """A depth-map file -> (H, W) float32 numpy array, larger = nearer (the DPT convention): a .npy array, or a grey
    image (8/16-bit PNG such as the `--raw` output of `minidepth depth`). A file above the file limit is refused from
    its header, before it is decoded (TooLarge; for a .npy, its number of values counts). ValueError naming the file
    and the cause when it is missing, unreadable, in colour, 1-bit, not numbers, not 2-D or not finite.
    (`minidepth.depth.read_depth_map` is this function.)"""
    import numpy as np
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"file not found: {path}")
    array = _read_npy(path, max_pixels) if path.lower().endswith(".npy") else _read_depth_image(path, max_pixels)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        if not (np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2])):
            raise ValueError(f"{path} is a colour image; pass a grayscale depth image (e.g. the --raw "
                             "output of `minidepth depth`) or a .npy array")
        array = array[..., 0]
    elif array.ndim == 3 and array.shape[-1] == 2:  # grey + alpha: the grey
        array = array[..., 0]
    if array.dtype == np.bool_:
        raise ValueError(f"{path} holds a boolean (true/false) array; a depth map needs numbers: depths or inverse "
                         "depths, larger = nearer")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"{path} holds an array of dtype {array.dtype}; a depth map needs real numbers")
    array = np.squeeze(array)
    if array.ndim != 2:
        raise ValueError(f"{path} holds an array of shape {array.shape}; expected a 2-D (H, W) depth map")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{path} contains NaN or infinite values")
    return array


def _read_npy(path: str, max_pixels: int):
    """The .npy array, after its header (shape, dtype) passed the file limit."""
    import numpy as np
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable .npy array ({e})") from e
    values = int(np.prod(shape, dtype=np.int64)) if shape else 1
    refuse_large_file(path, f"holds an array of shape {shape}", values, values * dtype.itemsize, max_pixels)
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable .npy array ({e})") from e


def _read_depth_image(path: str, max_pixels: int):
    """A grey image as an array, after its header passed the file limit; a 1-bit image is refused before decoding."""
    import numpy as np
    try:
        img = open_image_file(path, path, max_pixels=max_pixels)
    except TooLarge:
        raise
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable .npy array or image ({e})") from e
    with img:
        if img.mode == "1":
            raise ValueError(f"{path} is a 1-bit black-and-white image; a depth map needs grey levels: an 8/16-bit "
                             "grey PNG or a .npy array")
        try:
            img.load()
            shown = img.convert("RGBA" if "A" in img.mode else "RGB") if img.mode in ("P", "PA") else img
            return np.asarray(shown)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} is not a readable .npy array or image ({e})") from e


__all__ = ["MAX_PIXELS", "FILE_FACTOR", "TooLarge", "file_limit", "check_max_pixels", "refuse_large_file",
           "check_generation_size", "open_image_file", "read_depth_map"]
