"""What is trained and what is minimised: LoRA layers on the UNet (and text encoder), the random draws of a sample,
and the denoising loss with the depth channel.

LoRA layers are minidepth's own (`adapters/lora.py`: y = W x + alpha / r · B(A x), hooked onto the model's
nn.Linear / nn.Conv2d), initialised as peft initialises them: A kaiming-uniform (a = sqrt(5), torch's nn.Linear
rule), B = 0, so training starts from the unchanged model.

The loss of one sample (Ho et al. 2020, algorithm 1; Rombach et al. 2022, eq. 2; with the 5th, depth, input channel):

    x0   = (mean + std · eps_post) × scaling_factor      the autoencoder's posterior sample
    x_t  = sqrt(a_bar_t) x0 + sqrt(1 - a_bar_t) n       n = noise (+ noise_offset · one normal number per channel)
    pred = unet(concat[x_t, depth], t, text)
    target = n                                          prediction_type "epsilon"
           = sqrt(a_bar_t) n - sqrt(1 - a_bar_t) x0     "v_prediction" (Salimans & Ho 2022, sec. 4: v)
           = x0                                         "sample"
    loss = w_t · mean over (c, h, w) of (pred - target)^2                (computed in float32)
    w_t  = 1, or with min-SNR-gamma (Hang et al. 2023, eq. 9, as diffusers' train_text_to_image): SNR_t =
           a_bar_t / (1 - a_bar_t) and w_t = min(SNR_t, gamma) / SNR_t (epsilon), / (SNR_t + 1) (v), / 1 (sample)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import lora
from .data import derive_seed

ADAPTER = "trained"  # the adapter name of the layers being trained
ATTENTION = (".attn1.to_q", ".attn1.to_k", ".attn1.to_v", ".attn1.to_out",
             ".attn2.to_q", ".attn2.to_k", ".attn2.to_v", ".attn2.to_out")
FEED_FORWARD = (".ff.net.0.proj", ".ff.net.2", ".proj_in", ".proj_out")
TEXT_ATTENTION = (".attn.to_q", ".attn.to_k", ".attn.to_v", ".attn.to_out")  # q_proj, k_proj, v_proj, out_proj
BLOCKS = ("down_blocks.", "mid_block.", "up_blocks.")


# ------------------------------------------------------------------------------------------------ LoRA layers
def target_layers(unet: nn.Module, targets: str) -> list[str]:
    """Our names of the UNet layers that get a LoRA: "attn" the attention projections (to_q, to_k, to_v, to_out of
    self- and cross-attention), "attn+ff" also the feed-forward and proj_in / proj_out, "all" every Linear and Conv2d
    of the down, mid and up blocks (ResNet conv1 / conv2 / conv_shortcut / time_emb_proj and the samplers: LoCon);
    conv_in (which reads the depth channel), conv_out and the time embedding stay as they are."""
    names = []
    for name, module in unet.named_modules():
        if not isinstance(module, lora.LORA_TARGETS):
            continue
        if name.endswith(ATTENTION) or (targets != "attn" and name.endswith(FEED_FORWARD)) or \
                (targets == "all" and name.startswith(BLOCKS)):
            names.append(name)
    return names


def text_target_layers(text_encoder: nn.Module) -> list[str]:
    return [n for n, m in text_encoder.named_modules() if isinstance(m, nn.Linear) and n.endswith(TEXT_ATTENTION)]


def add_trainable_lora(model: nn.Module, names: list[str], rank: int, alpha: float | None, seed: int,
                       component: str) -> list[nn.Parameter]:
    """Attach a fresh float32 adapter `ADAPTER` to each named layer (A kaiming-uniform from a generator seeded by
    (seed, component), B = 0) and make it the active one; the model's own weights are frozen. Returns the LoRA
    parameters, A and B of each layer in the order of `names`."""
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(derive_seed(seed, "lora-init", component))
    params = []
    for name in names:
        layer = model.get_submodule(name)
        shape = (layer.out_features, layer.in_features) if isinstance(layer, nn.Linear) else \
            (layer.out_channels, layer.in_channels, *layer.kernel_size)
        down = torch.empty(rank, *shape[1:])
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=g)  # peft's init of lora_A (= nn.Linear's)
        up = torch.zeros(shape[0], rank, *([1, 1] if len(shape) == 4 else []))
        adapter = lora.add_adapter(layer, ADAPTER, down, up, alpha if alpha is not None else float(rank))
        adapter.float()  # trained in float32 even when the model is half precision (mixed precision)
        adapter.down.requires_grad_(True)
        adapter.up.requires_grad_(True)
        layer.lora.active = [ADAPTER]
        params += [adapter.down, adapter.up]
    return params


def lora_parameters(model: nn.Module | None) -> dict[str, nn.Parameter]:
    """{"<layer>.down" / "<layer>.up": parameter} of the trained adapter (our layer names)."""
    out = {}
    for name, layer in lora.lora_layers(model):
        if ADAPTER in layer.lora:
            out[f"{name}.down"], out[f"{name}.up"] = layer.lora[ADAPTER].down, layer.lora[ADAPTER].up
    return out


# ------------------------------------------------------------------------------------------------ random draws
@dataclass
class Draws:
    """The random numbers of a batch, one generator per sample (the crop was drawn before, by data.load_sample)."""
    drop_caption: list[bool]        # train this sample with the empty caption
    timesteps: torch.Tensor         # (B,) int64 in [0, T)
    posterior_eps: torch.Tensor     # (B, c, h, w): the posterior sample is mean + std · eps
    noise: torch.Tensor             # (B, c, h, w), the noise offset included


def draw(generators: list[torch.Generator], latent_shape: tuple[int, int, int], num_train_timesteps: int,
         caption_dropout: float = 0.0, noise_offset: float = 0.0) -> Draws:
    """Per sample, in this order: u ~ U[0, 1) (caption dropped when u < caption_dropout), t ~ U{0, ..., T-1},
    eps_post, noise, offset (c, 1, 1) ~ N(0, I). All drawn on the CPU in float32, always, so the stream of numbers is
    the same whatever the options."""
    drop, ts, eps, noise = [], [], [], []
    for g in generators:
        drop.append(bool(torch.rand(1, generator=g)[0] < caption_dropout))
        ts.append(torch.randint(0, num_train_timesteps, (1,), generator=g))
        eps.append(torch.randn(latent_shape, generator=g))
        n = torch.randn(latent_shape, generator=g)
        offset = torch.randn((latent_shape[0], 1, 1), generator=g)
        noise.append(n + noise_offset * offset if noise_offset else n)  # Guttenberg 2023, "noise offset"
    return Draws(drop, torch.cat(ts), torch.stack(eps), torch.stack(noise))


# ------------------------------------------------------------------------------------------------ the loss
@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, posterior_eps: torch.Tensor) -> torch.Tensor:
    """x0 = (mean + std · eps) × scaling_factor (what `vae.encode(x).sample(generator)` computes, eps given)."""
    posterior = vae.encode(pixels)
    eps = posterior_eps.to(device=posterior.mean.device, dtype=posterior.mean.dtype)
    return (posterior.mean + posterior.std * eps) * vae.config.scaling_factor


def encode_text(text_encoder, tokenizer, captions: list[str], device) -> torch.Tensor:
    """The last hidden state of the text encoder for the captions, padded to the tokenizer's length (77), as the
    pipeline's `encode_prompt` makes prompt_embeds (gradients flow when the text encoder has trained LoRA layers)."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(device)).last_hidden_state


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR_t = a_bar_t / (1 - a_bar_t), as diffusers' `compute_snr` forms it: (sqrt(a_bar) / sqrt(1 - a_bar))^2."""
    alpha = (alphas_cumprod ** 0.5).to(timesteps.device)[timesteps].float()
    sigma = ((1.0 - alphas_cumprod) ** 0.5).to(timesteps.device)[timesteps].float()
    return (alpha / sigma) ** 2


