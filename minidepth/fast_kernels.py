"""Faster CPU kernels for inference: the same maths as the models' plain PyTorch layers, rounded differently.

The models in `minidepth/models/` are written with plain `nn.Linear` / `nn.Conv2d` layers and run PyTorch's default
kernels, which are the ones diffusers runs, so the parity suite can compare them bit for bit. On the CPU these things
about those defaults cost time (measured on a 2-core AMD EPYC, fp32, official SD2-depth sizes; benchmarks/README.md):

1. A 3x3 convolution of an image of 32x32 positions or more (the VAE, the DPT's neck and head, the UNet's 32x32 and
   64x64 latents) runs PyTorch's direct algorithm: 9 multiply-adds per input channel and output value. Winograd's
   minimal filtering (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks", eq. 7-10) computes a
   block of outputs from a transformed input tile and a transformed kernel with far fewer multiplications; NNPACK,
   compiled into PyTorch, implements F(6x6, 3x3) (8x8 tiles: 64 instead of 324 multiplications per 6x6 block and
   channel pair) in hand-written AVX2 / NEON code, as `torch._nnpack_spatial_convolution`: 124 -> 49 ms for the VAE's
   128 channels at 256x256, 225 -> 113 ms for its 512 at 128x128 (`conv3x3_nnpack`). Its rounding error is ~1e-5
   of the output's scale instead of ~1e-6. F.conv2d picks NNPACK only for batches of 16 or more, and the
   `torch._nnpack_spatial_convolution` wrapper keeps its workspace (several times the input) for the life of the
   thread; both are handled in `nnpack.py`: a whole batch as one tall image, calls limited in size, and the calls
   made on the block's own thread, which ends with the block and frees the workspace.
2. At the UNet's lowest resolutions (4x4, 8x8 latents) a convolution does little arithmetic per weight, and oneDNN's
   weight reorder (59-118 MB for a 1280-channel 3x3 kernel, into freshly allocated memory) dominates: 23 ms for a
   2x1280x4x4 input, of which 9 ms is the actual product. Written as im2col + one matrix product per image, the
   weight is used where it lies: (C, H, W) -> unfold -> columns (C*9, Ho*Wo); weight (O, C*9) @ columns -> (O, Ho,
   Wo). The same for the stride-2 downsampling to 8x8 or less: 25 -> 8 ms for 1280 channels at 8x8 -> 4x4. (With
   the weight as the product's first operand the output is NCHW as it comes: 51.5 -> 42.5 ms for 2560 -> 1280
   channels at 8x8, against (B*Ho*Wo, C*9) @ weight^T, whose output is channels-last and input a transposed copy.)
3. Nearest 2x upsampling followed by a 3x3 convolution (every upsampler in the UNet and the VAE decoder) convolves an
   image in which each pixel appears four times. Each of the four output phases (even/odd row, even/odd column) is a
   2x2 convolution of the small image with summed weights, so the same result takes 4 instead of 9 multiply-adds
   per output value, and the 4x larger upsampled image is never built (`upsample2x_conv3x3`): for the UNet's
   1280 channels at 16x16 -> 32x32 (batch 2) 245 ms, or 170 ms with the folded kernels kept over the denoising loop,
   against 223 ms for upsampling + NNPACK. From 128x128 output positions on, upsampling + NNPACK is faster: 538
   against 823 ms for the VAE's 512 channels at 128x128 -> 256x256.
4. `torch.nn.functional.linear` runs MKL's SGEMM, which takes its AVX2 code path on AMD CPUs; oneDNN's matmul uses
   AVX-512 there: 125 -> 197 GFLOP/s for the UNet's (128 x 1280) @ (1280 x 10240) feed-forward product. A 1x1
   convolution is the same product, weight (O, C) @ image (C, H*W), per image: 261 -> 137 ms for the VAE's
   256 -> 128 channel shortcut at 512x512, whose NCHW input oneDNN's convolution would first reorder.
5. Where none of the above applies, a convolution of 128x128 positions or more runs in channels-last (NHWC) layout,
   which oneDNN reads and writes as it is (the VAE's 3-channel input: 99 -> 48 ms at 512x512).
6. In between (the UNet's 16x16 latents) oneDNN reorders the weight into its blocked layout on every call, into
   freshly allocated memory: for a 1280-channel 3x3 kernel (59 MB) that is 83 instead of 63 ms per call (2x1280x16x16).
   Inside a `keep_transforms` block (the denoising loop) the largest of these weights are reordered once and kept
   (`conv2d_prepacked`), up to PREPACK_BYTES per block: at 256x256 the four 16x16 convolutions with 960 or more input
   channels (154 MB, ~50 ms per UNet call). Keeping every convolution weight would cost 2.3 GB; the budget keeps the
   loop below the pipeline's peak memory, which the VAE decoder sets.
7. With classifier-free guidance every step multiplies the same text embeddings by each cross-attention's key and
   value weights. Tensors given as `constant_inputs` (the pipeline gives its prompt embeddings) have their products
   with a weight computed once per block and kept: the same computation, so the same bits (~40 ms per UNet call).
8. Not a kernel: memory. Each UNet call at 512x512 asked the system for ~1.5 GB of fresh pages, which the kernel
   faults in and zeroes (`cpu_memory.py`). A keep_transforms block keeps freed memory in the process for the next
   step's tensors of the same sizes: 7.7 -> 7.0 s per UNet call at 512x512 (at 256x256 they already fit glibc's
   reused blocks), with the loop's peak still below the VAE decoder's.
9. On AVX-512 CPUs, a 3x3 convolution of more than 8x8 and up to 16x16 positions in a keep_transforms block runs
   Winograd's F(2x2, 3x3) (`winograd.py`: 640 channels 17.3 -> 11.0 ms, batch 2) on transformed weights kept with
   their weights across blocks, up to WINOGRAD_BYTES; the kernels' own file pages are given back (425 MB kept for
   239 MB at 256x256, 1300 for 731 MB at 512x512). Not below (1.36 GB more for ~90 ms at 256x256), not from 32x32
   (NNPACK is as fast), not with AVX2 (oneDNN's own convolution is as fast there: 12.1 against 12.0 ms).

`fast_kernels()` is a context manager that routes `F.linear` and `F.conv2d` calls made inside it (by any module) to
those kernels (and notes which tensors are nearest 2x upsamplings, for point 3), when they are CPU float32 inference calls (no autograd graph being recorded); every other call, and
every call on other devices, dtypes, or with autograd, runs unchanged. The pipeline wraps its model calls in it
unless `pipe.set_exact(True)`: then everything is bit-identical to diffusers again. The difference between the two
modes is float rounding only (summation order); the test suite checks it stays below 1e-3 on the output image.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch
import torch.nn.functional as F
import torch.utils.weak
from torch.overrides import TorchFunctionMode

from .cpu_memory import give_back_free_memory, release_file_pages, reusing_freed_memory
from .nnpack import conv3x3_nnpack, nnpack_available, nnpack_thread
from .winograd import KeptWeights, conv3x3_winograd

LOW_RES_POSITIONS = 8 * 8  # up to this many output positions per image: convolution as one matrix product (point 2)
HIGH_RES_POSITIONS = 128 * 128  # from this many positions on: channels-last convolution (point 5)
NNPACK_POSITIONS = 32 * 32  # 3x3 convolutions from this many positions per image on ...
NNPACK_MIN_CHANNELS = 32  # ... with at least this many input channels: NNPACK's Winograd (point 1)
PREPACK_MIN_BYTES = 16 << 20  # a weight this large, convolved where none of the above applies, is prepacked ...
PREPACK_BYTES = 160 << 20  # ... while a keep_transforms block has kept less than this many bytes of them (point 6)
WINOGRAD_POSITIONS = 16 * 16  # 3x3 convolutions up to this many positions (above LOW_RES_POSITIONS): Winograd ...
WINOGRAD_BYTES = 1536 << 20  # ... in keep_transforms blocks, their transformed weights kept up to this many bytes (9)


_blocks = threading.local()  # per open fast_kernels block of this thread: .kept (transform stores)


def active() -> bool:
    """A `fast_kernels()` block is running."""
    return any(isinstance(mode, _FastKernels) for mode in torch.overrides._get_current_function_mode_stack())


class _Store(dict):
    """What one keep_transforms block keeps: (kind, id(weight)) -> (weight, its state, transform); `budgeted`: the
    bytes of the transforms counted against a budget (the prepacked weights); `lasting`: the weights whose Winograd
    transforms it made (their file pages are given back at the block's end)."""
    budgeted = 0

    def __init__(self):
        super().__init__()
        self.lasting = []


winograd_kept = KeptWeights()  # the Winograd transforms, across blocks (point 9)


def _state(t: torch.Tensor) -> tuple:
    """Changes when the tensor is changed in place (inference tensors have no version counter: their storage only)."""
    return (None if t.is_inference() else t._version, t.data_ptr())


def _transformed(kind, weight: torch.Tensor, make, budget: int | None = None):
    """make(weight), a transform of a weight for a fast kernel (the folded upsampling kernels, the prepacked weights,
    the products of constant inputs); inside a `fast_kernels(keep_transforms=True)` block made once per weight and
    kind and kept until the block ends. With a `budget` (bytes) a new transform is only made while the block's
    budgeted transforms take less: else None."""
    stores = getattr(_blocks, "kept", None)
    if not stores:
        return make(weight) if budget is None else None
    store, key = stores[-1], (kind, id(weight))
    entry = store.get(key)
    if entry is None or entry[0] is not weight or entry[1] != _state(weight):  # new or changed
        if budget is not None and entry is None:  # (a changed weight replaces its transform: same bytes)
            if store.budgeted + weight.nbytes > budget:
                return None
            store.budgeted += weight.nbytes
        entry = store[key] = (weight, _state(weight), make(weight))
    return entry[2]


def _kept_winograd_weights(weight: torch.Tensor) -> torch.Tensor | None:
    """winograd_weights(weight), kept with the weight while it lives (point 9, `winograd.KeptWeights`); None outside a
    keep_transforms block, or past WINOGRAD_BYTES. The block gives back the kernels' file pages of those it made."""
    stores = getattr(_blocks, "kept", None)
    if not stores:
        return None
    U, made = winograd_kept.get(weight, _state(weight), WINOGRAD_BYTES)
    if made:
        stores[-1].lasting.append(weight)
    return U


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


def conv2d_as_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
                     out_size: tuple[int, int]) -> torch.Tensor:
    """A convolution as im2col + matrix products (point 2 above): (B, C, H, W) -> (B, O, Ho, Wo).

    unfold: x -> columns (B, C*kh*kw, Ho*Wo); the weight (O, C, kh, kw) is viewed as (O, C*kh*kw). With oneDNN's
    AVX-512 kernels, per image weight @ columns -> (O, Ho*Wo), NCHW as it comes; with its AVX2 kernels one product
    (B*Ho*Wo, C*kh*kw) @ weight^T for the batch -> (B*Ho*Wo, O), returned channels-last (whichever was faster there:
    2560 -> 1280 channels at 8x8, 52.3 -> 42.6 ms with AVX-512, 57.0 -> 56.4 ms with AVX2, 640 channels at 16x16 to
    8x8: 8.3 -> 10.9 ms with AVX2).
    """
    B, O = x.shape[0], weight.shape[0]
    cols = im2col(x, weight.shape[-2:], padding, stride, out_size)  # (B, C*kh*kw, Ho*Wo)
    if _avx512():
        images = [linear(weight.reshape(O, -1), cols[b].T) for b in range(B)]  # (O, Ho*Wo) each
        out = (images[0][None] if B == 1 else torch.stack(images)).view(B, O, *out_size)
        return out if bias is None else out.add_(bias.view(O, 1, 1))
    out = linear(cols.transpose(1, 2).reshape(B * out_size[0] * out_size[1], -1), weight.reshape(O, -1), bias)
    return out.view(B, *out_size, O).permute(0, 3, 1, 2)


