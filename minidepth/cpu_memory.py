"""How the C allocator (glibc's malloc, under PyTorch's CPU tensors) hands memory to the fast kernels' blocks.

glibc maps every block of 32 MB or more afresh and unmaps it when it is freed; the kernel then faults the next one in
and zeroes it page by page (4 KB at a time). A UNet call at 512x512 allocates ~1.5 GB that way (390,000 page faults,
~0.4 s of its 7.7 s on 2 cores), although the same sizes come back call after call. Two settings change that:

- `reusing_freed_memory()`, a block in which freed memory stays in the process and serves the next allocation (no
  fresh mapping, no trimming). The denoising loop runs in one (`fast_kernels.py` point 8): its allocations repeat
  every step, so after a few steps its footprint stays put: at 512x512 the loop's peak rises by ~150-200 MB (glibc's
  aligned allocations leave some freed blocks just too small for the next request of the same size), still below
  the VAE decoder's, which sets the pipeline's peak. The VAE keeps the usual settings: there freed memory would
  stay in the process between tensors of different sizes and raise the peak (by ~600 MB at 512x512).
- `give_back_free_memory()`: `malloc_trim`, freed memory back to the system (at the end of a model's block).

Both do nothing where the C library is not glibc (macOS, Windows, musl). mallopt settings are process-wide: they are
set at the first open block and set back at the last one's end (to the values glibc's own rule settles on once 32 MB
blocks have been freed, since mallopt switches that rule off); a process with its own MALLOC_* settings loses them.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading

# glibc's mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
REUSING = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}  # no fresh mappings, no trimming
USUAL = {M_MMAP_MAX: 65536, M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20}

_open_blocks = [0]
_lock = threading.Lock()


def _glibc(function: str, *args: int) -> bool:
    """Call glibc's `malloc_trim` or `mallopt`; False where there is no such function."""
    try:
        getattr(ctypes.CDLL(None), function)(*args)
        return True
    except (OSError, AttributeError):
        return False


def give_back_free_memory() -> None:
    """glibc keeps freed blocks under 32 MB in the process for reuse, counted in its resident memory; `malloc_trim`
    returns them to the system."""
    _glibc("malloc_trim", 0)


def reusing() -> bool:
    """A `reusing_freed_memory()` block is open (in any thread)."""
    return _open_blocks[0] > 0


@contextlib.contextmanager
def reusing_freed_memory():
    """For the block, freed memory serves the next allocation instead of going back to the system (see above);
    blocks may nest and overlap across threads. At the end of the last one the usual settings return and the freed
    memory is given back."""
    with _lock:
        _open_blocks[0] += 1
        if _open_blocks[0] == 1:
            for parameter, value in REUSING.items():
                _glibc("mallopt", parameter, value)
    try:
        yield
    finally:
        with _lock:
            _open_blocks[0] -= 1
            if _open_blocks[0] == 0:
                for parameter, value in USUAL.items():
                    _glibc("mallopt", parameter, value)
                give_back_free_memory()
