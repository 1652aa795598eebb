"""The denoising filmstrip: x0 equals the schedulers' own prediction, the image is unchanged, files are named as
documented (Python and `minidepth generate --filmstrip --attention-maps`)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from test_pipeline import photo

from minidepth.cli import command as cli
from minidepth.inside.filmstrip import LATENT_RGB, fit_latent_preview, latent_preview, record_filmstrip

KW = dict(prompt="a wooden cabin in the snow", num_inference_steps=5, output_type="np")


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    from minidepth import StableDiffusionDepth2ImgPipeline
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scheduler, overrides", [("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
                                                  ("DDIMScheduler", {"prediction_type": "v_prediction"})])
def test_x0_equals_the_schedulers_prediction_and_the_image_is_unchanged(pipe, scheduler, overrides):
    from minidepth import schedulers
    saved = pipe.scheduler
    pipe.scheduler = getattr(schedulers, scheduler).from_config({**dict(saved.config), **overrides})
    try:
        run = lambda: pipe(image=photo(96, 64), generator=torch.Generator().manual_seed(0), **KW).images
        plain = run()
        own = []  # the scheduler's pred_original_sample at each step
        step = pipe.scheduler.step

        def recording_step(*args, **kwargs):
            out = step(*args, **{**kwargs, "return_dict": True})
            own.append(out.pred_original_sample.float())
            return out
        pipe.scheduler.step = recording_step
        with record_filmstrip(pipe, every=1) as film:
            recorded = run()
        del pipe.scheduler.step
    finally:
        pipe.scheduler = saved
    assert np.array_equal(plain, recorded)
    assert [f.call for f in film.frames] == list(range(len(own))) == list(range(4))
    worst = max(float((f.x0 - x).abs().max() / x.abs().max()) for f, x in zip(film.frames, own))
    assert worst <= 1e-5, f"x0 differs from the scheduler's prediction by {worst:.3g} (relative)"


def test_frame_choice_and_strip(pipe):
    with record_filmstrip(pipe, steps=[0, -1]) as film:
        out = pipe(image=photo(96, 64), generator=torch.Generator().manual_seed(0), **{**KW, "output_type": "pil"})
    assert [f.call for f in film.frames] == [0, 4] and film.frames[0].calls == 5  # PNDM: 5 steps -> 5 UNet calls
    # default: about 8 frames, and the last
    assert record_filmstrip(pipe).chosen_calls(41) == [0, 6, 12, 18, 24, 30, 36, 40]
    assert record_filmstrip(pipe, every=10).chosen_calls(41) == [0, 10, 20, 30, 40]
    with pytest.raises(ValueError, match="out of range"):
        record_filmstrip(pipe, steps=[5]).chosen_calls(5)
    for decoder in ("vae", "linear"):
        strip = film.strip(decoder)
        assert strip.height > 64 and strip.width == 5 * (96 + 2) + 2  # photo, depth, 2 frames, final
    final_tile = np.asarray(film.strip("linear").crop((2 + 4 * 98, 2, 2 + 4 * 98 + 96, 66)))
    assert np.array_equal(final_tile, np.asarray(out.images[0]))


def test_linear_preview_and_its_fit():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 6, 5, generator=g)
    weights, bias = torch.randn(4, 3, generator=g) * 0.3, torch.tensor([0.1, -0.2, 0.05])
    colours = torch.einsum("bchw,cr->brhw", latents, weights) + bias[None, :, None, None]
    images = colours.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)  # each latent pixel = an 8x8 block
    fitted_w, fitted_b = fit_latent_preview(latents, images)
    assert torch.allclose(fitted_w.float(), weights, atol=1e-5) and torch.allclose(fitted_b.float(), bias, atol=1e-5)
    preview = latent_preview(latents, (40, 48))
    assert len(preview) == 2 and preview[0].size == (40, 48) and len(LATENT_RGB) == 4


def test_cli_writes_filmstrip_and_attention_maps_with_the_same_image(tiny_checkpoint, tmp_path, capsys):
    photo(100, 68).save(tmp_path / "in.png")
    base = ["generate", "--image", str(tmp_path / "in.png"), "--prompt", "a wooden cabin in the snow", "--steps", "3",
            "--seed", "7", "--model", str(tiny_checkpoint), "--device", "cpu", "--quiet"]
    assert cli.main(base + ["--out", str(tmp_path / "plain.png")]) == 0
    seen = base + ["--out", str(tmp_path / "seen.png"), "--filmstrip", "--filmstrip-every", "1",
                   "--filmstrip-decoder", "linear", "--attention-maps", "cabin, snow"]
    assert cli.main(seen) == 0
    names = {"seen.png", "seen-filmstrip.png", "seen-attn-cabin.png", "seen-attn-snow.png"}
    assert names <= {p.name for p in tmp_path.iterdir()}
    with PIL.Image.open(tmp_path / "plain.png") as a, PIL.Image.open(tmp_path / "seen.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b)), "recording changed the image"
    with PIL.Image.open(tmp_path / "seen-attn-cabin.png") as im:
        assert im.size == (96, 64)
    capsys.readouterr()
    assert cli.main(seen) == 1  # never overwritten without --overwrite, checked before any model loads
    assert "already exists" in capsys.readouterr().err
    assert cli.main(base + ["--out", str(tmp_path / "dog.png"), "--attention-maps", "dog"]) == 2
    assert "'dog' not in the prompt" in capsys.readouterr().err
    assert not (tmp_path / "dog.png").exists()
