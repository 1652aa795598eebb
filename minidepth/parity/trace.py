"""Record one run of each pipeline's real `__call__`, stage by stage, for `tool.compare`.

    ours = trace_minidepth(our_pipe, photo, settings, torch.Generator().manual_seed(0))
    theirs = trace_diffusers(their_pipe, photo, settings, torch.Generator().manual_seed(0))
    ours.stages   # {"tokens (prompt)": ..., "step 1/3 (t=801) unet": ..., "image": ...}

Nothing is replayed or rewritten here: each side runs its own `__call__` once, with `output_type="pt"`, and the tool
only watches. So a mistake in how our `__call__` wires its steps together, or a change in diffusers' loop, shows up.

Where the data comes from:

    stage                        minidepth (pipe(...))              diffusers (its pipe(...))
    tokens, text embeddings      text_encoder hook, prompt_encoded  text_encoder hook, step-end callback's prompt_embeds
    depth input / estimate       depth_estimator hook               depth_estimator hook
    depth channel                depth_ready                        step-end callback's depth_mask
    image tensor                 image_ready                        a recording subclass of its image processor
    posterior sample, noise,     latents_ready                      a recording subclass of its scheduler's class
      noised latents
    step k unet                  unet hook (the raw output)         unet hook (the raw output)
    step k latents               step_done                          step-end callback's latents
    image                        decoded                            the returned images

minidepth is watched through its observer API (minidepth/observers.py) plus forward hooks where no event carries the
datum. diffusers is watched through `callback_on_step_end` (it returns {}, so nothing is changed) and forward
hooks, and for the stages that happen inside its non-network objects, through two small subclasses made here from
the same configs: a scheduler whose `add_noise` records its arguments and result around `super().add_noise`, and an
image processor whose `preprocess` records its result. They are set on the reference pipeline for the run only, and
none of its objects has a method replaced. Recorded tensors are copies (`_keep`), so nothing a pipeline does later
changes them.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import torch

from ..observers import Observer

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Trace:
    """One side's run: stage name -> tensor, in order; the network of each stage and how to rerun it for a drill."""
    stages: dict = field(default_factory=dict)
    networks: dict = field(default_factory=dict)   # stage name -> network name
    reruns: dict = field(default_factory=dict)     # stage name -> function(net) that reruns it on these inputs

    def add(self, name, tensor, network=None, rerun=None):
        """Record a stage; one the run never reached (None) is left out, and so fails as missing on this side."""
        if tensor is None:
            return
        self.stages[name] = tensor
        if network:
            self.networks[name], self.reruns[name] = network, rerun


def _keep(x):
    return x.detach().clone() if isinstance(x, torch.Tensor) else x


def _output(out) -> torch.Tensor:
    """A network's main output tensor: the tensor itself, a tuple's first item, or `.sample` / `.predicted_depth` /
    `.last_hidden_state` of a model output."""
    if isinstance(out, (tuple, list)):
        return out[0]
    for name in ("sample", "predicted_depth", "last_hidden_state"):
        if hasattr(out, name):
            return getattr(out, name)
    return out


@dataclass
class _Records:
    """What one run produced, side-neutral; `_assemble` turns it into a Trace with the stage names."""
    token_ids: list = field(default_factory=list)      # one (B, 77) per text encoder call: prompt, then negative
    text_embeddings: torch.Tensor | None = None        # [negative; prompt] as the UNet gets them
    depth_pixels: torch.Tensor | None = None
    depth_estimate: torch.Tensor | None = None
    depth_channel: torch.Tensor | None = None
    image: torch.Tensor | None = None                  # the preprocessed image, (B, 3, H, W) in [-1, 1]
    posterior: torch.Tensor | None = None              # scaling_factor x the posterior sample
    noise: torch.Tensor | None = None
    noised: torch.Tensor | None = None
    unet_calls: list = field(default_factory=list)     # (x, t, encoder_hidden_states, raw output) per UNet call
    steps: list = field(default_factory=list)          # (timestep, latents after the step) per step
    decoded: torch.Tensor | None = None                # (B, 3, H, W) in [0, 1]
    final_latents: torch.Tensor | None = None


