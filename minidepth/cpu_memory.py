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

And one for the weights: checkpoints are memory-mapped (safetensors, `torch.load(mmap=True)`), so a model's weights are
pages of the file in the system's page cache, counted in the process's resident memory once the model has run.
`release_file_pages(tensors)` drops those pages from the process (`madvise(MADV_DONTNEED)`); they stay in the page
cache (while the system does not need the memory) and come back on the next access. Only pages identical to the
file's are dropped: a mapping into which anything was written (a LoRA fused in place) is left alone. Two users:
- the pipeline, for the text encoder after the prompt stage: idle until the next call, it leaves the other stages'
  peaks (1.1 GB of its 1.3 GB are resident at the official size). The next call reads it back: 0.04-0.25 s on this
  machine, whose kernel also reclaims file pages no process has mapped for a few seconds. The DPT and the VAE keep
  theirs: with the text encoder's room the peak is the prompt stage's, where everything else is resident;
- the Winograd transforms of the denoising loop (`fast_kernels.py` point 9), which replace their kernels for good.

The allocator settings do nothing where the C library is not glibc (macOS, Windows, musl), nor does the release where
there is no /proc/self/smaps (not Linux). mallopt settings are process-wide: they are set at the first open block and
set back at the last one's end (to the values glibc's own rule settles on once 32 MB blocks have been freed, since
mallopt switches that rule off); a process with its own MALLOC_* settings loses them.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
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


def release_file_pages(tensors) -> int:
    """Drop from this process's resident memory the pages of memory-mapped checkpoint files that hold `tensors` (an
    iterable, e.g. `model.parameters()`; see above); returns the bytes released (0 where there is nothing to drop, or
    where this is not Linux). Only file mappings with no privately modified page (smaps "Anonymous: 0 kB") are
    touched, so the values read afterwards are the same bits."""
    spans = sorted({(s.data_ptr(), s.data_ptr() + s.nbytes()) for s in
                    (t.untyped_storage() for t in tensors if t.device.type == "cpu") if s.nbytes() > 0})
    if not spans:
        return 0
    clean = [m for m in _file_mappings() if m[2]]
    page, released = mmap.PAGESIZE, 0
    for lo, hi in spans:
        mapping = next((m for m in clean if m[0] <= lo and hi <= m[1]), None)
        if mapping is None:  # not memory-mapped from a file, or written to
            continue
        lo, hi = lo - lo % page, min(mapping[1], hi + (-hi) % page)  # whole pages, inside the mapping
        if _madvise_dontneed(lo, hi - lo):
            released += hi - lo
    return released


def _file_mappings() -> list[tuple[int, int, bool]]:
    """(start, end, clean) of this process's file-backed mappings, from /proc/self/smaps; clean: no page of it was
    written to (copy-on-write pages count as "Anonymous"). Empty where there is no /proc."""
    mappings = []
    try:
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                fields = line.split()
                if "-" in fields[0] and len(fields) >= 5:  # a mapping's header: start-end perms offset dev inode [path]
                    start, end = (int(a, 16) for a in fields[0].split("-"))
                    mappings.append([start, end, fields[4] != "0"])
                elif fields[0] == "Anonymous:" and mappings and fields[1] != "0":
                    mappings[-1][2] = False
    except OSError:
        return []
    return [tuple(m) for m in mappings]


def _madvise_dontneed(address: int, length: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return False
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise(address, length, mmap.MADV_DONTNEED) == 0
