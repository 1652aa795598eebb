"""Sampler names people type: our short names (`minidepth generate --scheduler dpm++2m-karras`), the class and config
overrides each stands for, AUTOMATIC1111's name for it (written into PNG settings), and a one-line description.

No torch here (the command line checks a name before anything is loaded); `scheduler_by_name` builds one.
"""

from __future__ import annotations

from collections.abc import Mapping

# name -> (class in minidepth.schedulers, config overrides, AUTOMATIC1111's sampler name, description).
# A pipeline keeps the checkpoint's own (PNDM) when no name is given.
SCHEDULER_TABLE = {
    "ddim": ("DDIMScheduler", {}, "DDIM", "DDIM (Song et al. 2021): deterministic, good in 20-50 steps; --eta > 0 "
                                           "adds fresh noise each step"),
    "ddpm": ("DDPMScheduler", {}, "DDPM", "DDPM (Ho et al. 2020): the original ancestral sampler; stochastic, needs "
                                           "many steps (hundreds)"),
    "pndm": ("PNDMScheduler", {}, "PLMS", "PNDM/PLMS (Liu et al. 2022): linear multistep, deterministic; the "
                                           "checkpoint's default"),
    "lms": ("LMSDiscreteScheduler", {}, "LMS", "LMS (k-diffusion): linear multistep in sigma, deterministic"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler", "Euler (Karras et al. 2022): first order, deterministic, simple "
                                                     "and robust"),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, "Euler a", "Euler ancestral: adds noise each step, so images "
                                                                  "keep changing with more steps; good in 20-30"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun", "Heun (Karras et al. 2022): second order, two UNet calls per step"),
    "dpm2": ("KDPM2DiscreteScheduler", {}, "DPM2", "DPM-Solver-2 in sigma: second order, two UNet calls per step"),
    "dpm2-a": ("KDPM2AncestralDiscreteScheduler", {}, "DPM2 a", "DPM2 ancestral: second order, stochastic"),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}, "DPM++ 2M", "DPM-Solver++ 2M (Lu et al. 2022): multistep, "
                                                                "deterministic, good in 15-25 steps"),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M Karras",
                       "DPM++ 2M with Karras sigmas: the popular 20-step choice"),
    "dpm-singlestep": ("DPMSolverSinglestepScheduler", {}, "DPM++ 2S", "DPM-Solver++ singlestep (2S): deterministic, "
                                                                      "restarts each block from one sample"),
    "deis": ("DEISMultistepScheduler", {}, "DEIS", "DEIS (Zhang & Chen 2022): exponential-integrator multistep, "
                                                   "deterministic"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC", "UniPC (Zhao et al. 2023): predictor-corrector, good in 10-20 "
                                                      "steps"),
}
SCHEDULERS = {name: (cls, overrides) for name, (cls, overrides, _, _) in SCHEDULER_TABLE.items()}
A1111_NAMES = {name: row[2] for name, row in SCHEDULER_TABLE.items()}


def scheduler_by_name(name: str | None, base_config: Mapping):
    """A fresh scheduler: `name` from SCHEDULER_TABLE with the checkpoint's `base_config` (its noise schedule), or the
    checkpoint's own class (`base_config["_class_name"]`) when `name` is None. ValueError for an unknown name."""
    from . import catalog
    if name is None:
        return catalog.scheduler_from_config(base_config)
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; accepted: {', '.join(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[name]
    return catalog.SCHEDULERS[cls].from_config({**dict(base_config), **overrides})


def name_of(scheduler) -> str | None:
    """The short name of a scheduler object whose class has one without overrides (e.g. PNDMScheduler -> "pndm")."""
    return next((k for k, (cls, overrides) in SCHEDULERS.items()
                 if cls == type(scheduler).__name__ and not overrides), None)


def a1111_name(name: str | None, scheduler) -> str:
    """AUTOMATIC1111's sampler name for the chosen `name`, or for the scheduler's class; else the class name."""
    return A1111_NAMES.get(name or name_of(scheduler), type(scheduler).__name__)
