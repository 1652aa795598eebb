"""Winograd's minimal filtering F(2x2, 3x3) for the UNet's 3x3 convolutions at 16x16 latents (fast_kernels.py point 9).

Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks", eq. 8: a 2x2 block of outputs Y of a 3x3
convolution is computed from the 4x4 input tile d around it and the 3x3 kernel g as

    Y = A^T [ (G g G^T) (.) (B^T d B) ] A          (.) : elementwise, over the 16 positions of the 4x4 tile

    B^T = [[1,  0, -1,  0],      G = [[1,    0,   0 ],      A^T = [[1, 1,  1,  0],
           [0,  1,  1,  0],           [1/2, 1/2, 1/2],             [0, 1, -1, -1]]
           [0, -1,  1,  0],           [1/2,-1/2, 1/2],
           [0,  1,  0, -1]]           [0,    0,   1 ]]

Summed over the input channels, each of the 16 tile positions is one matrix product: with U = G g G^T for every
(output, input) channel pair, (16, O, C), and V = B^T d B for every tile, (16, tiles, C), M[k] = U[k] @ V[k]^T. That
is 16 multiply-adds per 2x2 outputs and channel pair instead of 36: 2.25x fewer. The transforms B^T . B and A^T . A
are additions only. The rounding differs from the direct sum (G has halves, and the tile sums cancel): on the UNet's
sizes ~1e-6 of the output's scale (against a float64 convolution: 7e-7-1.6e-6 for 640-2560 channels), between the
direct convolution's ~4e-7 and NNPACK's F(6x6, 3x3), ~1e-5.

U is 16/9 the size of the kernel, so it pays where a weight is used on many steps: the denoising loop keeps it
(`fast_kernels.py`). At 16x16 positions (batch 2, measured on a 2-core AMD EPYC): 640 channels 17.3 -> 11.0 ms,
1280 channels 62.8 -> 35.8 ms, 2560 -> 1280 channels 129 -> 71 ms against oneDNN's direct convolution. Kept for good,
with the kernel's own pages of the memory-mapped checkpoint given back (`cpu_memory.release_file_pages`), each costs
7/16 of its size in resident memory: 425 MB kept for 239 MB given back at 256x256 (the 640-channel level), 1300 for
731 MB at 512x512 (the 1280-channel one). Where it is not used, measured: below 16x16 positions the kernels' sizes
outweigh the arithmetic saved (the 8x8 level at 256x256: 1.36 GB more for ~90 ms per call); from 32x32 on NNPACK's
F(6x6, 3x3) is as fast (640 channels: 44.0 against 42.9 ms) and keeps nothing; with AVX2 (oneDNN limited to it on the
same CPU) oneDNN's own 16x16 convolution is as fast (640 channels 12.1 against 12.0 ms, 1280: 41.8 against 42.0).
"""

from __future__ import annotations

import threading

import torch
import torch.utils.weak

# G of eq. 8 as one (16, 9) matrix on the flattened 3x3 kernel: U = G g G^T  <=>  vec(U) = (G kron G) vec(g)
_G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
_G_KRON = torch.kron(_G, _G)  # (16, 9)


def winograd_weights(weight: torch.Tensor) -> torch.Tensor:
    """U = G g G^T for every channel pair: (O, C, 3, 3) -> (16, O, C), tile position (row-major) first."""
    O, C = weight.shape[:2]
    return (_G_KRON.to(weight) @ weight.reshape(O * C, 9).T).view(16, O, C)


