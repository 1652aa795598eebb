"""Tiled VAE encoding and decoding: bounded memory for large images, step for step as diffusers' `AutoencoderKL`.

The input is cut into square tiles that start every `stride = int(tile * (1 - overlap))` pixels (or latent pixels), so
neighbours overlap by a quarter of a tile by default. Each tile goes through the encoder (decoder) on its own. Then,
row by row and left to right, each output tile is cross-faded with its upper and left neighbours over `blend` rows and
columns (a linear ramp, `blend_rows` / `blend_columns`, done IN PLACE so later tiles see already-blended neighbours,
exactly as diffusers does), cropped to its first `keep = out_tile - blend` rows and columns, and the crops are joined.

Tiles at the right and bottom edges may be smaller than a full tile (and crops of them shorter); the output has the
same size as the untiled result. Tiling changes the numbers slightly (each tile sees only its own context): it is a
memory switch, off by default.

Shapes: images `B C H W` (pixels), latents/moments `B c h w`.
"""

from __future__ import annotations

from typing import Callable

import torch


def _blend(previous: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> None:
    """Cross-fade the first `extent` rows (dim=2) or columns (dim=3) of `tile` with the last ones of `previous`,
    in place: tile[k] = previous[-extent + k] * (1 - k / extent) + tile[k] * (k / extent), k = 0 .. extent-1."""
    extent = min(previous.shape[dim], tile.shape[dim], extent)
    if extent == 0:
        return
    ramp = torch.arange(extent, dtype=torch.float64) / extent  # k / extent, in double like diffusers' Python floats
    shape = [1, 1, 1, 1]
    shape[dim] = extent
    fade_in = ramp.to(tile.dtype).to(tile.device).view(shape)
    fade_out = (1 - ramp).to(tile.dtype).to(tile.device).view(shape)
    head = tile.narrow(dim, 0, extent)
    tail = previous.narrow(dim, previous.shape[dim] - extent, extent)
    head.copy_(tail * fade_out + head * fade_in)


def blend_rows(above: torch.Tensor, tile: torch.Tensor, extent: int) -> torch.Tensor:
    """diffusers' `blend_v`: fade `above`'s bottom rows into `tile`'s top rows (in place). Returns `tile`."""
    _blend(above, tile, extent, dim=2)
    return tile


def blend_columns(left: torch.Tensor, tile: torch.Tensor, extent: int) -> torch.Tensor:
    """diffusers' `blend_h`: fade `left`'s last columns into `tile`'s first columns (in place). Returns `tile`."""
    _blend(left, tile, extent, dim=3)
    return tile


def _tiled(x: torch.Tensor, run_tile: Callable[[torch.Tensor], torch.Tensor], in_tile: int, out_tile: int,
           overlap: float) -> torch.Tensor:
    stride = int(in_tile * (1 - overlap))  # input pixels between tile starts
    blend = int(out_tile * overlap)  # output rows/columns cross-faded with the neighbour
    keep = out_tile - blend  # output rows/columns each tile contributes
    # 1. run every tile (top to bottom, left to right)
    rows = [[run_tile(x[:, :, i:i + in_tile, j:j + in_tile]) for j in range(0, x.shape[3], stride)]
            for i in range(0, x.shape[2], stride)]
    # 2. blend each tile with its (already blended) upper and left neighbours, crop, and join
    joined_rows = []
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                blend_rows(rows[i - 1][j], tile, blend)
            if j > 0:
                blend_columns(row[j - 1], tile, blend)
        joined_rows.append(torch.cat([tile[:, :, :keep, :keep] for tile in row], dim=3))
    return torch.cat(joined_rows, dim=2)


def tiled_encode(x: torch.Tensor, encode_tile: Callable[[torch.Tensor], torch.Tensor], tile_size: int,
                 latent_tile_size: int, overlap: float = 0.25) -> torch.Tensor:
    """Images (B, C, H, W) -> moments (B, 2c, ~H/8, ~W/8), with `encode_tile` = encoder + quant_conv on each
    `tile_size` x `tile_size` pixel tile (diffusers' `_tiled_encode`)."""
    return _tiled(x, encode_tile, tile_size, latent_tile_size, overlap)


def tiled_decode(z: torch.Tensor, decode_tile: Callable[[torch.Tensor], torch.Tensor], tile_size: int,
                 latent_tile_size: int, overlap: float = 0.25) -> torch.Tensor:
    """Latents (B, c, h, w) -> images (B, C, 8h, 8w), with `decode_tile` = post_quant_conv + decoder on each
    `latent_tile_size` x `latent_tile_size` latent tile (diffusers' `tiled_decode`)."""
    return _tiled(z, decode_tile, latent_tile_size, tile_size, overlap)
