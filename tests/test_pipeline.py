"""End-to-end parity with diffusers' StableDiffusionDepth2ImgPipeline on identical checkpoints and generators.

minidepth runs in exact mode here (`set_exact(True)`: diffusers' kernels, called in diffusers' order on the same
shapes), so the images are bit-identical on any CPU -- measured 0 with torch's AVX-512 and AVX2 kernels -- and the
bound is 0. The default fast kernels have their own bounds in test_fast_kernels.py.
"""

import gc

import numpy as np
import PIL.Image
import pytest
import torch

import factory
import parity
from minidepth import StableDiffusionDepth2ImgPipeline
from minidepth import schedulers as ours_schedulers

TOL = 0  # exact mode: bit-identical (module docstring)


def photo(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    """A smooth synthetic 'photograph' (gradients + blobs + a little noise), so depth and latents are not trivial."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    r = 0.5 + 0.5 * np.sin(6 * x + 2 * y + seed)
    g = 0.5 + 0.5 * np.cos(4 * y - 3 * x)
    b = np.exp(-((x - 0.5) ** 2 + (y - 0.4) ** 2) * 8)
    img = np.stack([r, g, b], -1) + rng.normal(0, 0.03, (height, width, 3))
    return PIL.Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def assert_close(ours, ref, tol=TOL, what="images"):
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != reference {ref.shape}"
    assert np.isfinite(ours).all(), f"{what}: non-finite values"
    diff = np.abs(ours - ref)
    parity.record(what, float(diff.max()), float(diff.mean()))
    assert diff.max() <= tol, f"{what}: max abs diff {diff.max():.3g} (mean {diff.mean():.3g}) > {tol}"


@pytest.fixture(scope="module")
def pipes(tiny_checkpoint):
    return factory.pipeline_pair(tiny_checkpoint)


def run_both(pipes, scheduler=None, seeds=(0,), **kwargs):
    """Run both pipelines with fresh generators from the same seeds; return (ours, reference) outputs.
    `scheduler=(class name, config overrides)` swaps both pipelines' schedulers for this run."""
    import diffusers
    ours, ref = pipes
    saved = ours.scheduler, ref.scheduler
    if scheduler is not None:
        name, overrides = scheduler
        config = {**dict(ref.scheduler.config), **overrides}
        ref.scheduler = getattr(diffusers, name).from_config(config)
        ours.scheduler = getattr(ours_schedulers, name).from_config(config)
    try:
        outs = []
        for pipe in (ours, ref):
            gens = [torch.Generator().manual_seed(s) for s in seeds]
            outs.append(pipe(generator=gens if len(gens) > 1 else gens[0], **kwargs).images)
    finally:
        ours.scheduler, ref.scheduler = saved
    return outs


BASE = dict(prompt="a red house by the sea", num_inference_steps=3, output_type="np")


def test_non_square_pil_default_scheduler(pipes):
    ours, ref = run_both(pipes, image=photo(100, 68), **BASE)  # 100x68 -> floored to 96x64
    assert ours.shape == (1, 64, 96, 3)
    assert_close(ours, ref)


def test_numpy_and_tensor_inputs(pipes):
    """Batched NHWC numpy / NCHW tensor inputs match the reference. (It crashes on a single HWC array or CHW tensor,
    and swaps H and W of non-square numpy input; minidepth takes single images as a batch of one.)"""
    img = np.asarray(photo(64, 64, seed=1), dtype=np.float32)[None] / 255  # (1, H, W, 3), square
    ours, ref = run_both(pipes, image=img, **BASE)
    assert_close(ours, ref, what="numpy input")
    single = pipes[0](image=img[0], generator=torch.Generator().manual_seed(0), **BASE).images
    assert_close(single, ours, tol=0, what="single HWC array vs batch of one")
    t = torch.from_numpy(np.asarray(photo(72, 56, seed=2), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    ours, ref = run_both(pipes, image=t, **BASE)
    assert_close(ours, ref, what="tensor input")


def test_list_prompts_negatives_images_per_prompt_generator_list(pipes):
    ours, ref = run_both(pipes, seeds=(1, 2, 3, 4), prompt=["a castle", "a forest"],
                         negative_prompt=["blurry", "dark"], num_images_per_prompt=2, image=photo(64, 64, 3),
                         num_inference_steps=3, output_type="np")
    assert ours.shape[0] == 4
    assert_close(ours, ref)


def test_custom_depth_map(pipes):
    depth = torch.rand(1, 48, 40, generator=torch.Generator().manual_seed(5))
    ours, ref = run_both(pipes, image=photo(64, 64, 4), depth_map=depth, **BASE)
    assert_close(ours, ref)


def test_guidance_scale_one_and_strength_one(pipes):
    ours, ref = run_both(pipes, image=photo(64, 64, 5), guidance_scale=1.0, **BASE)
    assert_close(ours, ref, what="guidance 1")
    ours, ref = run_both(pipes, image=photo(64, 64, 5), strength=1.0, **BASE)
    assert_close(ours, ref, what="strength 1")


def test_pndm_few_steps_partial_strength(pipes):
    ours, ref = run_both(pipes, image=photo(64, 64, 6), prompt="x", num_inference_steps=2, strength=0.75,
                         output_type="np")
    assert_close(ours, ref)


SCHEDULERS = [
    ("DDIMScheduler", {}), ("PNDMScheduler", {}), ("LMSDiscreteScheduler", {}), ("EulerDiscreteScheduler", {}),
    ("EulerAncestralDiscreteScheduler", {}), ("HeunDiscreteScheduler", {}), ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("DPMSolverSinglestepScheduler", {}), ("KDPM2DiscreteScheduler", {}), ("KDPM2AncestralDiscreteScheduler", {}),
    ("DEISMultistepScheduler", {}), ("UniPCMultistepScheduler", {}), ("DDPMScheduler", {}),
]


@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=lambda s: s[0] + "".join(f"-{k}" for k in s[1]))
def test_every_scheduler(pipes, scheduler):
    ours, ref = run_both(pipes, scheduler=scheduler, image=photo(64, 64, 7), **{**BASE, "num_inference_steps": 4})
    assert_close(ours, ref)


def test_ddim_with_eta(pipes):
    ours, ref = run_both(pipes, scheduler=("DDIMScheduler", {}), image=photo(64, 64, 8), eta=0.7, **BASE)
    assert_close(ours, ref)


def test_callback_on_step_end_edits_latents(pipes):
    seen = {0: [], 1: []}

    def make(k):
        def cb(pipe, i, t, tensors):
            seen[k].append((i, int(t), sorted(tensors)))
            return {"latents": tensors["latents"] * 0.9}
        return cb

    ours, ref = pipes
    outs = []
    for k, pipe in enumerate((ours, ref)):
        outs.append(pipe(image=photo(64, 64, 9), generator=torch.Generator().manual_seed(0),
                         callback_on_step_end=make(k),
                         callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "depth_mask"], **BASE).images)
    assert seen[0] == seen[1] and len(seen[0]) > 0
    assert_close(outs[0], outs[1])


@pytest.mark.parametrize("output_type", ["latent", "pt", "np", "pil"])
def test_output_types(pipes, output_type):
    ours, ref = run_both(pipes, image=photo(64, 64, 10), **{**BASE, "output_type": output_type})
    if output_type == "pil":
        assert isinstance(ours[0], PIL.Image.Image)
        ours, ref = [np.asarray(i) for i in ours], [np.asarray(i) for i in ref]
        assert_close(ours, ref, what="PIL pixels (uint8)")
        return
    if output_type in ("latent", "pt"):
        assert isinstance(ours, torch.Tensor)
        ours, ref = ours.numpy(), ref.numpy()
    assert_close(ours, ref, what=output_type)


def test_prompt_embeds(pipes):
    ours, ref = pipes
    emb = torch.randn(1, 77, ref.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(3))
    neg = torch.randn(1, 77, ref.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(4))
    out = [p(prompt_embeds=emb, negative_prompt_embeds=neg, image=photo(64, 64, 11),
             generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="np").images
           for p in (ours, ref)]
    assert_close(*out)


def test_clip_skip_against_hand_built_reference(pipes):
    """diffusers 0.42 + transformers 5 crash on clip_skip, so build its embeddings from transformers' hidden states."""
    ours, ref = pipes
    ids = ref.tokenizer(["a red house"], padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
    hidden = ref.text_encoder(ids, output_hidden_states=True).hidden_states[-(1 + 1)]
    emb = ref.text_encoder.final_layer_norm(hidden)  # transformers 5: no `.text_model`
    expected = ref(prompt_embeds=emb, image=photo(64, 64, 12), generator=torch.Generator().manual_seed(0),
                   num_inference_steps=3, output_type="np").images
    got = ours(prompt="a red house", clip_skip=1, image=photo(64, 64, 12), generator=torch.Generator().manual_seed(0),
               num_inference_steps=3, output_type="np").images
    assert_close(got, expected)


def test_save_pretrained_loads_in_diffusers_with_same_image(pipes, tmp_path):
    from diffusers import StableDiffusionDepth2ImgPipeline as Reference
    ours, _ = pipes
    ours.save_pretrained(tmp_path / "saved")
    ref = Reference.from_pretrained(tmp_path / "saved")
    ref.set_progress_bar_config(disable=True)
    again = StableDiffusionDepth2ImgPipeline.from_pretrained(tmp_path / "saved")
    again.set_progress_bar_config(disable=True)
    again.set_exact(True)
    out = [p(image=photo(64, 64, 13), generator=torch.Generator().manual_seed(0), **BASE).images
           for p in (ours, ref, again)]
    assert_close(out[0], out[1], what="saved -> diffusers")
    assert_close(out[0], out[2], tol=0, what="saved -> minidepth")


@pytest.mark.official
def test_official_size_end_to_end(tmp_path):
    """Hub-faithful official-size checkpoint (legacy VAE names, stored position_ids), fp32 and the fp16 variant:
    diffusers' image bit for bit in exact mode (the fast kernels at this size: test_fast_kernels.py). One pipeline
    in memory at a time (each is ~5.5 GB in float32)."""
    from diffusers import StableDiffusionDepth2ImgPipeline as Reference
    folder = factory.cached_checkpoint("official")
    kwargs = dict(prompt="a red house", image=photo(64, 64, 14), num_inference_steps=2, output_type="np")
    ours = StableDiffusionDepth2ImgPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    ours.set_exact(True)
    got = ours(generator=torch.Generator().manual_seed(0), **kwargs).images
    del ours
    gc.collect()
    ref = Reference.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    expected = ref(generator=torch.Generator().manual_seed(0), **kwargs).images
    del ref
    gc.collect()
    assert_close(got, expected, what="official size fp32")
    half = StableDiffusionDepth2ImgPipeline.from_pretrained(folder, variant="fp16", torch_dtype=torch.float32)
    assert next(half.unet.parameters()).dtype == torch.float32
    del half
    gc.collect()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_pipelines_match(tiny_checkpoint, dtype):
    """torch_dtype=bf16/fp16 on the CPU: same numbers as diffusers in the same dtype (the DPT runs under autocast)."""
    from diffusers import StableDiffusionDepth2ImgPipeline as Reference
    outs = []
    for pipe in (StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_checkpoint, torch_dtype=dtype),
                 Reference.from_pretrained(tiny_checkpoint, dtype=dtype)):  # diffusers 0.42 renamed torch_dtype
        pipe.set_progress_bar_config(disable=True)
        if isinstance(pipe, StableDiffusionDepth2ImgPipeline):
            pipe.set_exact(True)
        outs.append(pipe(image=photo(64, 64, 15), generator=torch.Generator().manual_seed(0), **BASE).images)
    assert_close(*outs, what=f"{dtype} images")
