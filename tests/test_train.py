"""`minidepth train-lora` / `minidepth.train.train_lora` on the tiny checkpoint.

- one step against a reference built here from diffusers' UNet / VAE / depth channel, transformers' CLIP and peft's
  LoRA layers, with the same samples, noise and timesteps (replayed from the per-sample generators in the documented
  order): loss and every LoRA gradient, epsilon and v prediction, with and without min-SNR;
- 40 steps on 4 images lower the loss; the saved file gives the same image in diffusers and minidepth;
- resume from a checkpoint == the uninterrupted run; torchrun with 2 processes == 1 process; bad inputs.
The subprocess runs set OMP_NUM_THREADS=1 (on a CPU the thread count changes float rounding).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_pipeline import assert_close, photo

from minidepth import StableDiffusionDepth2ImgPipeline
from minidepth.train import TrainConfig, TrainError, train_lora
from minidepth.train import data as train_data
from minidepth.train import loop, objective

REPO = Path(__file__).resolve().parents[1]
RES = 64  # latents 8x8 (at 4x4 the tiny UNet's GroupNorms on 1x1 maps amplify float rounding)


def make_folder(folder: Path, n: int = 4, depth_for: tuple[int, ...] = (1,)) -> Path:
    """n photos of different aspect ratios with captions; photo i in `depth_for` gets its own 16-bit depth map."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo(48 + 8 * i, 40, seed=i).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of a house number {i}")
        if i in depth_for:
            y, x = np.mgrid[0:40, 0:48 + 8 * i]
            Image.fromarray(((x + 3 * y) * 200).astype(np.uint16)).save(folder / f"img{i}.depth.png")
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("train") / "data")


@pytest.fixture(scope="module")
def depth_cache(tiny_checkpoint, dataset, tmp_path_factory):
    """The DPT's depth maps of the dataset, estimated once for every test of the module."""
    folder = tmp_path_factory.mktemp("depth-cache")
    cache = train_data.DepthCache(folder)
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_checkpoint)
    cache.estimate(train_data.scan_folder(dataset), pipe)
    return folder


