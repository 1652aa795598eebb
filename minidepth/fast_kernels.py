"""Faster CPU kernels for inference: the same maths as the models' plain PyTorch layers, rounded differently.

The models in `minidepth/models/` are written with plain `nn.Linear` / `nn.Conv2d` layers and run PyTorch's default
kernels, which are the ones diffusers runs, so the parity suite can compare them bit for bit. On the CPU four things
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

`fast_kernels()` is a context manager that routes `F.linear` and `F.conv2d` calls made inside it (by any module) to
those kernels, when they are CPU float32 inference calls (no autograd graph being recorded); every other call, and
every call on other devices, dtypes, or with autograd, runs unchanged. The pipeline wraps its model calls in it
unless `pipe.set_exact(True)`: then everything is bit-identical to diffusers again. The difference between the two
modes is float rounding only (summation order); the test suite checks it stays below 1e-3 on the output image.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

LOW_RES_POSITIONS = 8 * 8  # up to this many positions per image: convolution as one matrix product (point 2)
HIGH_RES_POSITIONS = 128 * 128  # from this many positions on: channels-last convolution (point 1)


def active() -> bool:
    """A `fast_kernels()` block is running (the Upsample modules ask)."""
    return any(isinstance(mode, _FastKernels) for mode in torch.overrides._get_current_function_mode_stack())


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


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """F.conv2d: as a matrix product at the lowest resolutions, channels-last at the highest, else unchanged.

    In between (the UNet's 16x16 to 64x64 latents, 320-2560 channels) the weights are as large as the activations and
    channels-last would copy the NCHW weight into NHWC on every call: measured slower there, so it is not used."""
    as_pair = torch.nn.modules.utils._pair
    stride, dilation = as_pair(stride), as_pair(dilation)
    H, W = x.shape[-2:]
    if (x.dim() == 4 and groups == 1 and stride == (1, 1) and dilation == (1, 1) and not isinstance(padding, str)
            and H * W <= LOW_RES_POSITIONS and tuple(as_pair(padding)) == tuple(k // 2 for k in weight.shape[-2:])):
        return conv2d_as_matmul(x, weight, bias, as_pair(padding))
    if H * W >= HIGH_RES_POSITIONS:
        x = x.contiguous(memory_format=torch.channels_last)  # no copy when it already is (our conv outputs are)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


# Which input rows feed each output row of "nearest 2x upsample, then 3x3 convolution (padding 1)". Output row 2i
# (phase 0) reads upsampled rows 2i-1, 2i, 2i+1 = input rows i-1, i, i: kernel rows (w0, w1 + w2) on input rows
# (i-1, i). Output row 2i+1 (phase 1) reads input rows i, i, i+1: (w0 + w1, w2) on rows (i, i+1). Same for columns.
_FOLD = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],    # phase 0: 2 taps from 3 kernel rows
                      [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])   # phase 1


def can_fold_upsample(x: torch.Tensor, conv: torch.nn.Conv2d, size) -> bool:
    """Upsample(x) may use `upsample2x_conv3x3`: fast kernels on, a plain 3x3 padding-1 convolution without hooks
    (a LoRA adds its update through a forward hook), an exact doubling, CPU fp32 inference, at least 16x16 input."""
    H, W = x.shape[-2:]
    return (active() and H * W >= 16 * 16 and (size is None or tuple(size) == (2 * H, 2 * W))
            and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and not conv._forward_hooks
            and not conv._forward_pre_hooks and _cpu_inference(x, conv.weight, conv.bias))


def upsample2x_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1) without the upsampling.

    x (B, C, H, W); weight (O, C, 3, 3) -> four 2x2 kernels (4*O, C, 2, 2), one per output phase (row p, column q);
    one convolution of x padded by 1 gives (B, 4*O, H+1, W+1); phase (p, q) is its window starting at (p, q), and
    its values go to output rows 2i+p, columns 2j+q: (B, O, 2H, 2W).
    """
    B, _, H, W = x.shape
    O = weight.shape[0]
    fold = _FOLD.to(weight)
    kernels = torch.einsum("pay,ocyx,qbx->pqocab", fold, weight, fold).reshape(4 * O, -1, 2, 2)
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

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or func is F.conv2d:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            if _cpu_inference(*tensors):  # (the mode is switched off while this handler runs: no recursion)
                return (linear if func is F.linear else conv2d)(*args, **kwargs)
        return func(*args, **kwargs)


def fast_kernels(enabled: bool = True):
    """`with fast_kernels(): model(x)`. `enabled=False` (or no oneDNN in this torch) gives a context that does nothing."""
    return _FastKernels() if enabled and available() else contextlib.nullcontext()