@contextlib.contextmanager
def _network_hooks(pipe, rec: _Records):
    """Forward hooks on the text encoder, the DPT and the UNet (both pipelines name them alike): their inputs and
    raw outputs, which no event of ours and no callback of diffusers carries."""
    def text(module, args, kwargs, out):
        rec.token_ids.append(_keep(args[0] if args else kwargs["input_ids"]))

    def depth(module, args, kwargs, out):
        rec.depth_pixels = _keep(args[0] if args else kwargs["pixel_values"])
        rec.depth_estimate = _keep(_output(out))

    def unet(module, args, kwargs, out):
        x = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        rec.unet_calls.append((_keep(x), _keep(t), _keep(kwargs["encoder_hidden_states"]), _keep(_output(out))))

    handles = [getattr(pipe, name).register_forward_hook(hook, with_kwargs=True)
               for name, hook in (("text_encoder", text), ("depth_estimator", depth), ("unet", unet))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _call_arguments(s: dict, photo, generator) -> dict:
    """The `__call__` arguments both pipelines get (diffusers' names, which ours shares)."""
    return {"prompt": s["prompt"], "image": photo, "strength": s["strength"], "num_inference_steps": s["steps"],
            "guidance_scale": s["guidance_scale"], "negative_prompt": s["negative_prompt"], "eta": s["eta"],
            "generator": generator, "output_type": "pt"}


# ------------------------------------------------------------------------------------------------ minidepth
class _Recorder(Observer):
    """Our pipeline's events, kept in `rec`."""

    def __init__(self, rec: _Records):
        self.rec = rec

    def prompt_encoded(self, pipe, *, prompt_embeds, negative_prompt_embeds, **data):
        both = prompt_embeds if negative_prompt_embeds is None else torch.cat([negative_prompt_embeds, prompt_embeds])
        self.rec.text_embeddings = _keep(both)

    def depth_ready(self, pipe, *, depth_mask, **data):
        self.rec.depth_channel = _keep(depth_mask)

    def image_ready(self, pipe, *, image, **data):
        self.rec.image = _keep(image)

    def latents_ready(self, pipe, *, image_latents, noise, latents, **data):
        self.rec.posterior, self.rec.noise, self.rec.noised = _keep(image_latents), _keep(noise), _keep(latents)

    def step_done(self, pipe, *, timestep, latents, **data):
        self.rec.steps.append((_keep(timestep), _keep(latents)))

    def decoded(self, pipe, *, images, latents, **data):
        self.rec.decoded, self.rec.final_latents = _keep(images), _keep(latents)


@torch.no_grad()
def trace_minidepth(pipe, photo, s: dict, generator) -> Trace:
    """Run our `pipe(...)` (its `__call__`, as a user would) with an observer and hooks recording every stage."""
    rec = _Records()
    with pipe.observing(_Recorder(rec)), _network_hooks(pipe, rec):
        pipe(**_call_arguments(s, photo, generator))
    return _assemble(rec, pipe.vae.config.scaling_factor, s)


# ------------------------------------------------------------------------------------------------ diffusers
def _recording_scheduler(scheduler, rec: _Records):
    """A new scheduler of a subclass of `scheduler`'s class, from the same config, whose `add_noise` records the
    scaled posterior sample, the img2img noise and the noised latents (diffusers' `prepare_latents` calls it once)."""
    class RecordingScheduler(type(scheduler)):
        def add_noise(self, original_samples, noise, timesteps):
            noised = super().add_noise(original_samples, noise, timesteps)
            rec.posterior, rec.noise, rec.noised = _keep(original_samples), _keep(noise), _keep(noised)
            return noised
    return RecordingScheduler.from_config(scheduler.config)


def _recording_image_processor(processor, rec: _Records):
    """A new image processor of a subclass of `processor`'s class, from the same config, whose `preprocess` records
    the image tensor it returns."""
    class RecordingImageProcessor(type(processor)):
        def preprocess(self, *args, **kwargs):
            image = super().preprocess(*args, **kwargs)
            rec.image = _keep(image)
            return image
    return RecordingImageProcessor.from_config(processor.config)


@contextlib.contextmanager
def _recording_parts(pipe, rec: _Records):
    """Give `pipe` the recording scheduler and image processor for the block; its own ones back after."""
    saved = pipe.scheduler, pipe.image_processor
    pipe.scheduler = _recording_scheduler(pipe.scheduler, rec)
    pipe.image_processor = _recording_image_processor(pipe.image_processor, rec)
    try:
        yield
    finally:
        pipe.scheduler, pipe.image_processor = saved


@torch.no_grad()
def trace_diffusers(pipe, photo, s: dict, generator) -> Trace:
    """Run diffusers' `StableDiffusionDepth2ImgPipeline.__call__` with a step-end callback, hooks and the recording
    scheduler and image processor (see the module docstring)."""
    rec = _Records()

    def step_end(pipe_, i, t, tensors):
        if i == 0:  # the embeddings and depth channel the loop runs on ([negative; prompt] with guidance)
            rec.text_embeddings, rec.depth_channel = _keep(tensors["prompt_embeds"]), _keep(tensors["depth_mask"])
        rec.steps.append((_keep(t), _keep(tensors["latents"])))
        return {}  # change nothing

    with _recording_parts(pipe, rec), _network_hooks(pipe, rec), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "In CPU autocast")  # its autocast(cpu, float32) is a no-op, with a warning
        images = pipe(**_call_arguments(s, photo, generator), callback_on_step_end=step_end,
                      callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "depth_mask"]).images
    rec.decoded = _keep(images)
    rec.final_latents = rec.steps[-1][1] if rec.steps else rec.noised
    return _assemble(rec, pipe.vae.config.scaling_factor, s)