# ------------------------------------------------------------------------------------------------ the reference step
def reference_step(checkpoint, config, examples, order, prediction_type, b_values):
    """One micro-batch with diffusers + transformers + peft, the draws replayed from the same generators."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers import StableDiffusionDepth2ImgPipeline as Reference
    from diffusers.training_utils import compute_snr
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import CLIPTextModel, CLIPTokenizer
    unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet")
    vae = AutoencoderKL.from_pretrained(checkpoint / "vae")
    text_encoder = CLIPTextModel.from_pretrained(checkpoint / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(checkpoint / "tokenizer")
    scheduler = DDPMScheduler.from_pretrained(checkpoint / "scheduler", prediction_type=prediction_type)
    depth_pipe = Reference.from_pretrained(checkpoint)  # its prepare_depth_map
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    unet_names = {path: value for path, value in b_values.items() if path.startswith("unet.")}
    te_names = {path: value for path, value in b_values.items() if path.startswith("text_encoder.")}
    unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights=False,
                                target_modules=sorted({p[5:].rsplit(".", 1)[0] for p in unet_names})))
    if te_names:
        inject_adapter_in_model(LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights=False,
                                           target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), text_encoder)
    params = {}
    for prefix, model in (("unet.", unet), ("text_encoder.", text_encoder)):
        for name, p in model.named_parameters():
            if ".lora_" in name:
                layer = name.split(".lora_")[0]
                if prefix == "text_encoder." and not layer.startswith("text_model."):
                    layer = "text_model." + layer  # transformers 5 names CLIPTextModel's layers without it
                key = prefix + layer + (".down" if ".lora_A." in name else ".up")
                with torch.no_grad():
                    p.copy_(b_values[key])
                p.requires_grad_(True)
                params[key] = p
    assert set(params) == set(b_values), "peft and minidepth put LoRA layers on different layers"

    # the same batch as minidepth's, so that the kernels see the same shapes: first each sample's crop, caption
    # dropout and timestep, then the posterior samples (one generator each), then noise and offset
    gens = [train_data.sample_generator(config.seed, 0, j) for j in range(config.batch_size)]
    chosen = [examples[order[j]] for j in range(config.batch_size)]
    cache = train_data.DepthCache(config.depth_cache_path)
    items = [train_data.load_sample(e, config.resolution, config.crop, g, cache) for e, g in zip(chosen, gens)]
    drops = [bool(torch.rand(1, generator=g)[0] < config.caption_dropout) for g in gens]
    t = torch.cat([torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=g) for g in gens])
    pixels = torch.stack([px for px, _ in items])
    with torch.no_grad():
        x0 = vae.encode(pixels).latent_dist.sample(generator=gens) * vae.config.scaling_factor
    noise = torch.cat([torch.randn((1, *x0.shape[1:]), generator=g) +
                       config.noise_offset * torch.randn((1, x0.shape[1], 1, 1), generator=g) for g in gens])
    depth_channel = torch.cat([depth_pipe.prepare_depth_map(px[None], d[None], 1, False, torch.float32,
                                                            torch.device("cpu")) for px, d in items])
    captions = ["" if drop else e.caption for e, drop in zip(chosen, drops)]
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    text = text_encoder(ids, return_dict=False)[0]
    noisy = scheduler.add_noise(x0, noise, t)
    pred = unet(torch.cat([noisy, depth_channel], dim=1), t, text, return_dict=False)[0]
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
    loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
    if config.snr_gamma is not None:  # diffusers' examples/text_to_image/train_text_to_image.py
        snr = compute_snr(scheduler, t)
        w = torch.stack([snr, config.snr_gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
        w = w / snr if prediction_type == "epsilon" else w / (snr + 1)
        loss = loss * w
    assert any(drops) or config.caption_dropout == 0
    loss = loss.mean()
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in params.items()}


@pytest.mark.parametrize("prediction_type,snr_gamma,extra", [
    ("epsilon", None, {}),
    ("v_prediction", None, {"targets": "all", "crop": "random"}),
    ("epsilon", 5.0, {"noise_offset": 0.1, "caption_dropout": 0.5}),
    ("v_prediction", 5.0, {"train_text_encoder": True, "targets": "attn+ff"}),
])
def test_one_step_equals_diffusers_and_peft(tiny_checkpoint, dataset, depth_cache, prediction_type, snr_gamma, extra):
    from minidepth.adapters import lora
    from minidepth.schedulers import DDPMScheduler
    config = TrainConfig(model=str(tiny_checkpoint), data=str(dataset), resolution=RES, batch_size=3, rank=3,
                         alpha=6.0, seed=7, snr_gamma=snr_gamma, depth_cache=str(depth_cache), **extra)
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_checkpoint)
    params = objective.add_trainable_lora(pipe.unet, objective.target_layers(pipe.unet, config.targets), config.rank,
                                          config.alpha, config.seed, "unet")
    if config.train_text_encoder:
        params += objective.add_trainable_lora(pipe.text_encoder, objective.text_target_layers(pipe.text_encoder),
                                               config.rank, config.alpha, config.seed, "text_encoder")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B != 0, so that A gets gradients too
        for p in params:
            if not p.any():
                p.normal_(0, 0.2, generator=g)
    from minidepth.adapters.formats import LayerNames
    names = LayerNames(pipe.unet, pipe.text_encoder).to_file
    values = {}
    for component, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for ours, layer in lora.lora_layers(model):
            path = names[component][ours]
            values[f"{component}.{path}.down"] = layer.lora[objective.ADAPTER].down.detach().clone()
            values[f"{component}.{path}.up"] = layer.lora[objective.ADAPTER].up.detach().clone()
    examples = train_data.scan_folder(dataset)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    run = loop.TrainingRun(config, pipe, examples, train_data.DepthCache(depth_cache), scheduler,
                           torch.device("cpu"), 0, 1, pipe.unet, pipe.text_encoder, None)
    order = train_data.sample_order(len(examples), config.seed, 0, config.batch_size)
    loss = run.micro_batch_loss(0, order, range(config.batch_size)).mean()
    loss.backward()
    ours = {}
    for component, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for ours_name, layer in lora.lora_layers(model):
            path = names[component][ours_name]
            ours[f"{component}.{path}.down"] = layer.lora[objective.ADAPTER].down.grad
            ours[f"{component}.{path}.up"] = layer.lora[objective.ADAPTER].up.grad
    ref_loss, ref_grads = reference_step(tiny_checkpoint, config, examples, order, prediction_type, values)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item()), (loss.item(), ref_loss.item())
    scale = max(g.abs().max().item() for g in ref_grads.values())
    worst = max((ours[k] - ref_grads[k]).abs().max().item() / scale for k in ref_grads)
    print(f"\n{prediction_type} snr_gamma={snr_gamma} {extra}: loss {loss.item():.6f}, relative difference "
          f"{abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()):.1e}; gradients {worst:.1e}")
    assert worst <= 1e-5, f"LoRA gradients differ by {worst:.2e} (relative to the largest)"
    assert all(ours[k].abs().max() > 0 for k in ours), "every LoRA tensor should get a gradient"
    if config.train_text_encoder:
        assert any(k.startswith("text_encoder.") for k in ours)
