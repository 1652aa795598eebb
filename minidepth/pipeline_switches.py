"""diffusers' memory switches on the pipeline: attention slicing or xformers, VAE slicing and tiling, model CPU offload.

Each only sets how a model computes or where it lives; the pipeline's steps read nothing else of them (offload:
`_offload_device`, which the pipeline's `_running` honours as each model runs).
"""

from __future__ import annotations

import torch


class MemorySwitchesMixin:
    """For StableDiffusionDepth2ImgPipeline: needs `unet`, `vae` and `to()`."""

    _offload_device: torch.device | None = None

    def enable_attention_slicing(self, slice_size: str | int = "auto") -> None:
        """Compute attention in slices ("auto": half the heads at a time, "max": one at a time, or an int)."""
        from .models.attention import set_attention_backend
        set_attention_backend(self.unet, "sliced", slice_size=slice_size)

    def disable_attention_slicing(self) -> None:
        from .models.attention import set_attention_backend
        set_attention_backend(self.unet, "sdpa")

    def enable_xformers_memory_efficient_attention(self) -> None:
        from .models.attention import set_attention_backend
        for model in (self.unet, self.vae):
            set_attention_backend(model, "xformers")

    def disable_xformers_memory_efficient_attention(self) -> None:
        from .models.attention import set_attention_backend
        for model in (self.unet, self.vae):
            set_attention_backend(model, "sdpa")

    def enable_vae_slicing(self) -> None:
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    def enable_vae_tiling(self) -> None:
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    def enable_model_cpu_offload(self, device: str | torch.device = "cuda") -> None:
        """Keep every model on the CPU and move each one to `device` only while it runs."""
        self._offload_device = torch.device(device)
        self.to("cpu")

    def disable_model_cpu_offload(self) -> None:
        device, self._offload_device = self._offload_device, None
        if device is not None:
            self.to(device)
