"""`minidepth tour`: the table's numbers equal torch's FLOP counter and the parameter counts at the official size, and
the reference libraries' models (diffusers' UNet and VAE built on the meta device from the checkpoint's configs)."""

from __future__ import annotations

import json

import factory
import pytest
import torch

from minidepth.cli import command as cli
from minidepth.inside.tour import architecture_tour, flop_counter, unet_calls


@pytest.fixture(scope="module")
def tour():
    return architecture_tour(512)


def _count(fn) -> int:
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


def test_official_numbers_equal_the_flop_counter_and_parameter_counts(tour):
    import diffusers
    unet = tour.model("UNet")
    assert unet.params == 865_913_604 and f"{unet.flops / 1e9:,.1f}" == "1,608.6"
    assert sum(r.params for r in unet.rows) == unet.params and sum(r.flops for r in unet.rows) == unet.flops
    meta = dict(device="meta")
    with torch.device("meta"):  # independent: diffusers' own models from the checkpoint's config files
        ref_unet = diffusers.UNet2DConditionModel.from_config(factory.unet_config("official"))
        ref_vae = diffusers.AutoencoderKL.from_config(factory.vae_config("official"))
    assert sum(p.numel() for p in ref_unet.parameters()) == unet.params
    assert _count(lambda: ref_unet(torch.empty(2, 5, 64, 64, **meta), torch.tensor(500, **meta),
                                   encoder_hidden_states=torch.empty(2, 77, 1024, **meta))) == unet.flops
    encoder, decoder = tour.model("VAE encoder"), tour.model("VAE decoder")
    assert encoder.params + decoder.params == sum(p.numel() for p in ref_vae.parameters())
    assert _count(lambda: ref_vae.encode(torch.empty(1, 3, 512, 512, **meta))) == encoder.flops
    assert _count(lambda: ref_vae.decode(torch.empty(1, 4, 64, 64, **meta))) == decoder.flops
    text, dpt = tour.model("text encoder"), tour.model("depth (DPT)")
    assert text.params == 340_387_840 and sum(r.params for r in text.rows) == text.params
    assert sum(r.params for r in dpt.rows) == dpt.params and dpt.input.endswith("(1, 3, 384, 384)")
    # one generation: text encoder twice (prompt, negative), PNDM's 41 UNet calls for 40 denoising steps
    assert [m.calls for m in tour.models] == [2, 1, 1, 41, 1]
    assert tour.generation_flops == sum(m.flops * m.calls for m in tour.models)


def test_unet_calls_follow_the_pipeline(tiny_checkpoint):
    from minidepth import StableDiffusionDepth2ImgPipeline
    config = json.loads((tiny_checkpoint / "scheduler" / "scheduler_config.json").read_text())
    assert unet_calls(config, 50, 0.8) == (40, 41)  # PNDM repeats its first timestep
    assert unet_calls({**config, "_class_name": "DDIMScheduler"}, 50, 0.8) == (40, 40)
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    from test_pipeline import photo
    pipe("a house", image=photo(32, 32), num_inference_steps=5, strength=0.8, output_type="latent")
    assert len(calls) == unet_calls(config, 5, 0.8)[1] == 5  # 4 denoising steps, 5 UNet calls


def test_cli_prints_the_official_numbers_and_reads_a_checkpoint(tiny_checkpoint, capsys):
    assert cli.main(["tour", "--size", "512"]) == 0
    out = capsys.readouterr().out
    assert "865,913,604" in out and "1,608.6" in out
    assert cli.main(["tour", "--size", "96x64", "--model", str(tiny_checkpoint), "--markdown"]) == 0
    out = capsys.readouterr().out
    from safetensors.torch import load_file
    tiny_params = sum(t.numel() for t in load_file(tiny_checkpoint / "unet" / "diffusion_pytorch_model.safetensors")
                      .values())
    assert f"### UNet: {tiny_params:,} parameters" in out and "| down_blocks.0 |" in out
    assert cli.main(["tour", "--size", "100"]) == 2
