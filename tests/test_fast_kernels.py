"""The fast CPU kernels (minidepth/fast_kernels.py, the pipeline's default) against the exact ones (diffusers' kernels):
kernel by kernel, model by model, and whole images for every scheduler. The bound for images is the issue's 1e-3.

The bounds come from what the fast kernels change: the summation order of each output's K products (other blocking,
im2col, folded upsampling, channels-last), which moves an fp32 result by ~sqrt(K) eps of its terms (eps 1.2e-7; K up
to 9 * 40 here: < 3e-6 of max|output|); NNPACK's Winograd transforms add their own rounding (~1e-5). Relative bounds:
one kernel 1e-5 (NNPACK 1e-4), a whole model 1e-4 (the differences compound over its layers), images 1e-3 (and over
the denoising steps). Measured with torch's AVX-512 and AVX2 kernels: kernels <= 4.4e-7 (NNPACK 1.2e-5), models
<= 1.1e-5, images <= 3.4e-5 (tiny model, 128x128) and 9.8e-5 (official size, 256x256). A wrong index, padding or
phase gives differences of order 1e-1.
"""

import platform
import resource
import sys
import threading

import factory
import numpy as np
import parity
import pytest
import torch
import torch.nn.functional as F
from test_pipeline import SCHEDULERS, photo

from minidepth import StableDiffusionDepth2ImgPipeline, schedulers
from minidepth import cpu_memory
from minidepth import fast_kernels as fk
from minidepth import nnpack

pytestmark = pytest.mark.skipif(not fk.available(), reason="this torch has no oneDNN")


def assert_near(fast, exact, tol, what, relative=False):
    """max|fast - exact| <= tol (relative: tol * max|exact|, for kernels whose outputs are far from 1)."""
    fast, exact = (np.asarray(t.detach() if isinstance(t, torch.Tensor) else t, dtype=np.float64) for t in (fast, exact))
    assert fast.shape == exact.shape, f"{what}: shape {fast.shape} != {exact.shape}"
    tol = tol * np.abs(exact).max() if relative else tol
    diff = np.abs(fast - exact)
    parity.record(f"fast vs exact: {what}", float(diff.max()), float(diff.mean()))
    assert diff.max() <= tol, f"{what}: max abs diff {diff.max():.3g} (mean {diff.mean():.3g}) > {tol}"