def im2col(x: torch.Tensor, kernel: tuple[int, int], padding, stride, out_size: tuple[int, int]) -> torch.Tensor:
    """F.unfold(x, kernel, padding=padding, stride=stride), the same values: (B, C, H, W) -> (B, C*kh*kw, Ho*Wo).

    Column (c, i, j) of output position (y, x) is the padded image at (c, y*stride + i, x*stride + j): a view of the
    padded image with strides, which PyTorch's copy kernel writes out in about half F.unfold's time from 8x8 output
    positions on (1.04 -> 0.48 ms for 2x1280 channels at 8x8, 0.59 -> 0.32 ms for 640 channels at 16x16 -> 8x8);
    below that the extra copy of the padding costs more than it saves (0.26 -> 0.33 ms at 4x4), so F.unfold does it.
    """
    if out_size[0] * out_size[1] < LOW_RES_POSITIONS:
        return F.unfold(x, kernel, padding=padding, stride=stride)
    B, C = x.shape[:2]
    padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))  # (B, C, H + 2 ph, W + 2 pw)
    sb, sc, sh, sw = padded.stride()
    windows = padded.as_strided((B, C, *kernel, *out_size), (sb, sc, sh, sw, sh * stride[0], sw * stride[1]))
    return windows.reshape(B, C * kernel[0] * kernel[1], out_size[0] * out_size[1])  # (one copy)


