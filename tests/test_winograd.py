"""Winograd's F(2x2, 3x3) (minidepth/winograd.py, fast_kernels.py point 9) against F.conv2d, its transforms kept
across denoising loops, and the pages of memory-mapped weights given back (cpu_memory.release_file_pages).

The bound for the convolution: F(2x2, 3x3) sums 16 products per channel pair of transformed values instead of 9 of
the values themselves; the transforms add and subtract up to 4 tile values (B^T . B: |V| <= 4 max|d|), halve kernel
taps (G . G^T: |U| <= 2.25 max|g|) and add up to 9 products back (A^T . A), so the fp32 rounding of an output grows
by about that factor over the direct sum's ~sqrt(9 C) eps (eps 1.2e-7): ~1e-6 of max|output| for the channels here
(measured 1e-7-3e-7; the UNet's 640-2560 channels 7e-7-1.6e-6, official-size images in test_fast_kernels.py). The
tests allow 1e-5, as test_fast_kernels.py allows NNPACK's F(6x6, 3x3) 1e-4; a wrong tile, sign or index gives 1e-1.
"""

import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_fast_kernels import assert_near

from minidepth import cpu_memory, winograd
from minidepth import fast_kernels as fk
from minidepth.checkpoints.loader import TensorFile
from minidepth.winograd import conv3x3_winograd, winograd_weights

pytestmark = pytest.mark.skipif(not fk.available(), reason="this torch has no oneDNN")
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps and madvise")