def loss_weights(alphas_cumprod, timesteps, prediction_type: str, snr_gamma: float | None) -> torch.Tensor | None:
    """min-SNR-gamma weights (B,), or None for the plain MSE."""
    if snr_gamma is None:
        return None
    s = snr(alphas_cumprod, timesteps)
    clipped = torch.stack([s, snr_gamma * torch.ones_like(timesteps, dtype=s.dtype)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        return clipped / s
    if prediction_type == "v_prediction":
        return clipped / (s + 1)
    return clipped


def velocity(alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = sqrt(a_bar_t) noise - sqrt(1 - a_bar_t) x0 (Salimans & Ho 2022; diffusers' get_velocity)."""
    a = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t.to(x0.device)]
    return (a ** 0.5).view(-1, 1, 1, 1) * noise - ((1 - a) ** 0.5).view(-1, 1, 1, 1) * x0


def per_sample_loss(unet, scheduler, x0: torch.Tensor, depth: torch.Tensor, text: torch.Tensor, draws: Draws,
                    snr_gamma: float | None = None) -> torch.Tensor:
    """The (B,) losses of the module docstring. `unet` may be the DistributedDataParallel wrapper; `scheduler` gives
    the noise schedule (alphas_cumprod), add_noise and the checkpoint's prediction_type."""
    dtype = getattr(unet, "module", unet).dtype  # the model's own (frozen) weights' dtype (DDP: the wrapped model)
    t = draws.timesteps.to(x0.device)
    noise = draws.noise.to(device=x0.device, dtype=x0.dtype)
    noisy = scheduler.add_noise(x0, noise, t)  # DDPM eq. 4
    sample = torch.cat([noisy, depth.to(noisy.dtype)], dim=1).to(dtype)  # (B, 5, h, w): depth is the 5th channel
    pred = unet(sample, t, encoder_hidden_states=text.to(dtype))
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = velocity(scheduler.alphas_cumprod, x0, noise, t)
    elif prediction_type == "sample":
        target = x0
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r} in the scheduler config")
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
    weights = loss_weights(scheduler.alphas_cumprod, t, prediction_type, snr_gamma)
    return loss if weights is None else loss * weights