@functools.cache
def _avx512() -> bool:
    """The CPU runs PyTorch's and oneDNN's AVX-512 code (conv2d_as_matmul's choice; Winograd only there, point 9)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.conv2d(x, weight, bias) for a 1x1 kernel: per image weight (O, C) @ x (C, H*W) by oneDNN (point 4 above).
    (B, C, H, W) -> (B, O, H, W), NCHW."""
    B, C, H, W = x.shape
    O = weight.shape[0]
    images = [linear(weight.view(O, C), x[b].reshape(C, H * W).T) for b in range(B)]  # (O, H*W) each
    out = (images[0][None] if B == 1 else torch.stack(images)).view(B, O, H, W)
    return out if bias is None else out.add_(bias.view(O, 1, 1))


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """F.conv2d: as a matrix product when the output has at most 8x8 positions and for 1x1 kernels, NNPACK for
    3x3 kernels from 32x32 positions, channels-last for the rest from 128x128, else unchanged.

    Elsewhere in between (the UNet's 16x16 latents, 640-2560 channels) the weights are larger than the activations:
    NNPACK's weight transform and channels-last (which copies the NCHW weight into NHWC on every call) were both
    measured slower there, so neither is used."""
    as_pair = torch.nn.modules.utils._pair
    stride, dilation = as_pair(stride), as_pair(dilation)
    H, W = x.shape[-2:]
    if x.dim() == 4 and groups == 1 and dilation == (1, 1) and not isinstance(padding, str):
        padding = as_pair(padding)
        kh, kw = weight.shape[-2:]
        out_size = ((H + 2 * padding[0] - kh) // stride[0] + 1, (W + 2 * padding[1] - kw) // stride[1] + 1)
        if min(out_size) > 0 and out_size[0] * out_size[1] <= LOW_RES_POSITIONS:
            return conv2d_as_matmul(x, weight, bias, stride, padding, out_size)
        same_size = stride == (1, 1) and out_size == (H, W)  # an odd kernel, half its size as padding
        if same_size and (kh, kw) == (1, 1):
            return conv1x1(x, weight, bias)
        if (same_size and (kh, kw) == (3, 3) and H * W <= WINOGRAD_POSITIONS and H % 2 == 0 and W % 2 == 0
                and _avx512()):
            U = _kept_winograd_weights(weight)
            if U is not None:
                return conv3x3_winograd(x, U, bias, linear)
        if (same_size and (kh, kw) == (3, 3) and H * W >= NNPACK_POSITIONS
                and weight.shape[1] >= NNPACK_MIN_CHANNELS and nnpack_available()):
            return conv3x3_nnpack(x, weight, bias)
    if H * W >= HIGH_RES_POSITIONS:
        x = x.contiguous(memory_format=torch.channels_last)  # no copy when it already is (our conv outputs are)
    else:  # NCHW: a channels-last input would make oneDNN copy the weight into NHWC on every call
        x = x.contiguous()
        if weight.nbytes >= PREPACK_MIN_BYTES and x.dim() == 4 and not isinstance(padding, str):
            out = conv2d_prepacked(x, weight, bias, stride, padding, dilation, groups)
            if out is not None:
                return out
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def conv2d_prepacked(x, weight, bias, stride, padding, dilation, groups) -> torch.Tensor | None:
    """F.conv2d by oneDNN with the weight reordered into oneDNN's blocked layout (for this input shape) once per
    keep_transforms block (point 6); None outside such a block or when its PREPACK_BYTES are taken.
    x (B, C, H, W) NCHW -> (B, O, Ho, Wo)."""
    if not hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        return None
    geometry = [list(padding), list(stride), list(dilation), groups]

    def reorder(w):
        return torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), *geometry, list(x.shape))
    kind = ("prepacked", tuple(x.shape), *map(tuple, geometry[:3]), groups)
    packed = _transformed(kind, weight, reorder, budget=PREPACK_BYTES)
    if packed is None:
        return None
    return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, *geometry, "none", [], "")