def _input_tiles(x: torch.Tensor) -> torch.Tensor:
    """V = B^T d B for every 4x4 tile d of the image padded by 1, tiles at a stride of 2 (one per 2x2 output block):
    (N, C, H, W) -> (16, N * H/2 * W/2, C), the channels innermost (the matrix products' inner dimension)."""
    N, C, H, W = x.shape
    padded = x.new_zeros(N, H + 2, W + 2, C)  # channels-last, so each tile element below is a (.., C) slab
    padded[:, 1:-1, 1:-1] = x.permute(0, 2, 3, 1)
    sn, sh, sw, sc = padded.stride()
    d = padded.as_strided((4, 4, N, H // 2, W // 2, C), (sh, sw, sn, 2 * sh, 2 * sw, sc))  # d[i, j]: tile element
    rows = (d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3])  # B^T d
    V = x.new_empty(4, 4, N, H // 2, W // 2, C)
    for i, r in enumerate(rows):  # (B^T d) B
        torch.sub(r[0], r[2], out=V[i, 0])
        torch.add(r[1], r[2], out=V[i, 1])
        torch.sub(r[2], r[1], out=V[i, 2])
        torch.sub(r[1], r[3], out=V[i, 3])
    return V.view(16, -1, C)


def _output_blocks(m: list[torch.Tensor], N: int, H: int, W: int) -> torch.Tensor:
    """Y = A^T M A for every tile: the 16 products M[k] (O, N * H/2 * W/2) -> (N, O, H, W)."""
    O = m[0].shape[0]
    m = [t.view(O, N, H // 2, W // 2) for t in m]
    rows = [[m[j] + m[4 + j] + m[8 + j] for j in range(4)],  # A^T M: 2 rows of 4 columns
            [m[4 + j] - m[8 + j] - m[12 + j] for j in range(4)]]
    y = m[0].new_empty(N, O, H // 2, 2, W // 2, 2)
    blocks = y.permute(3, 5, 1, 0, 2, 4)  # (row in block, column in block, O, N, H/2, W/2), a view of y
    for a, r in enumerate(rows):  # (A^T M) A
        torch.add(r[0] + r[1], r[2], out=blocks[a, 0])
        torch.sub(r[1] - r[2], r[3], out=blocks[a, 1])
    return y.view(N, O, H, W)


def conv3x3_winograd(x: torch.Tensor, U: torch.Tensor, bias: torch.Tensor | None, matmul) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) for a 3x3 kernel given as U = winograd_weights(weight); H and W even.
    `matmul(a, b)` = a @ b^T (fast_kernels.linear). (N, C, H, W) -> (N, O, H, W), NCHW."""
    N, _, H, W = x.shape
    V = _input_tiles(x)  # (16, P, C)
    y = _output_blocks([matmul(U[k], V[k]) for k in range(16)], N, H, W)  # 16 products (O, P)
    return y if bias is None else y.add_(bias.view(-1, 1, 1))


class KeptWeights:
    """winograd_weights(w) kept with each weight w while it lives, across denoising loops, up to a byte budget; made
    again when w changed: its version or storage (`state`), or one of 64 of its values sampled across it, since a
    change made through `.data` (`w.data += d`) passes PyTorch's version counter by. A change that leaves all 64 alike
    is not seen: change weights in place under torch.no_grad() (as fuse_lora does), or give them new tensors."""

    def __init__(self):
        self.entries = torch.utils.weak.WeakIdKeyDictionary()  # weight -> ((state, sample), U)
        self.lock = threading.Lock()  # (one pipeline's loops may run on several threads: a web page's)

    def get(self, weight: torch.Tensor, state, budget: int) -> tuple[torch.Tensor | None, bool]:
        """(U, whether it was made now); (None, False) when a new U would take the kept ones past `budget` bytes."""
        flat = weight.reshape(-1)
        key = (state, flat[::max(1, flat.numel() // 64)].clone())
        with self.lock:
            entry = self.entries.get(weight)
            if entry is not None and entry[0][0] == key[0] and torch.equal(entry[0][1], key[1]):
                return entry[1], False
            kept = sum(U.nbytes for _, U in self.entries.values()) - (entry[1].nbytes if entry else 0)
            if kept + weight.nbytes * 16 // 9 > budget:
                return None, False
            self.entries[weight] = entry = (key, winograd_weights(weight))
        return entry[1], True

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(list(self.entries.keys()))
