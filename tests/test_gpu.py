"""The GPU tier: the same parity checks on CUDA (skipped without a CUDA device, see conftest.py).

On a GPU, kernels differ between libraries far less predictably than on the CPU, so the tolerances here are the
issue's (1e-5 relative for models, 1e-4 absolute for images) with TF32 turned off; fp16 runs are checked loosely.
"""

import numpy as np
import pytest
import torch

import factory
from minidepth import DDIMScheduler, StableDiffusionDepth2ImgPipeline
from test_pipeline import BASE, assert_close, photo

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def cuda_pipes(tiny_checkpoint):
    from diffusers import StableDiffusionDepth2ImgPipeline as Reference
    ours = StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_checkpoint).to("cuda")
    ref = Reference.from_pretrained(tiny_checkpoint).to("cuda")
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    return ours, ref


def test_unet_parity_on_cuda():
    from diffusers import UNet2DConditionModel

    from minidepth.models.unet import UNet
    folder = factory.component_folder("tiny", "unet")
    ours, ref = UNet.from_pretrained(folder, device="cuda"), UNet2DConditionModel.from_pretrained(folder).to("cuda")
    x = torch.randn(2, 5, 16, 24, device="cuda")
    c = torch.randn(2, 77, ours.config.cross_attention_dim, device="cuda")
    with torch.no_grad():
        a, b = ours(x, 500, c), ref(x, 500, c).sample
    rel = ((a - b).abs().max() / b.abs().max()).item()
    assert rel <= 1e-5, f"relative max error {rel:.3g} (mean abs {(a - b).abs().mean().item():.3g})"


@pytest.mark.parametrize("scheduler", [None, "DDIMScheduler"])
def test_pipeline_parity_on_cuda(cuda_pipes, scheduler):
    import diffusers
    ours, ref = cuda_pipes
    saved = ours.scheduler, ref.scheduler
    if scheduler:
        ours.scheduler = DDIMScheduler.from_config(ours.scheduler.config)
        ref.scheduler = getattr(diffusers, scheduler).from_config(ref.scheduler.config)
    try:
        outs = [p(image=photo(64, 64, 30), generator=torch.Generator("cuda").manual_seed(0), **BASE).images
                for p in (ours, ref)]
    finally:
        ours.scheduler, ref.scheduler = saved
    assert_close(*outs, tol=1e-4, what="cuda images")  # the bound for images (module docstring)


def test_cpu_generator_with_cuda_pipeline_matches_cpu_run(cuda_pipes, tiny_checkpoint):
    """A CPU generator draws on the CPU: the CUDA run starts from the same noise as a CPU run."""
    ours, _ = cuda_pipes
    cpu = StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_checkpoint)
    cpu.set_progress_bar_config(disable=True)
    outs = [p(image=photo(64, 64, 31), generator=torch.Generator().manual_seed(0), **BASE).images
            for p in (ours, cpu)]
    assert_close(*outs, tol=1e-3, what="cuda vs cpu")


def test_fp16_on_cuda_runs_without_nan(tiny_checkpoint):
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_checkpoint, torch_dtype=torch.float16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    out = pipe(image=photo(64, 64, 32), generator=torch.Generator("cuda").manual_seed(0), **BASE).images
    assert np.isfinite(out).all()


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_parity_report_on_cuda(tiny_checkpoint, dtype):
    """`minidepth parity --device cuda`: every stage (tokens ... each UNet step ... image) within the default GPU
    tolerances (max relative difference 1e-4 in fp32, 1e-2 in fp16; see minidepth.parity.default_tolerance)."""
    from minidepth.parity import compare
    report = compare(tiny_checkpoint, image=photo(64, 64, 33), prompt="a red house by the sea", steps=3,
                     device="cuda", dtype=dtype)
    assert report.ok, report.table() + "\n" + report.summary()
    assert report.stages[0].max_abs_diff == 0  # token ids are exact on any device