@pytest.mark.parametrize("shape", [(2, 16, 16, 16), (1, 5, 6, 10), (2, 3, 2, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_winograd_is_conv2d(shape, bias):
    g = torch.Generator().manual_seed(11)
    x, w = torch.randn(*shape, generator=g), torch.randn(7, shape[1], 3, 3, generator=g)
    b = torch.randn(7, generator=g) if bias else None
    exact = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)
    with torch.no_grad():
        fast = conv3x3_winograd(x, winograd_weights(w), b, fk.linear)
    assert_near(fast, exact, 1e-5, f"Winograd F(2x2, 3x3) {shape}", relative=True)


def test_winograd_runs_in_the_loop_kept_across_loops_until_the_weight_changes(monkeypatch):
    """Inside a keep_transforms block a 3x3 convolution of 8x8 < positions <= 16x16 runs Winograd; its transformed
    weight is made once and kept across blocks, made again after an in-place change (also one made through `.data`,
    which the version counter misses), and not made outside a block,
    at other sizes, or past WINOGRAD_BYTES (the others run as before). Every result is F.conv2d's within rounding."""
    monkeypatch.setattr(fk, "_avx512", lambda: True)  # (chosen on AVX-512 CPUs only; the kernel runs on any)
    made, ran = [], []
    monkeypatch.setattr(winograd, "winograd_weights", lambda w: made.append(w) or winograd_weights(w))
    monkeypatch.setattr(fk, "conv3x3_winograd",
                        lambda x, *args: ran.append(tuple(x.shape[-2:])) or conv3x3_winograd(x, *args))
    g = torch.Generator().manual_seed(12)
    w, other, b = torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, 4, 3, 3, generator=g), torch.randn(6)
    monkeypatch.setattr(fk, "WINOGRAD_BYTES", w.nbytes * 16 // 9)  # room for one of the two
    images = {size: torch.randn(2, 4, *size, generator=g) for size in [(16, 16), (10, 12), (8, 8), (32, 32)]}

    results = []

    def check(x, weight, what):  # compared with F.conv2d outside the blocks, below
        results.append((F.conv2d(x, weight, b, padding=1), x, weight.clone(), what))

    with torch.no_grad():
        with fk.fast_kernels():  # no loop: nothing made
            check(images[16, 16], w, "outside a loop")
        assert made == [] and ran == []
        for _ in range(2):
            with fk.fast_kernels(keep_transforms=True):
                for x in images.values():
                    check(x, w, f"in a loop {tuple(x.shape)}")
                check(images[16, 16], other, "past the budget")
        assert [id(t) for t in made] == [id(w)]  # one transform, for both loops and both sizes that qualify
        assert ran == [(16, 16), (10, 12)] * 2
        w.mul_(2)  # in place: a new version of the same tensor
        with fk.fast_kernels(keep_transforms=True):
            check(images[10, 12], w, "after an in-place change")
        assert [id(t) for t in made] == [id(w), id(w)]
        w.data += 1  # through .data: the version counter does not see it, the kept sample of its values does
        with fk.fast_kernels(keep_transforms=True):
            check(images[16, 16], w, "after a change through .data")
        assert [id(t) for t in made] == [id(w)] * 3
        for fast, x, weight, what in results:
            assert_near(fast, F.conv2d(x, weight, b, padding=1), 1e-5, what, relative=True)
    made.clear()
    del w
    assert len(fk.winograd_kept) == 0  # kept with the weight, gone with it


def _resident(path) -> int:
    """Bytes of `path`'s mappings resident in this process (/proc/self/smaps "Rss")."""
    resident, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:
                inside = len(fields) >= 6 and fields[5] == str(path)
            elif inside and fields[0] == "Rss:":
                resident += int(fields[1]) * 1024
    return resident


@linux
def test_released_pages_come_back_with_the_same_values_and_written_ones_stay(tmp_path):
    """Memory-mapped weights (TensorFile, as the loaders read them) leave the process's resident memory and read the
    same bits afterwards; a file mapping with a page written to (a LoRA fused in place) and tensors in ordinary
    memory are left alone."""
    path = tmp_path / "weights.safetensors"
    g = torch.Generator().manual_seed(13)
    save_file({"a": torch.randn(1 << 20, generator=g), "b": torch.randn(1 << 20, generator=g)}, str(path))
    weights = TensorFile(path)
    a, b = weights["a"], weights["b"]
    copies = a.clone(), b.clone()
    assert _resident(path) >= 2 * a.nbytes * 0.9
    assert cpu_memory.release_file_pages([a, b]) >= 2 * a.nbytes
    assert _resident(path) < a.nbytes / 8
    assert torch.equal(a, copies[0]) and torch.equal(b, copies[1])  # read again from the file: the same values
    b[0] += 1  # written to: copy-on-write, the mapping now holds a page that is not the file's
    assert cpu_memory.release_file_pages([a, b]) == 0 and b[0] == copies[1][0] + 1
    assert cpu_memory.release_file_pages([torch.randn(1 << 20)]) == 0
    assert cpu_memory.release_file_pages([]) == 0


@linux
def test_the_text_encoder_gives_its_pages_back_after_the_prompt_and_the_next_image_is_the_same(tiny_checkpoint,
                                                                                               monkeypatch):
    """The pipeline releases the text encoder's pages at the end of its stage (it is idle until the next call); the
    next call reads them again: exact mode gives the same bits, and the fast mode too (its Winograd transforms,
    made by the first call, are reused by the second)."""
    from test_pipeline import photo

    from minidepth import StableDiffusionDepth2ImgPipeline
    monkeypatch.setattr(fk, "_avx512", lambda: True)  # Winograd on any CPU
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    weights = next((tiny_checkpoint / "text_encoder").glob("*.safetensors")).resolve()
    call = {"prompt": "a house", "image": photo(128, 128, 5), "num_inference_steps": 3, "output_type": "np"}
    for exact in (True, False):
        pipe.set_exact(exact)
        images = []
        for _ in range(2):
            images.append(pipe(generator=torch.Generator().manual_seed(0), **call).images)
            assert _resident(weights) < 64 << 10, f"{_resident(weights)} bytes of the text encoder still resident"
        assert_near(images[1], images[0], 0.0, f"a second image, exact={exact}")
    assert any(weight is pipe.unet.down_blocks[0].resnets[0].conv1.weight for weight in fk.winograd_kept)
