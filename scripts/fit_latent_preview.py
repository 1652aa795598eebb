"""Fit the linear latent -> RGB preview of minidepth/inside/filmstrip.py (`LATENT_RGB`, `LATENT_RGB_BIAS`) on a VAE.

    python scripts/fit_latent_preview.py --model weights/stable-diffusion-2-depth [--images a.jpg b.jpg ...]

Encodes images (the given photos, or synthetic ones: colour gradients, blobs and stripes) with the checkpoint's
autoencoder (posterior mean, times the scaling factor: the UNet's latent space), averages each image over the 8x8
pixel blocks of one latent pixel, and solves the least-squares problem  colour ~ W^T z + b  (W: 4x3, b: 3) over all
latent pixels. Prints the constants to paste into filmstrip.py and the fit's RMS error in [-1, 1] units.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from minidepth.image_processing import load_image, preprocess
from minidepth.inside.filmstrip import fit_latent_preview
from minidepth import AutoencoderKL  # with its loading side (minidepth/checkpoints)


def synthetic_images(n: int, size: int = 256, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1]: smooth random colour fields with blobs and stripes (all hues and brightness)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        channels = []
        for _ in range(3):
            a, b, c, d = rng.uniform(-6, 6, 4)
            field = np.sin(a * x + b * y + rng.uniform(0, 6)) * np.cos(c * x - d * y)
            blob = np.exp(-((x - rng.uniform()) ** 2 + (y - rng.uniform()) ** 2) * rng.uniform(5, 40))
            channels.append(np.clip(0.5 + 0.4 * field + rng.uniform(-1, 1) * blob, 0, 1))
        out.append(np.stack(channels))
    return torch.from_numpy(np.stack(out)).float() * 2 - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder (with vae/)")
    parser.add_argument("--images", nargs="*", help="photos to fit on (default: 16 synthetic images)")
    parser.add_argument("--size", type=int, default=256, help="side of the images (default 256)")
    args = parser.parse_args()
    vae = AutoencoderKL.from_pretrained(f"{args.model}/vae")
    if args.images:
        images = torch.cat([preprocess(load_image(p).resize((args.size, args.size))) for p in args.images])
    else:
        images = synthetic_images(16, args.size)
    with torch.no_grad():
        latents = torch.cat([vae.encode(im[None]).mode() for im in images]) * vae.config.scaling_factor
    weights, bias = fit_latent_preview(latents, images)
    predicted = torch.einsum("bchw,cr->brhw", latents.double(), weights) + bias[None, :, None, None]
    target = torch.nn.functional.adaptive_avg_pool2d(images.double(), latents.shape[-2:])
    rms = float(((predicted - target) ** 2).mean().sqrt())
    print("LATENT_RGB = (" + ",\n              ".join(
        "(" + ", ".join(f"{v:.3f}" for v in row) + ")" for row in weights.tolist()) + ")")
    print("LATENT_RGB_BIAS = (" + ", ".join(f"{v:.3f}" for v in bias.tolist()) + ")")
    print(f"# fit on {len(images)} images of {args.size}x{args.size}: RMS error {rms:.3f} (colours in [-1, 1])")


if __name__ == "__main__":
    main()
