"""NNPACK's Winograd convolution (fast_kernels.py point 1), fed as NNPACK wants it and run where its memory can go.

`conv3x3_nnpack` is a 3x3 convolution with padding 1 by `torch._nnpack_spatial_convolution`, NNPACK's F(6x6, 3x3)
compiled into PyTorch. Two things about that wrapper decide how it is called: its batch path is another, slower
algorithm, so a batch goes in as one tall image (images stacked between zero rows), and large images go in bands of
rows of at most NNPACK_CALL_BYTES; and it keeps NNPACK's workspace (~3.6 x its input) per thread for the life of the
thread, so the calls run on a thread of their own that `nnpack_thread()` starts for a block and ends with it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import threading

import torch

from .cpu_memory import give_back_free_memory, reusing

NNPACK_CALL_BYTES = 16 << 20  # input per NNPACK call, larger images go in bands of rows: its workspace is ~3.6x this

_threads = threading.local()  # .open: the NNPACK threads of this thread's open nnpack_thread() blocks, innermost last


@contextlib.contextmanager
def nnpack_thread():
    """For the block, NNPACK's convolutions run on a thread of their own, started at the first one; its end frees
    NNPACK's workspace, which torch keeps per thread (kept on the caller's thread it added 0.6 GB to the resident
    memory of a 512x512 run)."""
    thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="minidepth-nnpack")
    _threads.open = [*getattr(_threads, "open", []), thread]
    try:
        yield thread
    finally:
        _threads.open = _threads.open[:-1]
        thread.shutdown()


@functools.cache
def nnpack_available() -> bool:
    """torch was built with NNPACK and NNPACK initialised on this CPU (asking initialises it; x86-64 with AVX2 or
    ARM with NEON). NNPACK's thread pool takes torch's thread count at its first convolution."""
    return torch._nnpack_available()


def _nnpack(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: list[int]) -> torch.Tensor:
    """torch's NNPACK convolution of a (1, C, H, W) image, on the innermost `nnpack_thread()` block's thread (whose
    end frees NNPACK's workspace) or, outside one, on this one."""
    def call():
        with torch.no_grad():  # (as in the caller, which records no graph; a new thread starts with grad on)
            return torch._nnpack_spatial_convolution(x, weight, bias, padding, [1, 1])

    threads = getattr(_threads, "open", None)
    return threads[-1].submit(call).result() if threads else call()


def conv3x3_nnpack(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) for a 3x3 kernel by NNPACK's Winograd F(6x6, 3x3) (fast_kernels.py point 1).

    NNPACK's own batch path is another, slower algorithm (2x slower for the UNet's two guidance halves), and image by
    image it would transform the weight once per image. So the input goes to NNPACK as tall single images, each
    piece of an image between a zero row above and below it (its padding; image rows where the piece is a band of a
    larger image): the whole batch stacked in one call when it fits in NNPACK_CALL_BYTES, else one call per band of
    rows. NNPACK pads only left and right; the output rows of the zero rows are dropped.
    x (B, C, H, W) -> (B, O, H, W), NCHW.
    """
    B, C, H, W = x.shape
    row_bytes = C * W * x.element_size()
    if B == 1 and H * row_bytes <= NNPACK_CALL_BYTES:  # the image as it is, NNPACK pads it
        return _nnpack(x.contiguous(), weight, bias, [1, 1])
    if B * (H + 2) * row_bytes <= NNPACK_CALL_BYTES:
        calls = [[(b, 0, H) for b in range(B)]]  # (image, first row, rows) of each piece; all images in one call
    else:
        band = max(1, NNPACK_CALL_BYTES // row_bytes - 2)
        calls = [[(b, top, min(band, H - top))] for b in range(B) for top in range(0, H, band)]
    out = x.new_empty(B, weight.shape[0], H, W)
    tall_rows = [sum(n + 2 for _, _, n in pieces) for pieces in calls]
    buffer = x.new_empty(C * max(tall_rows) * W)  # one input buffer for all calls: fresh memory costs page faults
    for pieces, rows in zip(calls, tall_rows):
        tall = buffer[:C * rows * W].view(C, rows, W)
        at = 0  # the piece's first row in `tall`, its zero / halo row above it
        for b, top, n in pieces:
            lo, hi = max(top - 1, 0), min(top + n + 1, H)  # image rows it reads, one above and below if there
            tall[:, at + 1 + lo - top:at + 1 + hi - top] = x[b, :, lo:hi]
            if top == 0:
                tall[:, at] = 0  # above the image: padding
            if top + n == H:
                tall[:, at + n + 1] = 0  # below it
            at += n + 2
        y = _nnpack(tall[None], weight, bias, [0, 1])[0]  # (O, rows - 2, W): output row i is centred on tall row i+1
        at = 0
        for b, top, n in pieces:
            out[b, :, top:top + n] = y[:, at:at + n]
            at += n + 2
    if len(calls) > 1 and not reusing():  # bands of a large image: its buffers, freed, would stay in the process,
        give_back_free_memory()  # where the larger tensors that follow cannot reuse them (VAE decoder, 256x256: -140 MB)
    return out