# Which input rows feed each output row of "nearest 2x upsample, then 3x3 convolution (padding 1)". Output row 2i
# (phase 0) reads upsampled rows 2i-1, 2i, 2i+1 = input rows i-1, i, i: kernel rows (w0, w1 + w2) on input rows
# (i-1, i). Output row 2i+1 (phase 1) reads input rows i, i, i+1: (w0 + w1, w2) on rows (i, i+1). Same for columns.
_FOLD = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],    # phase 0: 2 taps from 3 kernel rows
                      [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])   # phase 1
_FOLD_2D = torch.einsum("pay,qbx->pqabyx", _FOLD, _FOLD).reshape(16, 9)  # (row phase, col phase, 2x2 tap) <- 3x3 tap


def _foldable_upsample(x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """`F.interpolate(x, ...)` is a nearest exact doubling that `upsample2x_conv3x3` can fold into the convolution
    after it: CPU fp32 inference, a 4-D input of at least 16x16 (from 128x128 output positions upsampling + NNPACK's
    Winograd is faster still)."""
    def arg(i, name, default=None):
        return args[i] if len(args) > i else kwargs.get(name, default)
    if x.dim() != 4 or arg(3, "mode", "nearest") != "nearest" or not _cpu_inference(x):
        return False
    H, W = x.shape[-2:]
    size, scale = arg(1, "size"), arg(2, "scale_factor")
    doubling = (tuple(size) == (2 * H, 2 * W)) if size is not None else scale in (2, 2.0, (2, 2), (2.0, 2.0))
    if not doubling or H * W < 16 * 16:
        return False
    return not (nnpack_available() and 4 * H * W >= HIGH_RES_POSITIONS)


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

    def __init__(self, keep_transforms: bool = False, constant_inputs: tuple = ()):
        super().__init__()
        self.keep_transforms = keep_transforms
        self.constants = constant_inputs if keep_transforms else ()  # (point 7)
        # upsampled image -> the image it was upsampled from, while the upsampled one lives (point 3)
        self.upsampled = torch.utils.weak.WeakIdKeyDictionary()

    def __enter__(self):
        # what the block holds, let go in reverse order at its end
        self.held = contextlib.ExitStack()
        self.held.callback(give_back_free_memory)  # last: the memory back to the system, for the next model
        if self.keep_transforms:
            self.held.enter_context(reusing_freed_memory())  # point 8
            _blocks.kept = [*getattr(_blocks, "kept", []), _Store()]
            self.held.callback(lambda: setattr(_blocks, "kept", _blocks.kept[:-1]))  # the transforms are freed
            self.held.callback(lambda: release_file_pages(_blocks.kept[-1].lasting))  # (point 9)
        # NNPACK's convolutions run on a thread of the block; its end (the first thing let go) frees their workspace
        self.held.enter_context(nnpack_thread())
        return super().__enter__()

    def __exit__(self, *exc):
        self.held.close()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or func is F.conv2d:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            if _cpu_inference(*tensors):  # (the mode is switched off while this handler runs: no recursion)
                if func is F.conv2d and args and args[0] in self.upsampled:  # point 3: upsample + conv, folded
                    folded = _folded_conv(self.upsampled[args[0]], *args[1:], **kwargs)
                    if folded is not None:
                        return folded
                if func is F.linear and any(args[0] is c for c in self.constants):
                    return constant_product(*args, **kwargs)
                return (linear if func is F.linear else conv2d)(*args, **kwargs)
        if func is F.interpolate and args and isinstance(args[0], torch.Tensor):
            out = func(*args, **kwargs)
            if _foldable_upsample(args[0], args, kwargs):
                self.upsampled[out] = args[0]  # the small image, for the convolution that reads `out` (if any)
            return out
        return func(*args, **kwargs)


def constant_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """linear(x, weight, bias) for an input that stays the same over the block (point 7): computed once per weight
    and kept; computed again when x, the weight or the bias changed in place, or the kept result was."""
    def product(w):
        y = linear(x, w, bias)
        return y, _state(y)
    kind = ("product", id(x), _state(x), None if bias is None else (id(bias), _state(bias)))
    y, state = _transformed(kind, weight, product)
    return y if _state(y) == state else linear(x, weight, bias)  # changed in place: not ours to hand out again


def _folded_conv(small: torch.Tensor, weight: torch.Tensor, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """conv2d(upsampled, weight, ...) computed from the image before its nearest 2x upsampling, for a plain 3x3
    convolution with padding 1 (every upsampler of the UNet and the VAE); None for any other convolution. A LoRA on
    that convolution still adds its update through its forward hook, from the upsampled image."""
    pair = torch.nn.modules.utils._pair
    if (weight.shape[-2:] == (3, 3) and pair(stride) == (1, 1) and pair(padding) == (1, 1)
            and pair(dilation) == (1, 1) and groups == 1):
        return upsample2x_conv3x3(small, weight, bias)
    return None


def fast_kernels(enabled: bool = True, keep_transforms: bool = False, constant_inputs: tuple = ()):
    """`with fast_kernels(): model(x)`. `enabled=False` (or no oneDNN in this torch) gives a context that does nothing.

    `keep_transforms=True`: the weight transforms (the folded upsampling kernels, 16/9 the size of the 3x3 kernel)
    are made once per weight and kept until the block ends, for blocks that call a model many times with the same
    weights: the denoising loop. Their memory (131 MB for the UNet at 64x64 latents, 26 MB at 32x32) is held
    meanwhile; a weight changed in place (a fused LoRA) gets new transforms. So do the largest convolution weights
    at the UNet's middle resolutions, prepacked up to PREPACK_BYTES (point 6).

    `constant_inputs` (with keep_transforms): tensors that stay the same over the block, such as the text embeddings
    of a denoising loop; their products with a weight (`F.linear`) are computed once and kept (point 7)."""
    if enabled and available():
        return _FastKernels(keep_transforms, tuple(constant_inputs))
    return contextlib.nullcontext()
