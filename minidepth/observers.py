"""Watching a generation: the pipeline announces its stages to observers, which look and never change anything.

    class Watch(Observer):
        def step_done(self, pipe, *, index, timestep, latents, **data):
            print(index, float(timestep), latents.std().item())

    with pipe.observing(Watch()):
        image = pipe("a marble statue", image=photo).images[0]

An observer is any object with some of the methods below (subclassing `Observer` gives the rest as no-ops). Each is
called with the pipeline and keyword arguments only, so a method takes the ones it needs and `**data` for the rest;
new keywords may be added later, none removed. The tensors are the pipeline's own: read them, copy what you keep
(`.detach().cpu()`), never modify them in place -- then a recorded image is bit-identical to one not recorded
(tests/test_observers.py checks it for every observer of the package).

In the order of a call (diffusers' stages; the step methods announce them, so a notebook that calls the steps one by
one is observed too):

    generation_started  prompt, negative_prompt, num_images_per_prompt, guidance_scale, num_inference_steps,
                        strength, depth_map (given or None)                    after the argument checks, before any model
    stage_started       stage: "prompt" | "depth" | "encode" | "denoise" | "decode"      a model is about to run
    stage_finished      stage                                                             it has run (timing)
    prompt_encoded      prompt_embeds (B, 77, D), negative_prompt_embeds (B, 77, D) or None, prompt,
                        num_images_per_prompt
    depth_ready         depth_mask (B [x2 with guidance], 1, h, w) in [-1, 1], depth_map_given: bool
    image_ready         image (B, 3, H, W) in [-1, 1] (or 4-channel latents given as the image)
    latents_ready       image_latents (B, 4, h, w) = scaling_factor x posterior sample, noise, latents = the
                        noised latents the loop starts from, timestep
    denoising_started   latents, timesteps (one entry per UNet call), guidance_scale
    step_done           index (UNet call), timestep, model_input (the scaled latents the UNet saw, without the depth
                        channel, (B, 4, h, w)), noise_pred (guided), latents (after the scheduler step), x0 (the
                        scheduler's estimate of the clean latents, None for schedulers that give none)
    decoded             images (as `output_type`), output_type, latents

diffusers' `callback_on_step_end` stays available for what observers may not do: change the latents mid-loop.
"""

from __future__ import annotations

import contextlib

EVENTS = ("generation_started", "stage_started", "stage_finished", "prompt_encoded", "depth_ready", "image_ready",
          "latents_ready", "denoising_started", "step_done", "decoded")


class Observer:
    """Every event, doing nothing: override the ones you want (see the module docstring for their keywords)."""

    def generation_started(self, pipe, **data) -> None: ...
    def stage_started(self, pipe, **data) -> None: ...
    def stage_finished(self, pipe, **data) -> None: ...
    def prompt_encoded(self, pipe, **data) -> None: ...
    def depth_ready(self, pipe, **data) -> None: ...
    def image_ready(self, pipe, **data) -> None: ...
    def latents_ready(self, pipe, **data) -> None: ...
    def denoising_started(self, pipe, **data) -> None: ...
    def step_done(self, pipe, **data) -> None: ...
    def decoded(self, pipe, **data) -> None: ...


class Observable:
    """The pipeline's side: a list of observers, `observing(...)` to add some for a block, `announce` to tell them."""

    def __init__(self):
        self.observers: list = []

    @contextlib.contextmanager
    def observing(self, *observers):
        """Add `observers` for the length of the block (then remove exactly those)."""
        for observer in observers:
            if not any(callable(getattr(observer, event, None)) for event in EVENTS):
                raise TypeError(f"{type(observer).__name__} is not an observer: it has none of the methods "
                                f"{', '.join(EVENTS)} (see minidepth/observers.py)")
        self.observers.extend(observers)
        try:
            yield self
        finally:
            for observer in observers:
                self.observers.remove(observer)

    def announce(self, event: str, **data) -> None:
        """Call `observer.<event>(self, **data)` on every observer that has the method, in the order they were added."""
        for observer in list(self.observers):
            method = getattr(observer, event, None)
            if method is not None:
                method(self, **data)

    @contextlib.contextmanager
    def stage(self, name: str):
        """Announce `stage_started` / `stage_finished` around a block that runs one model."""
        self.announce("stage_started", stage=name)
        yield
        self.announce("stage_finished", stage=name)
