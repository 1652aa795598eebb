"""Faster CPU kernels for inference: the same maths as the models' plain PyTorch layers, rounded differently.

The models in `minidepth/models/` are written with plain `nn.Linear` / `nn.Conv2d` layers and run PyTorch's default
kernels, which are the ones diffusers runs, so the parity suite can compare them bit for bit. On the CPU five things
about those defaults cost time (measured on a 2-core AMD EPYC, fp32, official SD2-depth sizes; benchmarks/README.md):

1. Convolutions on NCHW tensors: oneDNN reorders every input into its blocked layout and every output back, and for
   each call reorders the weight too. In channels-last (NHWC) layout it reads and writes the tensors as they are:
   a 128-channel 3x3 convolution at 512x512 takes 383 ms instead of 478 ms.
2. At the UNet's lowest resolutions (4x4, 8x8 latents) a convolution does little arithmetic per weight, and the
   weight reorder (59-118 MB for a 1280-channel 3x3 kernel, into freshly allocated memory) dominates: 23 ms for a
   2x1280x4x4 input, of which 9 ms is the actual product. Written as im2col + one matrix product, the weight is
   used where it lies: (B, C, H, W) -> unfold -> (B*H*W, C*9) @ weight(O, C*9)^T -> (B, O, H, W).
3. Nearest 2x upsampling followed by a 3x3 convolution (every upsampler in the UNet and the VAE decoder) convolves an
   image in which each pixel appears four times. Each of the four output phases (even/odd row, even/odd column) is a
   2x2 convolution of the small image with summed weights, so the same result takes 4 instead of 9 multiply-adds
   per output value, and the 4x larger upsampled image is never built: 1.52 s -> 0.82 s for the VAE's 512-channel
   upsampler at 128x128 -> 256x256 (`upsample2x_conv3x3`).
4. `torch.nn.functional.linear` runs MKL's SGEMM, which takes its AVX2 code path on AMD CPUs; oneDNN's matmul uses
   AVX-512 there: 125 -> 197 GFLOP/s for the UNet's (128 x 1280) @ (1280 x 10240) feed-forward product.
5. A 3x3 convolution with 256 or more channels at 64x64 to 256x256 positions (the UNet's 64x64 latents, the VAE's
   middle sizes) is computed with Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray 2016, "Fast Algorithms for
   Convolutional Neural Networks", eq. 7-10): each 4x4 block of outputs takes 36 multiplications per channel pair
   instead of 144, at the price of transforming inputs, weights and outputs, which is memory-bound: 68 -> 49 ms for
   the UNet's 320 channels at 64x64 (batch 2), 380 -> 195 ms for the VAE's 512 at 128x128, 382 -> 290 ms for its 256
   at 256x256 (`conv3x3_winograd`). Its rounding error is ~1e-5 of the output's scale instead of ~1e-6. Not used
   where it was measured not to pay: 128 channels, 16x16 latents (the weight transform, 4x the kernel, costs more
   than it saves), 32x32 latents (it pays only with the transforms kept over the denoising loop, ~1 GB at 512x512,
   which raised the peak memory above diffusers').

`fast_kernels()` is a context manager that routes `F.linear` and `F.conv2d` calls made inside it (by any module) to
those kernels, when they are CPU float32 inference calls (no autograd graph being recorded); every other call, and
every call on other devices, dtypes, or with autograd, runs unchanged. The pipeline wraps its model calls in it
unless `pipe.set_exact(True)`: then everything is bit-identical to diffusers again. The difference between the two
modes is float rounding only (summation order); the test suite checks it stays below 1e-3 on the output image.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

LOW_RES_POSITIONS = 8 * 8  # up to this many positions per image: convolution as one matrix product (point 2)
HIGH_RES_POSITIONS = 128 * 128  # from this many positions on: channels-last convolution (point 1)
WINOGRAD_POSITIONS = (64 * 64, 256 * 256)  # 3x3 convolutions at these many positions (inclusive) ...
WINOGRAD_MIN_CHANNELS = 256  # ... with at least this many input and output channels: Winograd F(4x4, 3x3) (point 5)
WINOGRAD_CHUNK_BYTES = 16 << 20  # tiles transformed and multiplied together


_blocks = threading.local()  # .kept: the weight-transform stores of this thread's keep_transforms blocks


def active() -> bool:
    """A `fast_kernels()` block is running (the Upsample modules ask)."""
    return any(isinstance(mode, _FastKernels) for mode in torch.overrides._get_current_function_mode_stack())


def _give_back_free_memory() -> None:
    """glibc keeps freed blocks under 32 MB (most kept transforms) in the process for reuse, counted in its resident
    memory; `malloc_trim` returns them to the system (measured after a 512x512 loop that kept 1 GB: 0.9 GB)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        pass


