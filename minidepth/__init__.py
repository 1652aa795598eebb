"""minidepth: Stable Diffusion 2 depth-to-image in plain, readable PyTorch, at parity with diffusers.

    from minidepth import StableDiffusionDepth2ImgPipeline, DDIMScheduler
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained("sd2-community/stable-diffusion-2-depth")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    image = pipe("a marble statue", image=photo).images[0]

The public names are imported on first use, so `import minidepth` (and `minidepth --help`) does not load torch.
"""

import importlib

__version__ = "0.1.0"

_SCHEDULER_NAMES = (
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler", "SCHEDULERS", "scheduler_from_config")
_EXPORTS = {  # public name -> the module that defines it
    "StableDiffusionDepth2ImgPipeline": ".pipeline", "DepthToImage": ".pipeline", "PipelineOutput": ".pipeline",
    "estimate_depth": ".depth", "prepare_depth_map": ".depth", "save_depth_image": ".depth",
    "load_image": ".image_processing", **dict.fromkeys(_SCHEDULER_NAMES, ".schedulers"),
    "UNet": ".models.unet", "AutoencoderKL": ".models.autoencoder", "CLIPTextModel": ".models.clip_text",
    "DPTDepthModel": ".models.dpt", "DepthAnythingV2": ".models.depth_anything"}
_NETWORKS = ("UNet", "AutoencoderKL", "CLIPTextModel", "DPTDepthModel", "DepthAnythingV2")  # + their loading side
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'minidepth' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    if name in _NETWORKS:  # `UNet.from_pretrained` works once the checkpoint side is imported (models/loadable.py)
        importlib.import_module(".checkpoints", __name__)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_EXPORTS})
