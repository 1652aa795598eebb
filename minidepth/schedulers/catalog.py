"""All schedulers by class name, and building one from a scheduler_config.json dict."""

from collections.abc import Mapping

from .common import Scheduler, SchedulerConfig, SchedulerOutput, randn_tensor
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .deis import DEISMultistepScheduler
from .dpmsolver import DPMSolverMultistepScheduler
from .dpmsolver_singlestep import DPMSolverSinglestepScheduler
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from .heun import HeunDiscreteScheduler
from .kdpm2 import KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler
from .lms import LMSDiscreteScheduler
from .pndm import PNDMScheduler
from .unipc import UniPCMultistepScheduler

SCHEDULERS: dict[str, type[Scheduler]] = {cls.__name__: cls for cls in (
    DDIMScheduler, DDPMScheduler, PNDMScheduler, LMSDiscreteScheduler, EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler, HeunDiscreteScheduler, KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler,
    DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, DEISMultistepScheduler, UniPCMultistepScheduler)}


def scheduler_from_config(config: Mapping) -> Scheduler:
    """Build the scheduler named by the config's `_class_name` (a scheduler_config.json dict)."""
    name = config.get("_class_name") if isinstance(config, Mapping) else None
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler config _class_name={name!r} is not supported; accepted: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(config)


__all__ = ["SCHEDULERS", "Scheduler", "SchedulerConfig", "SchedulerOutput", "randn_tensor", "scheduler_from_config",
           *SCHEDULERS]