# ------------------------------------------------------------------------------------------------ the stages
def _assemble(rec: _Records, scaling_factor: float, s: dict) -> Trace:
    """The stages in the order of the pipelines' `__call__`, with the network behind each and how to rerun it."""
    from ..depth import _autocast
    trace = Trace()
    for name, ids in zip(["tokens (prompt)", "tokens (negative prompt)"], rec.token_ids):
        trace.add(name, ids)
    trace.add("text embeddings", rec.text_embeddings, "text_encoder",
              lambda net: net(torch.cat(rec.token_ids)))  # every text the encoder saw, in one batch

    pixels = rec.depth_pixels

    def rerun_depth(net):  # under the pipelines' autocast for half precision
        with _autocast(torch.device(s["device"]), DTYPES[s["dtype"]]):
            net(pixels)
    trace.add("depth input (pixel values)", pixels)
    trace.add("depth estimate (DPT)", rec.depth_estimate, "depth_estimator", rerun_depth)
    trace.add("depth channel", rec.depth_channel)

    trace.add("image tensor", rec.image)
    trace.add("posterior sample (scaled)", rec.posterior, "vae",  # the image as prepare_latents gives it to the VAE
              lambda net: net.encode(rec.image.to(rec.posterior.device, rec.posterior.dtype)))
    trace.add("img2img noise", rec.noise)
    trace.add("noised latents", rec.noised)

    n = len(rec.steps)
    for i, ((t, latents), (x, t_in, c, out)) in enumerate(zip(rec.steps, rec.unet_calls)):
        tag = f"step {i + 1}/{n} (t={int(t)})"
        trace.add(f"{tag} unet", out, "unet", lambda net, x=x, t=t_in, c=c: net(x, t, encoder_hidden_states=c))
        trace.add(f"{tag} latents", latents)

    final = rec.final_latents
    trace.add("image", rec.decoded, "vae", lambda net: net.decode(final / scaling_factor))
    return trace