def _transformed(kind: str, weight: torch.Tensor, make):
    """make(weight), a transform of a weight for a fast kernel (Winograd's U, the folded upsampling kernels); inside
    a `fast_kernels(keep_transforms=True)` block made once per weight and kept until the block ends."""
    stores = getattr(_blocks, "kept", None)
    if not stores:
        return make(weight)
    key = (kind, id(weight))
    entry = stores[-1].get(key)
    if entry is None or entry[0] is not weight or entry[1] != (weight._version, weight.data_ptr()):
        entry = stores[-1][key] = (weight, (weight._version, weight.data_ptr()), make(weight))  # new or changed
    return entry[2]


def available() -> bool:
    """oneDNN (mkldnn) is compiled into this torch: the fast kernels can run."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _cpu_inference(*tensors: torch.Tensor | None) -> bool:
    """Every tensor is a CPU float32 tensor and no autograd graph is being recorded through it."""
    recording = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return not recording and all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T + bias with oneDNN's matmul: (..., in) -> (..., out)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def conv2d_as_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding) -> torch.Tensor:
    """A stride-1 convolution as im2col + one matrix product (point 2 above).

    x: (B, C, H, W) -> unfold -> (B, C*kh*kw, H*W) -> (B*H*W, C*kh*kw); weight (O, C, kh, kw) viewed as (O, C*kh*kw);
    product (B*H*W, O), returned as (B, O, H, W) in channels-last memory layout (no copy).
    """
    B, _, H, W = x.shape
    O, _, kh, kw = weight.shape
    cols = F.unfold(x, (kh, kw), padding=padding)  # (B, C*kh*kw, H*W)
    out = linear(cols.transpose(1, 2).reshape(B * H * W, -1), weight.reshape(O, -1), bias)  # (B*H*W, O)
    return out.view(B, H, W, O).permute(0, 3, 1, 2)


# Winograd F(4x4, 3x3) (Lavin & Gray 2016, eq. 7): a 4x4 output tile Y of a 6x6 input tile d and a 3x3 kernel g is
# Y = A^T [(G g G^T) * (B^T d B)] A, * elementwise. Applied to flattened tiles the two-sided products are Kronecker
# products: vec(B^T d B) = (B^T kron B^T) vec(d), and likewise for G and A^T.
_BT = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
       [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
_G = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
      [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
_AT = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
_KRON_B, _KRON_G, _KRON_A = (torch.kron(m, m).float() for m in (torch.tensor(m, dtype=torch.float64)
                                                                 for m in (_BT, _G, _AT)))  # (36, 36) (36, 9) (16, 36)


def _winograd_weights(weight: torch.Tensor) -> list[torch.Tensor]:
    """U = G g G^T for every (output, input) channel pair: 36 matrices (O, C), made in six pieces (see below)."""
    O, C = weight.shape[:2]
    g = weight.reshape(O * C, 9).T
    return [u for k in range(0, 36, 6) for u in (_KRON_G[k:k + 6] @ g).view(6, O, C)]


def conv3x3_winograd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) for a 3x3 kernel with Winograd's F(4x4, 3x3) (point 5 above).

    x (B, C, H, W) -> overlapping 6x6 tiles d of the zero-padded image, one per 4x4 output block. For n tiles at a
    time: V = B^T d B (36, n, C); M[k] = V[k] @ U[k]^T (36, n, O) with U = G g G^T (36, O, C), 36 matrix products;
    Y = A^T M A (16, n, O), written to its blocks of the output (B, O, H, W), channels-last in memory.
    The tiles go through in chunks of WINOGRAD_CHUNK_BYTES (rows of tiles, each padded on its own), so that V and M
    stay in the caches and no padded copy of the whole input is made, and U is made in six pieces, each under
    glibc's 32 MB threshold for fresh (page-faulting) memory. All three measured to pay.
    """
    B, C, H, W = x.shape
    O = weight.shape[0]
    tH, tW = -(-H // 4), -(-W // 4)  # tiles per column / row; the last ones may reach past the image (zeros)
    U = _transformed("winograd", weight, _winograd_weights)  # 36 x (O, C)
    out = x.new_empty(B, tH, 4, tW, 4, O)  # (B, tile row, row in tile, tile column, column in tile, O) = NHWC
    rows = max(1, WINOGRAD_CHUNK_BYTES // (36 * tW * max(C, O) * x.element_size()))  # tile rows per chunk
    for b in range(B):
        for r in range(0, tH, rows):
            n = min(rows, tH - r)
            top = 4 * r - 1  # tile rows r .. r+n-1 read image rows top .. top + 4n + 1 (outside: zeros)
            slab = x.new_zeros(4 * n + 2, 4 * tW + 2, C)
            lo, hi = max(top, 0), min(top + 4 * n + 2, H)
            slab[lo - top:hi - top, 1:W + 1] = x[b, :, lo:hi].permute(1, 2, 0)
            sH, sW, _ = slab.stride()
            d = slab.as_strided((6, 6, n, tW, C), (sH, sW, 4 * sH, 4 * sW, 1)).reshape(36, -1)  # a copy
            V = (_KRON_B @ d).view(36, -1, C)  # (36, n*tW, C)
            del slab, d
            M = torch.stack([linear(V[k], U[k]) for k in range(36)])  # (36, n*tW, O)
            del V
            Y = (_KRON_A @ M.view(36, -1)).view(4, 4, n, tW, O).permute(2, 0, 3, 1, 4)  # (n, 4, tW, 4, O)
            del M
            block = out[b, r:r + n]
            block.copy_(Y) if bias is None else torch.add(Y, bias, out=block)
    return out.view(B, 4 * tH, 4 * tW, O)[:, :H, :W].permute(0, 3, 1, 2)


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """F.conv2d: as a matrix product at the lowest resolutions, Winograd for many channels at middle ones,
    channels-last at the highest, else unchanged.

    Elsewhere in between (the UNet's 16x16 latents, 1280-2560 channels) the weights are larger than the activations
    and channels-last would copy the NCHW weight into NHWC on every call: measured slower there, so it is not used."""
    as_pair = torch.nn.modules.utils._pair
    stride, dilation = as_pair(stride), as_pair(dilation)
    H, W = x.shape[-2:]
    if (x.dim() == 4 and groups == 1 and stride == (1, 1) and dilation == (1, 1) and not isinstance(padding, str)
            and tuple(as_pair(padding)) == tuple(k // 2 for k in weight.shape[-2:])):
        if H * W <= LOW_RES_POSITIONS:
            return conv2d_as_matmul(x, weight, bias, as_pair(padding))
        if (weight.shape[-2:] == (3, 3) and min(weight.shape[:2]) >= WINOGRAD_MIN_CHANNELS
                and WINOGRAD_POSITIONS[0] <= H * W <= WINOGRAD_POSITIONS[1]):
            return conv3x3_winograd(x, weight, bias)
    if H * W >= HIGH_RES_POSITIONS:
        x = x.contiguous(memory_format=torch.channels_last)  # no copy when it already is (our conv outputs are)
    else:  # NCHW, as the Winograd outputs (channels-last) would make oneDNN copy the weight into NHWC on every call
        x = x.contiguous()
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


# Which input rows feed each output row of "nearest 2x upsample, then 3x3 convolution (padding 1)". Output row 2i
# (phase 0) reads upsampled rows 2i-1, 2i, 2i+1 = input rows i-1, i, i: kernel rows (w0, w1 + w2) on input rows
# (i-1, i). Output row 2i+1 (phase 1) reads input rows i, i, i+1: (w0 + w1, w2) on rows (i, i+1). Same for columns.
_FOLD = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],    # phase 0: 2 taps from 3 kernel rows
                      [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])   # phase 1
_FOLD_2D = torch.einsum("pay,qbx->pqabyx", _FOLD, _FOLD).reshape(16, 9)  # (row phase, col phase, 2x2 tap) <- 3x3 tap


def can_fold_upsample(x: torch.Tensor, conv: torch.nn.Conv2d, size) -> bool:
    """Upsample(x) may use `upsample2x_conv3x3`: fast kernels on, a plain 3x3 padding-1 convolution without hooks
    (a LoRA adds its update through a forward hook), an exact doubling, CPU fp32 inference, at least 16x16 input."""
    H, W = x.shape[-2:]
    return (active() and H * W >= 16 * 16 and (size is None or tuple(size) == (2 * H, 2 * W))
            and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and not conv._forward_hooks
            and not conv._forward_pre_hooks and _cpu_inference(x, conv.weight, conv.bias))


def _folded_kernels(weight: torch.Tensor) -> torch.Tensor:
    """(O, C, 3, 3) -> (4*O, C, 2, 2): one 2x2 kernel per output phase (p, q), phase-major."""
    O, C = weight.shape[:2]
    kernels = weight.reshape(O * C, 9) @ _FOLD_2D.T.to(weight)  # (O*C, 16): (O, C, p, q, a, b)
    return kernels.view(O, C, 2, 2, 2, 2).permute(2, 3, 0, 1, 4, 5).reshape(4 * O, C, 2, 2)


def upsample2x_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1) without the upsampling.

    x (B, C, H, W); weight (O, C, 3, 3) -> four 2x2 kernels (4*O, C, 2, 2), one per output phase (row p, column q);
    one convolution of x padded by 1 gives (B, 4*O, H+1, W+1); phase (p, q) is its window starting at (p, q), and
    its values go to output rows 2i+p, columns 2j+q: (B, O, 2H, 2W).
    """
    B, _, H, W = x.shape
    O = weight.shape[0]
    kernels = _transformed("upsample2x", weight, _folded_kernels)
    channels_last = 4 * H * W >= HIGH_RES_POSITIONS  # then the output is channels-last, like conv2d's at that size
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    phases = F.conv2d(x, kernels, None if bias is None else bias.repeat(4), padding=1)  # (B, 4*O, H+1, W+1)
    if channels_last:  # interleave with the channels innermost, as they lie in memory
        phases = phases.permute(0, 2, 3, 1).unflatten(3, (2, 2, O))  # (B, H+1, W+1, 2, 2, O), a view
        out = x.new_empty(B, H, 2, W, 2, O)
        for p in range(2):
            for q in range(2):
                out[:, :, p, :, q] = phases[:, p:p + H, q:q + W, p, q]
        return out.view(B, 2 * H, 2 * W, O).permute(0, 3, 1, 2)
    phases = phases.unflatten(1, (2, 2, O))  # (B, 2, 2, O, H+1, W+1)
    out = x.new_empty(B, O, H, 2, W, 2)
    for p in range(2):
        for q in range(2):
            out[:, :, :, p, :, q] = phases[:, p, q, :, p:p + H, q:q + W]
    return out.view(B, O, 2 * H, 2 * W)


class _FastKernels(TorchFunctionMode):
    """Routes F.linear / F.conv2d calls made while it is active to the kernels above (CPU fp32 inference only)."""

    def __init__(self, keep_transforms: bool = False):
        super().__init__()
        self.keep_transforms = keep_transforms

    def __enter__(self):
        if self.keep_transforms:
            _blocks.kept = [*getattr(_blocks, "kept", []), {}]
        return super().__enter__()

    def __exit__(self, *exc):
        if self.keep_transforms:
            _blocks.kept = _blocks.kept[:-1]  # the transforms are freed here ...
            _give_back_free_memory()  # ... and their memory returned to the system, for the VAE decoder after
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or func is F.conv2d:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            if _cpu_inference(*tensors):  # (the mode is switched off while this handler runs: no recursion)
                return (linear if func is F.linear else conv2d)(*args, **kwargs)
        return func(*args, **kwargs)


def fast_kernels(enabled: bool = True, keep_transforms: bool = False):
    """`with fast_kernels(): model(x)`. `enabled=False` (or no oneDNN in this torch) gives a context that does nothing.

    `keep_transforms=True`: the weight transforms (Winograd's U, 4x the size of a 3x3 kernel; the folded upsampling
    kernels) are made once per weight and kept until the block ends, for blocks that call a model many times with
    the same weights: the denoising loop. Their memory (0.35 GB for the UNet at 64x64 latents, 26 MB at 32x32) is
    held meanwhile; a weight changed in place (a fused LoRA) gets new transforms."""
    return _FastKernels(keep_transforms) if enabled and available() else contextlib.nullcontext()
