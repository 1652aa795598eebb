"""The pipeline's edges: its output type and the checks of its call arguments (loading and saving the seven
components: checkpoints/components.py)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class PipelineOutput:
    """`images`: a list of PIL images, a (B, H, W, 3) numpy array, a (B, 3, H, W) tensor, or latents (B, 4, h, w)."""
    images: Any


# ------------------------------------------------------------------------------------------------ argument checks


def _fail(name: str, value, accepted: str, kind=ValueError):
    shown = repr(value) if not isinstance(value, torch.Tensor) else f"tensor of shape {tuple(value.shape)}"
    raise kind(f"`{name}` must be {accepted}; got {shown}")


def check_call_arguments(pipe, *, prompt, image, strength, num_inference_steps, guidance_scale, negative_prompt,
                         num_images_per_prompt, generator, prompt_embeds, negative_prompt_embeds, output_type,
                         clip_skip, callback_steps, callback_on_step_end_tensor_inputs, allowed_tensor_inputs,
                         depth_map):
    """Everything the reference checks, plus what it lets through to a deep crash, a NaN image or a silent no-op."""
    from .image_processing import OUTPUT_TYPES, is_latents
    if image is None or (isinstance(image, (list, tuple)) and len(image) == 0):
        raise ValueError("`image` is required: pass a PIL image, a numpy array, a torch tensor or a non-empty list "
                         f"of them; got {image!r}")
    if not isinstance(strength, numbers.Real) or not 0 <= strength <= 1:
        _fail("strength", strength, "a number in [0, 1]")
    if not isinstance(num_inference_steps, numbers.Integral) or isinstance(num_inference_steps, bool) \
            or num_inference_steps < 1:
        _fail("num_inference_steps", num_inference_steps, "an integer >= 1")
    if min(int(num_inference_steps * strength), num_inference_steps) < 1:
        raise ValueError(f"`strength`={strength} with `num_inference_steps`={num_inference_steps} leaves no denoising "
                         "step (int(num_inference_steps * strength) is 0); raise either of them")
    if not isinstance(guidance_scale, numbers.Real) or not math.isfinite(guidance_scale):
        _fail("guidance_scale", guidance_scale, "a finite number (guidance is on when > 1)")
    if not isinstance(num_images_per_prompt, numbers.Integral) or num_images_per_prompt < 1:
        _fail("num_images_per_prompt", num_images_per_prompt, "an integer >= 1")
    if output_type not in OUTPUT_TYPES:
        _fail("output_type", output_type, f"one of {OUTPUT_TYPES}")
    if clip_skip is not None and (not isinstance(clip_skip, numbers.Integral) or clip_skip < 0):
        _fail("clip_skip", clip_skip, "None or an integer >= 0")
    if callback_steps is not None and (not isinstance(callback_steps, int) or callback_steps <= 0):
        _fail("callback_steps", callback_steps, "a positive integer")
    bad = [k for k in callback_on_step_end_tensor_inputs or () if k not in allowed_tensor_inputs]
    if bad:
        _fail("callback_on_step_end_tensor_inputs", bad, f"names from {list(allowed_tensor_inputs)}")

    # prompts
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("pass either `prompt` or `prompt_embeds`, not both")
    if prompt is None and prompt_embeds is None:
        raise ValueError("pass `prompt` (a string or a list of strings) or `prompt_embeds`")
    if prompt is not None:
        if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and
                                                    (not prompt or not all(isinstance(p, str) for p in prompt))):
            _fail("prompt", prompt, "a string or a non-empty list of strings", TypeError)
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("pass either `negative_prompt` or `negative_prompt_embeds`, not both")
    if negative_prompt is not None:
        if prompt is not None and type(prompt) is not type(negative_prompt):
            raise TypeError(f"`negative_prompt` must be the same type as `prompt` ({type(prompt).__name__}); "
                            f"got {type(negative_prompt).__name__}")
        if isinstance(negative_prompt, list) and (not all(isinstance(p, str) for p in negative_prompt)):
            _fail("negative_prompt", negative_prompt, "a string or a list of strings", TypeError)
        batch = len(prompt) if isinstance(prompt, list) else 1 if prompt is not None else prompt_embeds.shape[0]
        if isinstance(negative_prompt, list) and len(negative_prompt) != batch:
            raise ValueError(f"`negative_prompt` has {len(negative_prompt)} entries but `prompt` has {batch}")
    for name, emb in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
        if emb is not None and (not isinstance(emb, torch.Tensor) or emb.ndim != 3):
            _fail(name, emb, "a (batch, tokens, width) tensor", TypeError)
    if prompt_embeds is not None and negative_prompt_embeds is not None \
            and prompt_embeds.shape != negative_prompt_embeds.shape:
        raise ValueError(f"`prompt_embeds` {tuple(prompt_embeds.shape)} and `negative_prompt_embeds` "
                         f"{tuple(negative_prompt_embeds.shape)} must have the same shape")

    # batch sizes and generators
    batch = (1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0])
    batch *= num_images_per_prompt
    if isinstance(generator, list):
        if len(generator) != batch:
            raise ValueError(f"`generator` is a list of {len(generator)} generators but the batch has {batch} images "
                             "(prompts x num_images_per_prompt); pass one generator or exactly one per image")
        if not all(isinstance(g, torch.Generator) for g in generator):
            _fail("generator", generator, "a torch.Generator or a list of them", TypeError)
    elif generator is not None and not isinstance(generator, torch.Generator):
        _fail("generator", generator, "a torch.Generator or a list of them", TypeError)
    images = image if isinstance(image, (list, tuple)) else [image]
    n_images = sum(x.shape[0] if getattr(x, "ndim", 0) == 4 else 1 for x in images)
    if n_images > batch or batch % n_images:
        raise ValueError(f"`image` holds {n_images} images, which does not divide the batch of {batch} images "
                         "(prompts x num_images_per_prompt)")
    if is_latents(image) and depth_map is None:
        raise ValueError("`image` has 4 channels, so it is taken as autoencoder latents; latents need a `depth_map` "
                         "(the depth cannot be estimated from latents). Pass RGB images (3 channels) otherwise.")


def split_lora_scale(cross_attention_kwargs: dict | None) -> tuple[float | None, dict | None]:
    """diffusers' `cross_attention_kwargs={"scale": s}` -> (s, the rest for the attention processors): the strength
    goes to `adapters.lora.lora_scale` (the pipeline's `_running`), the rest to the UNet."""
    if not cross_attention_kwargs or "scale" not in cross_attention_kwargs:
        return None, cross_attention_kwargs
    rest = {k: v for k, v in cross_attention_kwargs.items() if k != "scale"}
    return cross_attention_kwargs["scale"], rest or None
