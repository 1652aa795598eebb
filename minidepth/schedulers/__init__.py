"""Noise schedulers with diffusers' class names, config format and step-for-step numbers (diffusers 0.42.1).

    scheduler = PNDMScheduler.from_config(json.load(open("scheduler/scheduler_config.json")))
    scheduler = DPMSolverMultistepScheduler.from_config(scheduler.config)   # switch sampler, keep the noise schedule
    scheduler.set_timesteps(50)
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x).prev_sample

    catalog.py   every scheduler class by name, `scheduler_from_config`
    names.py     the names people type (`--scheduler dpm++2m-karras`, AUTOMATIC1111's "DPM++ 2M Karras"); no torch
    common.py    betas, sigmas, timestep spacing, the config; one file per family (ddim.py, euler.py, ...)

The public names are imported on first use, so `minidepth.schedulers.names` loads without torch.
"""

import importlib

_EXPORTS = {name: ".catalog" for name in (
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler", "SCHEDULERS", "scheduler_from_config", "Scheduler",
    "SchedulerConfig", "SchedulerOutput", "randn_tensor")}
_EXPORTS.update(dict.fromkeys(("SCHEDULER_TABLE", "A1111_NAMES", "scheduler_by_name"), ".names"))
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'minidepth.schedulers' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_EXPORTS})
