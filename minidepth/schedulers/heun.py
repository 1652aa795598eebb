"""Heun's second-order sampler in sigma (Karras et al. 2022, https://arxiv.org/abs/2206.00364, Algorithm 1).

Each step sigma_i -> sigma_{i+1} costs two model evaluations, so `timesteps` lists every timestep but the first twice
and `order` = 2:
    d_i  = (x_i - x0(x_i, sigma_i)) / sigma_i,                 x'      = x_i + (sigma_{i+1} - sigma_i) d_i   (Euler)
    d'   = (x' - x0(x', sigma_{i+1})) / sigma_{i+1},           x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (d_i + d') / 2
The last step, to sigma = 0, still runs both stages (diffusers; Karras et al. skip the correction there).
"""

import numpy as np
import torch

from .common import BETA_SCHEDULES, SPACINGS, SchedulerOutput
from .families import SigmaScheduler
from .maths import PREDICTION_TYPES, to_d, x0_from_model_output


def repeat_inner(x: torch.Tensor, keep_last: bool = True) -> torch.Tensor:
    """[a, b, c, d] -> [a, b, b, c, c, d] (keep_last) or [a, b, b, c, c, d, d]: every inner entry twice."""
    inner = x[1:-1] if keep_last else x[1:]
    return torch.cat([x[:1], inner.repeat_interleave(2), x[-1:]])


class HeunDiscreteScheduler(SigmaScheduler):
    """Heun sampler, step-for-step equal to diffusers' `HeunDiscreteScheduler`."""

    defaults = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                    trained_betas=None, prediction_type="epsilon", use_karras_sigmas=False,
                    use_exponential_sigmas=False, use_beta_sigmas=False, clip_sample=False, clip_sample_range=1.0,
                    timestep_spacing="linspace", steps_offset=0)
    choices = dict(beta_schedule=BETA_SCHEDULES + ("exp",), prediction_type=PREDICTION_TYPES, timestep_spacing=SPACINGS)
    unsupported = dict(use_beta_sigmas=False)  # needs scipy.stats
    order = 2

    def __init__(self, **config):
        super().__init__(**config)
        self._reset()

    def _reset(self):
        self.prev_derivative = None  # d_i, kept between the two stages
        self.dt = None  # sigma_{i+1} - sigma_i; None means "next call is the first stage"
        self.sample = None  # x_i
        self._step_index = None
        self._begin_index = None

    @property
    def state_in_first_order(self) -> bool:
        return self.dt is None

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        n = self._check_num_steps(num_inference_steps)
        self.num_inference_steps = n
        timesteps, sigmas, _ = self._sigma_schedule(n)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.sigmas = repeat_inner(sigmas)  # sigma_0, sigma_1, sigma_1, ..., sigma_{n-1}, sigma_{n-1}, 0
        timesteps = torch.from_numpy(np.asarray(timesteps))
        self.timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)]).to(device, torch.float32)
        self._reset()

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        self._begin_step(timestep)
        first = self.state_in_first_order
        if first:
            sigma, sigma_next = self.sigmas[self._step_index], self.sigmas[self._step_index + 1]
        else:
            sigma, sigma_next = self.sigmas[self._step_index - 1], self.sigmas[self._step_index]
        sigma_input = sigma if first else sigma_next  # the noise level of the sample the model saw
        # 1. predicted x_0
        x0 = x0_from_model_output(sample, model_output, sigma_input, self.config.prediction_type)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        if first:
            # 2a. Euler stage: d_i and x' (Algorithm 1, lines 3-5)
            derivative = to_d(sample, x0, sigma)
            dt = sigma_next - sigma
            self.prev_derivative, self.dt, self.sample = derivative, dt, sample
        else:
            # 2b. correction: average the two slopes, step again from x_i (Algorithm 1, lines 7-8)
            derivative = (self.prev_derivative + to_d(sample, x0, sigma_next)) / 2
            dt, sample = self.dt, self.sample
            self.prev_derivative, self.dt, self.sample = None, None, None
        prev_sample = sample + derivative * dt
        self._step_index += 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
