"""Draw the web page's sample photo, minidepth/data/sample-photo.png: a synthetic scene (no licence questions).

    python scripts/make_sample_photo.py

A sky, a ground plane that recedes to the horizon, a shaded sphere and a box in front of it, so the depth estimator
has near and far parts. Deterministic: the same PNG every time.
"""

from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parents[1] / "minidepth" / "data" / "sample-photo.png"


def sample_photo(width: int = 512, height: int = 384) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = x / width, y / height
    horizon = 0.45
    sky = np.stack([0.45 + 0.3 * v, 0.65 + 0.2 * v, 0.95 - 0.1 * v], -1)
    depth = np.clip((v - horizon) / (1 - horizon), 1e-3, 1)      # 0 at the horizon, 1 at the bottom edge
    checks = (np.floor(u / depth * 3 - 1.5 / depth) + np.floor(1 / depth * 2)) % 2  # a receding checkerboard
    ground = np.stack([0.35 + 0.25 * depth, 0.55 + 0.15 * checks * depth, 0.25 + 0.05 * checks], -1)
    img = np.where((v > horizon)[..., None], ground, sky)
    cx, cy, r = 0.62 * width, 0.58 * height, 0.2 * height          # a sphere lit from the upper left
    dx, dy = (x - cx) / r, (y - cy) / r
    inside = dx ** 2 + dy ** 2 < 1
    nz = np.sqrt(np.clip(1 - dx ** 2 - dy ** 2, 0, 1))
    light = np.clip(-0.5 * dx - 0.6 * dy + 0.6 * nz, 0.08, 1)
    img = np.where(inside[..., None], np.stack([0.9 * light, 0.35 * light, 0.3 * light], -1), img)
    box = (x > 0.12 * width) & (x < 0.36 * width) & (y > 0.6 * height) & (y < 0.9 * height)
    img = np.where(box[..., None], np.array([0.8, 0.7, 0.45]) * (0.75 + 0.25 * u[..., None] / 0.36), img)
    return Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))


if __name__ == "__main__":
    sample_photo().save(OUT, optimize=True)
    print(OUT)
