"""Training data: the image folder, captions, depth maps, and the square crops the model sees.

    folder/cat.png  folder/cat.txt  [folder/cat.depth.png]     a caption file per image (own depth map optional), or
    folder/metadata.jsonl                                        {"file_name": "cat.png", "text": "a cat"} per line

`scan_folder` reads and checks everything (every image decoded, every caption and depth map present) before a model
loads, and raises one TrainError naming every bad file. Only PIL here; torch is imported by the functions that
make tensors.

A sample (`load_sample`): the photo's shorter side is resized to the resolution (bilinear, aspect kept, as diffusers'
train_text_to_image does), then a square is cut (center, or at an offset drawn from the sample's generator). The
depth map belongs to the WHOLE photo, as the pipeline estimates it from the whole photo: the DPT output (or the
user's NAME.depth.png, larger = nearer) is cut at the same box, in its own pixel grid, and `depth.prepare_depth_map`
then makes the depth channel exactly as the pipeline does (bicubic to resolution / 8, min-max to [-1, 1]). When the
box is the whole photo, that is bit for bit the pipeline's depth channel for that photo.

Randomness: every sample has its own torch.Generator, seeded by (seed, step, index in the global batch)
(`sample_generator`), never by the process, so any number of processes draw the same crops, timesteps and noise.
The order of the samples is a fresh permutation per epoch, seeded by (seed, epoch) (`sample_order`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..image_files import MAX_PIXELS
from .config import TrainError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
DEPTH_SUFFIX = ".depth.png"


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str
    depth: Path | None          # the user's own depth map, or None: estimated by the DPT (and cached)


# ------------------------------------------------------------------------------------------------ the folder
def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.lower().endswith(DEPTH_SUFFIX)


def _metadata_captions(path: Path) -> dict[str, str]:
    captions = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainError(f"{path} line {number} is not valid JSON ({e.msg})") from e
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
            raise TrainError(f"{path} line {number}: needs a \"file_name\" (and a \"text\")")
        text = record.get("text", "")
        if not isinstance(text, str):
            raise TrainError(f"{path} line {number}: \"text\" must be a string")
        captions[record["file_name"]] = text
    return captions


def scan_folder(folder, allow_empty_captions: bool = False, warn=None, max_pixels: int = MAX_PIXELS) -> list[Example]:
    """The folder's examples, sorted by file name, all checked. `warn(message)` gets the warnings (None: silent).
    An image or depth map above 16 x `max_pixels` pixels is refused from its header, before it is decoded (the size
    policy of minidepth/image_files.py; training resizes the photos, so their own size is not limited otherwise)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainError(f"--data {folder}: folder not found")
    metadata = folder / "metadata.jsonl"
    captions = _metadata_captions(metadata) if metadata.is_file() else None
    if captions is not None:
        missing = [name for name in captions if not (folder / name).is_file()]
        if missing:
            raise TrainError(f"{metadata} names images that are not in {folder}: {', '.join(missing[:5])}")
        images = sorted(folder / name for name in captions)
    else:
        images = sorted(p for p in folder.iterdir() if p.is_file() and _is_image(p))
    if not images:
        raise TrainError(f"--data {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}; NAME.txt captions or "
                         "metadata.jsonl)")
    problems, uncaptioned, examples = [], [], []
    for path in images:
        problem = _check_image(path, max_pixels)
        if problem:
            problems.append(problem)
        caption = captions.get(path.relative_to(folder).as_posix()) if captions is not None else _read_caption(path)
        if caption is None or not caption.strip():
            uncaptioned.append(path.name)
            caption = ""
        depth = path.with_name(path.stem + DEPTH_SUFFIX)
        if depth.is_file():
            problem = _check_depth(depth, max_pixels)
            if problem:
                problems.append(problem)
        examples.append(Example(path, caption.strip(), depth if depth.is_file() else None))
    if problems:
        raise TrainError(f"--data {folder}: {len(problems)} unreadable file(s):\n  " + "\n  ".join(problems))
    if uncaptioned:
        where = "no entry in metadata.jsonl" if captions is not None else "no NAME.txt caption"
        listing = ", ".join(uncaptioned[:5]) + (f" and {len(uncaptioned) - 5} more" if len(uncaptioned) > 5 else "")
        if not allow_empty_captions:
            raise TrainError(f"--data {folder}: {len(uncaptioned)} image(s) without a caption ({where}): {listing}; "
                             "add captions, or pass --allow-empty-captions to train them with the empty caption")
        if warn:
            warn(f"{len(uncaptioned)} image(s) without a caption are trained with the empty caption: {listing}")
    return examples


def _read_caption(image: Path) -> str | None:
    path = image.with_suffix(".txt")
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _check_image(path: Path, max_pixels: int = MAX_PIXELS) -> str | None:
    from ..image_files import TooLarge, open_image_file
    try:
        with open_image_file(path, str(path), max_pixels=max_pixels, raise_with="--max-pixels") as img:
            img.load()  # decodes everything: truncated and corrupt files fail here
            size = img.size
    except TooLarge as e:
        return str(e)
    except Exception as e:  # noqa: BLE001  (PIL raises OSError, ValueError, SyntaxError, ... for bad files)
        return f"{path}: not a readable image ({type(e).__name__}: {e})"
    if min(size) < 8:
        return f"{path}: {size[0]}x{size[1]} pixels; images must be at least 8x8"
    return None