# ------------------------------------------------------------------------------------------------ kernels
@pytest.mark.parametrize("shape", [(2, 7, 48), (33, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear(shape, bias):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*shape, generator=g), torch.randn(24, 48, generator=g)
    b = torch.randn(24, generator=g) if bias else None
    with torch.no_grad(), fk.fast_kernels():
        fast = F.linear(x, w, b)
    assert_near(fast, F.linear(x, w, b), 1e-5, f"linear {shape}", relative=True)


@pytest.mark.parametrize("shape,kernel,stride,padding", [
    ((2, 16, 4, 4), 3, 1, 1),      # lowest resolution: im2col + matrix product
    ((2, 16, 8, 7), 3, 1, 1),
    ((1, 8, 130, 129), 3, 1, 1),   # >= 128x128 positions: channels-last
    ((1, 8, 130, 129), 1, 1, 0),
    ((1, 8, 131, 129), 3, 2, 0),   # the VAE's stride-2 downsampling
    ((2, 16, 20, 20), 3, 1, 1),    # in between: unchanged
    ((2, 16, 4, 4), 2, 1, 1),      # an even kernel: padding k // 2 makes the output one larger
    ((2, 16, 16, 15), 3, 2, 1),    # stride 2 to 8x8 outputs: im2col + one matrix product
    ((1, 8, 130, 129), 2, 1, 1),
])
@pytest.mark.parametrize("weight_first", [True, False], ids=["avx512-layout", "avx2-layout"])
def test_conv2d(shape, kernel, stride, padding, weight_first, monkeypatch):
    """(weight_first: both ways conv2d_as_matmul multiplies, whichever CPU runs the test.)"""
    monkeypatch.setattr(fk, "_avx512", lambda: weight_first)
    g = torch.Generator().manual_seed(1)
    x, w, b = (torch.randn(*shape, generator=g), torch.randn(12, shape[1], kernel, kernel, generator=g),
               torch.randn(12, generator=g))
    with torch.no_grad(), fk.fast_kernels():
        fast = F.conv2d(x, w, b, stride, padding)
    assert_near(fast, F.conv2d(x, w, b, stride, padding), 1e-5, f"conv2d {shape} k{kernel} s{stride}", relative=True)


@pytest.mark.parametrize("shape,kernel,stride,padding", [
    ((2, 7, 8, 8), (3, 3), (1, 1), (1, 1)),      # the UNet's 8x8 convolutions: a strided view, copied
    ((2, 7, 16, 16), (3, 3), (2, 2), (1, 1)),    # its downsampling from 16x16 to 8x8
    ((1, 5, 9, 12), (2, 3), (1, 1), (0, 1)),     # uneven kernel and padding: 8x12 outputs
    ((2, 7, 4, 4), (3, 3), (1, 1), (1, 1)),      # below 8x8 outputs: F.unfold itself
])
def test_im2col_is_unfold(shape, kernel, stride, padding):
    """The same numbers as F.unfold (a copy: bit for bit), in the same order."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    expected = F.unfold(x, kernel, padding=padding, stride=stride)
    out_size = tuple((shape[2 + i] + 2 * padding[i] - kernel[i]) // stride[i] + 1 for i in range(2))
    got = fk.im2col(x, kernel, padding, stride, out_size)
    assert got.shape == expected.shape and torch.equal(got, expected), \
        f"im2col {shape} k{kernel}: max |diff| {(got - expected).abs().max().item():.3g}"


@pytest.mark.parametrize("shape", [(2, 6, 16, 16), (1, 5, 17, 23), (1, 4, 64, 70)])
@pytest.mark.parametrize("bias", [True, False])
def test_folded_upsampling(shape, bias):
    """nearest 2x + 3x3 conv == four 2x2 phase convolutions (NCHW below 128x128 output positions, NHWC above)."""
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(*shape, generator=g), torch.randn(7, shape[1], 3, 3, generator=g)
    b = torch.randn(7, generator=g) if bias else None
    exact = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)
    with torch.no_grad(), fk.fast_kernels():
        fast = fk.upsample2x_conv3x3(x, w, b)
    assert_near(fast, exact, 1e-5, f"folded upsampling {shape}", relative=True)


needs_nnpack = pytest.mark.skipif(not nnpack.nnpack_available(), reason="this torch has no NNPACK (or this CPU)")


@needs_nnpack
@pytest.mark.parametrize("shape,call_bytes", [
    ((1, 32, 37, 45), None),         # one image as it is
    ((2, 32, 33, 40), None),         # a batch as one tall image
    ((3, 32, 37, 45), 32 * 45 * 4 * 9),  # bands of 7 rows (+ 2), the last one shorter
    ((1, 40, 34, 34), 40 * 34 * 4 * 3),  # bands of one row
])
@pytest.mark.parametrize("bias", [True, False])
def test_nnpack(shape, call_bytes, bias, monkeypatch):
    """NNPACK's Winograd F(6x6, 3x3) == 3x3 convolution with padding 1: whole images, batches stacked, bands."""
    if call_bytes:
        monkeypatch.setattr(nnpack, "NNPACK_CALL_BYTES", call_bytes)
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(*shape, generator=g), torch.randn(11, shape[1], 3, 3, generator=g)
    b = torch.randn(11, generator=g) if bias else None
    with torch.no_grad(), fk.fast_kernels():
        fast = nnpack.conv3x3_nnpack(x, w, b)
    assert fast.is_contiguous()
    assert_near(fast, F.conv2d(x, w, b, padding=1), 1e-4, f"NNPACK {shape}, {call_bytes} B per call", relative=True)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("batch", [1, 2])
def test_conv1x1(memory_format, batch):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(batch, 16, 130, 129, generator=g).contiguous(memory_format=memory_format)
    w, b = torch.randn(12, 16, 1, 1, generator=g), torch.randn(12, generator=g)
    with torch.no_grad(), fk.fast_kernels():
        fast = F.conv2d(x, w, b)
    assert_near(fast, F.conv2d(x, w, b), 1e-5, f"1x1 conv, batch {batch}, {memory_format}", relative=True)


@needs_nnpack
def test_nnpack_is_chosen_for_3x3_from_32x32_positions_and_32_input_channels(monkeypatch):
    calls = []
    monkeypatch.setattr(fk, "conv3x3_nnpack", lambda *a: calls.append(a[0].shape) or F.conv2d(*a, padding=1))
    g = torch.Generator().manual_seed(6)
    with torch.no_grad(), fk.fast_kernels():
        for shape, out_ch in [((2, 32, 32, 32), 4), ((1, 16, 64, 64), 32), ((1, 64, 31, 32), 64),
                              ((1, 64, 260, 256), 3)]:
            F.conv2d(torch.randn(*shape, generator=g), torch.randn(out_ch, shape[1], 3, 3, generator=g), padding=1)
    assert calls == [(2, 32, 32, 32), (1, 64, 260, 256)]


@needs_nnpack
def test_nnpack_runs_on_the_blocks_thread_which_ends_with_it(monkeypatch):
    """torch keeps NNPACK's workspace per thread for the thread's life: the calls run on a thread of the block."""
    threads = []
    real = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution",
                        lambda *a: threads.append(threading.current_thread()) or real(*a))
    x, w = torch.randn(1, 32, 32, 32), torch.randn(8, 32, 3, 3)
    with torch.no_grad(), fk.fast_kernels():
        F.conv2d(x, w, padding=1)
        F.conv2d(x, w, padding=1)
    assert len(threads) == 2 and threads[0] is threads[1] and threads[0] is not threading.current_thread()
    assert not threads[0].is_alive()


def test_the_loops_block_keeps_freed_memory_and_sets_the_allocator_back(monkeypatch):
    """Point 8: a keep_transforms block (the denoising loop) switches glibc to reusing freed memory at the first open
    block, back at the last one's end (nested, and after an error too); other blocks leave the allocator alone, and
    give back the bands' buffers of a large NNPACK convolution, which a keep_transforms block keeps."""
    calls = []
    monkeypatch.setattr(cpu_memory, "_glibc", lambda *a: calls.append(a) or True)
    trims = lambda: sum(c == ("malloc_trim", 0) for c in calls)  # noqa: E731
    settings = lambda values: [("mallopt", *kv) for kv in values.items()]  # noqa: E731
    monkeypatch.setattr(nnpack, "NNPACK_CALL_BYTES", 32 * 34 * 4 * 8)  # bands of 6 rows
    x, w, b = torch.randn(1, 32, 34, 34), torch.randn(8, 32, 3, 3), torch.randn(8)
    with torch.no_grad(), fk.fast_kernels():
        assert not cpu_memory.reusing()
        nnpack.conv3x3_nnpack(x, w, b)
        assert calls == [("malloc_trim", 0)]  # after the bands
    calls.clear()
    with pytest.raises(ZeroDivisionError), torch.no_grad(), fk.fast_kernels(keep_transforms=True):
        assert cpu_memory.reusing() and calls == settings(cpu_memory.REUSING)
        with fk.fast_kernels(keep_transforms=True):
            nnpack.conv3x3_nnpack(x, w, b)
        assert cpu_memory.reusing() and trims() == 1  # the inner block's end: no bands' trim, settings unchanged
        assert [c for c in calls if c[0] == "mallopt"] == settings(cpu_memory.REUSING)
        1 / 0
    assert not cpu_memory.reusing()
    assert [c for c in calls if c[0] == "mallopt"] == settings(cpu_memory.REUSING) + settings(cpu_memory.USUAL)


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's allocator")
def test_reused_memory_is_not_faulted_in_again():
    """The mechanism itself, counted: a 64 MB tensor made, filled and freed again and again faults in fresh pages
    every time (glibc maps blocks over 32 MB afresh: 16,384 faults of 4 KB pages, fewer with transparent huge
    pages), but not inside a reusing_freed_memory block once its heap holds the freed blocks (glibc's aligned
    allocations leave a few freed blocks just too small at first: the first rounds grow it)."""
    def faults(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(rounds):
            torch.empty(16 << 20).fill_(1.0)  # made, touched and freed
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    outside = faults(4)
    with cpu_memory.reusing_freed_memory():
        faults(12)
        inside = faults(4)
    assert outside > 0 and inside <= outside / 8, f"page faults: {outside} outside the block, {inside} inside"


@pytest.mark.parametrize("inference_weights", [False, True])
def test_kept_transforms_are_reused_until_the_weight_changes(inference_weights):
    """keep_transforms=True (the denoising loop): one transform per weight, a new one after an in-place change,
    none kept after the block; the results equal those made without keeping. Weights made in inference mode (which
    have no version counter) too."""
    g = torch.Generator().manual_seed(7)
    with torch.inference_mode(inference_weights):
        x, w, b = (torch.randn(1, 8, 20, 20, generator=g), torch.randn(6, 8, 3, 3, generator=g),
                   torch.randn(6, generator=g))
    made = []

    def count(weight):
        made.append(1)
        return fk._folded_kernels(weight)

    with torch.inference_mode(), fk.fast_kernels(keep_transforms=True):
        first = [fk._transformed("upsample2x", w, count) for _ in range(3)]
        assert len(made) == 1 and all(t is first[0] for t in first)
        kept = fk.upsample2x_conv3x3(x, w, b)
        w2 = w * 2
        assert fk._transformed("upsample2x", w2, count) is not first[0] and len(made) == 2
        if not inference_weights:
            with torch.no_grad():
                w.mul_(2)  # in place: the same tensor, a new version
            assert fk._transformed("upsample2x", w, count) is not first[0] and len(made) == 3
    assert not fk._blocks.kept
    exact = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)
    assert_near(fk.upsample2x_conv3x3(x, w, b), exact, 1e-5, "folded kernels after a change", relative=True)
    assert_near(kept, F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w if inference_weights else w / 2,
                               b, padding=1), 1e-5, "kept transforms", relative=True)


