"""PNDM / PLMS: pseudo numerical methods for diffusion models (Liu et al. 2022, https://arxiv.org/abs/2202.09778).
Stable Diffusion 2 depth's default scheduler (PLMS only: `skip_prk_steps=True`).

The "transfer" from x_t to x_t' with a noise estimate e (eq. (9), a = alpha_bar):
    x_t' = sqrt(a_t'/a_t) x_t - (a_t' - a_t) e / (a_t sqrt(1 - a_t') + sqrt(a_t (1 - a_t) a_t'))
PLMS feeds it a linear multistep (Adams-Bashforth) combination of the last noise estimates (eq. (12)):
    e' = (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24   (lower orders while fewer are known);
PRK (eq. (13)) instead runs 4 evaluations per step, Runge-Kutta style, for the first 3 steps.

Timestep quirk kept from diffusers: the PLMS schedule has N + 1 entries with the SECOND one duplicated
(N = 50: 981, 961, 961, 941, ...). The first two evaluations form one improved-Euler (Heun) step from the first
timestep: the second evaluation's output is averaged with the first and the step from the first sample is redone.
Which of those happens is decided by a call counter, so an img2img loop that starts mid-schedule still runs
"first step, then the averaged redo" on its own first two calls.
"""

import numpy as np
import torch

from .common import BETA_SCHEDULES, SPACINGS, Scheduler, SchedulerOutput
from .maths import eps_from_model_output_vp


class PNDMScheduler(Scheduler):
    """PLMS (and the optional PRK warm-up), step-for-step equal to diffusers' `PNDMScheduler`."""

    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, skip_prk_steps=False, set_alpha_to_one=False, prediction_type="epsilon",
                    timestep_spacing="leading", steps_offset=0)
    # diffusers accepts "sample" at construction and raises in step(); we refuse it up front
    choices = dict(beta_schedule=BETA_SCHEDULES, prediction_type=("epsilon", "v_prediction"), timestep_spacing=SPACINGS)
    pndm_order = 4

    def __init__(self, **config):
        super().__init__(**config)
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self._reset()

    def _reset(self):
        self.counter = 0  # scheduler calls so far: selects PRK stage / PLMS warm-up
        self.ets = []  # past noise estimates, newest last
        self.cur_model_output = 0  # PRK: weighted sum of the stage outputs
        self.cur_sample = None  # sample at the start of the current (PRK or first PLMS) step

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        n = self._check_num_steps(num_inference_steps)
        c = self.config
        self.num_inference_steps = n
        ascending = self._spaced_timesteps(n)[::-1].round().astype(np.int64)
        if c.skip_prk_steps:
            # PLMS: the second timestep twice (see the module docstring)
            self.prk_timesteps = np.array([], dtype=np.int64)
            self.plms_timesteps = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1].copy()
        else:
            if n < self.pndm_order:
                raise ValueError(f"num_inference_steps must be >= {self.pndm_order} with skip_prk_steps=False, got {n}")
            # PRK: the last 4 timesteps, each with its half-step midpoint, laid out as RK stages t, t-h/2, t-h/2, t-h
            half = c.num_train_timesteps // n // 2
            with_midpoints = ascending[-self.pndm_order:].repeat(2) + np.tile(np.array([0, half]), self.pndm_order)
            self.prk_timesteps = with_midpoints[:-1].repeat(2)[1:-1][::-1].copy()
            self.plms_timesteps = ascending[:-3][::-1].copy()
        timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self._reset()

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        self._require_timesteps()
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            prev_sample = self._step_prk(model_output, timestep, sample)
        else:
            prev_sample = self._step_plms(model_output, timestep, sample)
        self.counter += 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def _step_prk(self, model_output, timestep, sample):
        """Pseudo Runge-Kutta (eq. (13)): stages weighted 1/6, 1/3, 1/3, 1/6, each transferred from the step's start."""
        step_size = self.config.num_train_timesteps // self.num_inference_steps
        prev_timestep = timestep - (0 if self.counter % 2 else step_size // 2)
        timestep = self.prk_timesteps[self.counter // 4 * 4]
        stage = self.counter % 4
        if stage == 0:
            self.cur_model_output += 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif stage in (1, 2):
            self.cur_model_output += 1 / 3 * model_output
        else:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0
        start = self.cur_sample if self.cur_sample is not None else sample
        return self._transfer(start, timestep, prev_timestep, model_output)

    def _step_plms(self, model_output, timestep, sample):
        """Pseudo linear multistep (eq. (12)); the first two calls form one improved-Euler step."""
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError("PNDMScheduler with skip_prk_steps=False must run its 12 PRK calls before PLMS")
        step_size = self.config.num_train_timesteps // self.num_inference_steps
        prev_timestep = timestep - step_size
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:  # the redo of the first step: from (timestep + step size) to timestep
            prev_timestep, timestep = timestep, timestep + step_size
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:  # 1. Euler step, remember where it started
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:  # 2. average the two estimates, redo from the start
            model_output = (model_output + ets[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        return self._transfer(sample, timestep, prev_timestep, model_output)

    def _transfer(self, sample, timestep, prev_timestep, model_output):
        """eq. (9): x_t -> x_t' given the noise estimate (a v-prediction is converted to eps first)."""
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
        model_output = eps_from_model_output_vp(sample, model_output, alpha_prod_t**0.5, beta_prod_t**0.5,
                                                self.config.prediction_type)
        sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** (0.5)
        denominator = (alpha_prod_t * beta_prod_t_prev ** (0.5)
                       + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev) ** (0.5))
        return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / denominator