def _check_depth(path: Path, max_pixels: int = MAX_PIXELS) -> str | None:
    from ..image_files import read_depth_map
    try:
        read_depth_map(path, max_pixels)
    except ValueError as e:
        return str(e).replace("`max_pixels`", "--max-pixels")
    return None


def fingerprint(examples: list[Example]) -> str:
    """A short hash of the data (names, sizes, captions): a resumed run must train on the same folder."""
    h = hashlib.sha256()
    for e in examples:
        h.update(f"{e.image.name}\0{e.image.stat().st_size}\0{e.caption}\0{e.depth is not None}\n".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ randomness
def derive_seed(*parts) -> int:
    """A 63-bit seed from the parts (e.g. (seed, step, index)): the same numbers on every process and machine."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def sample_generator(seed: int, step: int, index: int):
    """The generator of sample `index` (0 .. global batch - 1) of optimizer step `step`."""
    import torch
    return torch.Generator().manual_seed(derive_seed(seed, step, index))


def sample_order(n: int, seed: int, start: int, count: int) -> list[int]:
    """The examples at stream positions start .. start + count - 1: epoch e = position // n is a permutation of the
    n examples seeded by (seed, "epoch", e); so position p = step × global batch + index needs no other state."""
    import torch
    out, cache = [], {}
    for position in range(start, start + count):
        epoch = position // n
        if epoch not in cache:
            g = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch))
            cache[epoch] = torch.randperm(n, generator=g).tolist()
        out.append(cache[epoch][position % n])
    return out


# ------------------------------------------------------------------------------------------------ one sample
def open_rgb(path: Path):
    """The image, decoded, as 8-bit RGB (as the pipeline converts photos)."""
    from PIL import Image

    from ..image_processing import to_rgb
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def crop_box(width: int, height: int, resolution: int, crop: str, generator) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized width, height), (left, top)) of the square: shorter side -> resolution (torchvision's rule for the
    longer side: int(resolution × long / short)); random crops draw top, then left, from `generator`."""
    import torch
    if width <= height:
        size = (resolution, int(resolution * height / width))
    else:
        size = (int(resolution * width / height), resolution)
    if crop == "random":
        top = int(torch.randint(0, size[1] - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, size[0] - resolution + 1, (1,), generator=generator))
    else:
        top, left = round((size[1] - resolution) / 2), round((size[0] - resolution) / 2)
    return size, (left, top)


def load_sample(example: Example, resolution: int, crop: str, generator, depth_cache: DepthCache):
    """(pixels (3, R, R) float32 in [-1, 1], depth (h, w) float32 for the same square of the photo)."""
    import numpy as np
    import torch
    from PIL import Image

    photo = open_rgb(example.image)
    size, (left, top) = crop_box(photo.width, photo.height, resolution, crop, generator)
    resized = photo.resize(size, Image.BILINEAR) if size != photo.size else photo
    square = resized.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0).permute(2, 0, 1) * 2.0 - 1.0
    depth = depth_cache.get(example)  # (H_d, W_d) for the whole photo
    hd, wd = depth.shape
    x0, x1 = round(left * wd / size[0]), round((left + resolution) * wd / size[0])
    y0, y1 = round(top * hd / size[1]), round((top + resolution) * hd / size[1])
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    return pixels.contiguous(), torch.from_numpy(np.ascontiguousarray(depth[y0:y1, x0:x1]))


# ------------------------------------------------------------------------------------------------ depth maps
class DepthCache:
    """Depth maps of the whole photos: the user's NAME.depth.png, or the depth model's estimate, computed once and
    stored as float32 .npy in `folder`, named by the image's content hash (a changed photo is estimated again) and
    the depth model's key (checkpoints.depth_models.depth_model_key: another model, other entries; the default
    "dpt-hybrid" keeps the names of caches made before the depth slot existed)."""

    def __init__(self, folder: Path, model_key: str = "dpt-hybrid"):
        self.folder, self.model_key = Path(folder), model_key
        self._paths: dict[Path, Path] = {}

    def path(self, example: Example) -> Path:
        if example.image not in self._paths:
            digest = hashlib.sha256(example.image.read_bytes()).hexdigest()[:16]
            model = "" if self.model_key == "dpt-hybrid" else f"-{self.model_key}"
            self._paths[example.image] = self.folder / f"{example.image.stem}-{digest}{model}.npy"
        return self._paths[example.image]

    def missing(self, examples: list[Example]) -> list[Example]:
        return [e for e in examples if e.depth is None and not self.path(e).is_file()]

    def estimate(self, examples: list[Example], pipe, progress: bool = False) -> None:
        """Run the pipeline's depth model on each photo without a depth map (as the pipeline does); store atomically."""
        import numpy as np
        import torch
        from tqdm.auto import tqdm

        from ..depth import estimate_depth
        todo = self.missing(examples)
        self.folder.mkdir(parents=True, exist_ok=True)
        for e in tqdm(todo, desc="depth maps", disable=not progress or not todo):
            photo = open_rgb(e.image)
            with torch.no_grad():
                depth = estimate_depth(photo, pipe.depth_estimator, pipe.feature_extractor)[0]
            target = self.path(e)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
            with open(tmp, "wb") as f:
                np.save(f, depth.float().cpu().numpy())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)

    def get(self, example: Example):
        import numpy as np
        if example.depth is not None:
            from ..depth import read_depth_map
            return read_depth_map(str(example.depth))
        return np.load(self.path(example), allow_pickle=False).astype(np.float32)
