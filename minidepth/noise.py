"""Gaussian noise drawn exactly as diffusers draws it, so the same `torch.Generator` gives the same numbers.

Used by the autoencoder's posterior sample, the pipeline's img2img noise and the stochastic schedulers.
"""

from __future__ import annotations

import torch


def randn_tensor(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise of `shape`, drawn exactly as diffusers' `randn_tensor` so seeds reproduce its numbers:
    - drawn directly in `dtype` (never float32 then cast), on `device` (default CPU);
    - a CPU generator with another device: drawn on the CPU, then moved;
    - a list of generators: sample i is drawn as shape (1, ...) from generator i, then concatenated (a list of one
      is the same as that generator). The list must have one generator per sample."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            generator = generator[0]
        elif len(generator) != shape[0]:
            raise ValueError(f"generator: got a list of {len(generator)} generators for a batch of {shape[0]}; "
                             "pass one generator per sample, or a single one")
    first = generator[0] if isinstance(generator, (list, tuple)) else generator
    draw_on = device
    if first is not None and first.device.type != device.type:
        if first.device.type != "cpu":
            raise ValueError(f"generator: a generator on {first.device} cannot draw a tensor for {device}; "
                             "use a CPU generator or one on the same device")
        draw_on = torch.device("cpu")
    if isinstance(generator, (list, tuple)):
        noise = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=draw_on, dtype=dtype) for g in generator])
    else:
        noise = torch.randn(shape, generator=generator, device=draw_on, dtype=dtype)
    return noise.to(device)