@pytest.mark.parametrize("shape,stride,padding", [((2, 16, 18, 18), 1, 1), ((2, 16, 24, 23), 2, 1),
                                                  ((1, 16, 14, 14), 1, 0)])
def test_prepacked_convolutions_within_the_budget(shape, stride, padding, monkeypatch):
    """keep_transforms=True: weights of PREPACK_MIN_BYTES or more, convolved between the matrix-product and the NNPACK
    resolutions, are reordered once into oneDNN's layout while the block has kept less than PREPACK_BYTES; the rest
    run as before. Either way the result is F.conv2d's within rounding (the geometry arguments in the right order)."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(*shape, generator=g)
    weights = [torch.randn(12, shape[1], 3, 3, generator=g) for _ in range(3)]
    b = torch.randn(12, generator=g)
    monkeypatch.setattr(fk, "PREPACK_MIN_BYTES", weights[0].nbytes)
    monkeypatch.setattr(fk, "PREPACK_BYTES", 2 * weights[0].nbytes)  # room for two of the three
    with torch.no_grad(), fk.fast_kernels(keep_transforms=True):
        fast = [F.conv2d(x, w, b, stride, padding) for w in weights * 2]
        kept = [key for key in fk._blocks.kept[-1] if key[0][0] == "prepacked"]
        assert [k[1] for k in kept] == [id(w) for w in weights[:2]] and fk._blocks.kept[-1].budgeted == 2 * weights[0].nbytes
    for i, w in enumerate(weights * 2):
        assert_near(fast[i], F.conv2d(x, w, b, stride, padding), 1e-5, f"prepacked conv2d {shape} s{stride}",
                    relative=True)
    with torch.no_grad(), fk.fast_kernels():  # no block that keeps: nothing prepacked
        assert fk.conv2d_prepacked(x, weights[0], b, (1, 1), (1, 1), (1, 1), 1) is None


def test_products_of_constant_inputs_are_computed_once():
    """constant_inputs (the pipeline's text embeddings over the denoising loop): F.linear of them is computed once
    per weight and handed out again, bit-identical; again after an in-place change of the input, the weight or the
    kept result; other inputs, and blocks that keep nothing, are not kept."""
    g = torch.Generator().manual_seed(9)
    context, other = torch.randn(2, 7, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    w, b = torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    with torch.no_grad(), fk.fast_kernels(keep_transforms=True, constant_inputs=(context,)):
        first = F.linear(context, w, b)
        assert F.linear(context, w, b) is first and F.linear(other, w, b) is not F.linear(other, w, b)
        assert torch.equal(first, fk.linear(context, w, b))  # the same computation: 0 difference
        context.mul_(2)
        second = F.linear(context, w, b)
        assert second is not first and torch.equal(second, fk.linear(context, w, b))
        w.add_(1)
        third = F.linear(context, w, b)
        assert third is not second and torch.equal(third, fk.linear(context, w, b))
        third.zero_()  # a caller changed the result in place: a fresh one next time
        assert torch.equal(F.linear(context, w, b), fk.linear(context, w, b))
    with torch.no_grad(), fk.fast_kernels(constant_inputs=(context,)):  # no keep_transforms: nothing kept
        assert F.linear(context, w, b) is not F.linear(context, w, b)
    assert_near(F.linear(context, w, b), fk.linear(context, w, b), 1e-5, "constant product", relative=True)


def test_autograd_and_other_dtypes_run_the_exact_kernels():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(5, 8, generator=g), torch.randn(4, 8, generator=g, requires_grad=True)
    with fk.fast_kernels():
        assert torch.equal(F.linear(x, w), F.linear(x, w))  # recorded by autograd: the plain kernel
        assert F.linear(x.double(), w.detach().double()).dtype == torch.float64
        assert fk.active()
    assert not fk.active()


# ------------------------------------------------------------------------------------------------ models and images
@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fast_and_exact(pipe, call):
    """call() with the pipeline in its default mode (fast kernels), then with set_exact(True)."""
    out = {}
    for exact in (False, True):
        pipe.set_exact(exact)
        with torch.no_grad():
            out[exact] = call()
    pipe.set_exact(False)
    return out[False], out[True]


def test_models_fast_vs_exact(pipe):
    g = torch.Generator().manual_seed(4)
    latents, image = torch.randn(2, 5, 16, 16, generator=g), torch.randn(1, 3, 128, 128, generator=g)
    pixels = torch.randn(1, 3, 64, 64, generator=g)
    context = pipe.text_encoder(torch.randint(0, 99, (2, 77), generator=g)).last_hidden_state
    for what, call in [("UNet", lambda: pipe.unet(latents, 500, context)),
                       ("VAE encode", lambda: pipe.vae.encode(image).mean),
                       ("VAE decode", lambda: pipe.vae.decode(latents[:1, :4])),
                       ("text encoder", lambda: pipe.text_encoder(torch.arange(77)[None] % 99).last_hidden_state),
                       ("DPT", lambda: pipe.depth_estimator(pixels))]:
        with torch.no_grad():
            with fk.fast_kernels(keep_transforms=True):  # as the pipeline runs its models
                fast = call()
            exact = call()
        assert_near(fast, exact, 1e-4, what, relative=True)


def test_default_is_fast_and_the_environment_can_make_it_exact(tiny_checkpoint, monkeypatch):
    assert StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_checkpoint).exact is False
    monkeypatch.setenv("MINIDEPTH_EXACT", "1")
    assert StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_checkpoint).exact is True


@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=lambda s: s[0] + "".join(f"-{k}" for k in s[1]))
def test_every_scheduler_fast_vs_exact(pipe, scheduler, monkeypatch):
    """128x128 images, so that every fast path runs: im2col at the UNet's 4x4 level, folded upsampling in the UNet
    (its kernels kept over the steps) and the VAE, upsampling + NNPACK for the VAE's last upsampler, channels-last
    and 1x1 convolutions, NNPACK in the VAE (in bands: NNPACK_CALL_BYTES lowered to 256 kB) and, its threshold
    lowered, in the UNet's 16x16 level (the two guidance halves stacked), prepacked weights (the size threshold
    lowered), Winograd's F(2x2, 3x3) at its 8x8 level (the thresholds lowered) and the text embeddings' key and
    value products kept over the steps."""
    monkeypatch.setattr(fk, "NNPACK_POSITIONS", 16 * 16)
    monkeypatch.setattr(nnpack, "NNPACK_CALL_BYTES", 256 << 10)
    monkeypatch.setattr(fk, "PREPACK_MIN_BYTES", 0)  # every in-between convolution prepacked over the loop
    monkeypatch.setattr(fk, "LOW_RES_POSITIONS", 4 * 4)
    monkeypatch.setattr(fk, "WINOGRAD_POSITIONS", 8 * 8)
    monkeypatch.setattr(fk, "_avx512", lambda: True)  # Winograd's choice on any CPU (and im2col weight-first)
    used = {"prepacked": 0, "product": 0, "winograd": 0}
    for kernel, name in ((fk.conv2d_prepacked, "prepacked"), (fk.constant_product, "product"),
                         (fk.conv3x3_winograd, "winograd")):
        def counted(*args, _kernel=kernel, _name=name, **kwargs):
            out = _kernel(*args, **kwargs)
            used[_name] += out is not None
            return out
        monkeypatch.setattr(fk, kernel.__name__, counted)
    name, overrides = scheduler
    saved = pipe.scheduler
    pipe.scheduler = getattr(schedulers, name).from_config({**dict(saved.config), **overrides})
    try:
        fast, exact = fast_and_exact(pipe, lambda: pipe(
            prompt="a house", image=photo(128, 128, 5), num_inference_steps=4, strength=0.9, output_type="np",
            generator=torch.Generator().manual_seed(0)).images)
    finally:
        pipe.scheduler = saved
    assert all(count > 0 for count in used.values()), used
    assert_near(fast, exact, 1e-3, f"images, {name}{overrides or ''}")


@pytest.mark.official
def test_official_size_fast_vs_exact():
    """The real architecture at 256x256: every fast path at the sizes it was tuned for."""
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(factory.cached_checkpoint("official"))
    pipe.set_progress_bar_config(disable=True)
    fast, exact = fast_and_exact(pipe, lambda: pipe(
        prompt="a red house", image=photo(256, 256, 3), num_inference_steps=2, output_type="np",
        generator=torch.Generator().manual_seed(0)).images)
    assert_near(fast, exact, 1e-3, "images, official size 256x256")


def test_compile_matches_exact(tiny_checkpoint):
    """pipe.compile() (torch.compile of the UNet, inductor's C++ kernels; ~1-2 min to compile on 2 cores)."""
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    call = {"prompt": "a house", "image": photo(64, 64, 5), "num_inference_steps": 2, "output_type": "np"}
    pipe.set_exact(True)
    exact = pipe(generator=torch.Generator().manual_seed(0), **call).images
    pipe.compile()
    compiled = pipe(generator=torch.Generator().manual_seed(0), **call).images
    assert_near(compiled, exact, 1e-3, "images, pipe.compile()")
