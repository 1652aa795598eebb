"""KDPM2 and KDPM2-ancestral: DPM-Solver-2 in sigma, as in k-diffusion's `sample_dpm_2` / `sample_dpm_2_ancestral`
(Lu et al. 2022, https://arxiv.org/abs/2206.00927, Algorithm 1 with the midpoint in log sigma; Karras et al. 2022).

Each step sigma_i -> sigma_{i+1} costs two model evaluations (`order` = 2); the second is at the geometric midpoint
sigma_mid = sqrt(sigma_i sigma_{i+1}) (KDPM2-ancestral: sqrt(sigma_i sigma_down)):
    d_i   = (x_i - x0(x_i, sigma_i)) / sigma_i,          x_mid   = x_i + (sigma_mid - sigma_i) d_i
    d_mid = (x_mid - x0(x_mid, sigma_mid)) / sigma_mid,  x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_mid
The ancestral variant steps to sigma_down instead of sigma_{i+1} and adds sigma_up z (maths.ancestral_step).
`timesteps` interleaves the midpoints' (fractional) timesteps with the grid's.
"""

import numpy as np
import torch

from .common import BETA_SCHEDULES, SPACINGS, SchedulerOutput, randn_tensor
from .families import SigmaScheduler
from .heun import repeat_inner
from .maths import ancestral_step, log_midpoint, to_d, x0_from_model_output


class KDPM2DiscreteScheduler(SigmaScheduler):
    """DPM-Solver-2 sampler, step-for-step equal to diffusers' `KDPM2DiscreteScheduler`."""

    defaults = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                    trained_betas=None, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                    prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0)
    # diffusers accepts "sample" at construction and raises NotImplementedError in step(); we refuse it up front
    choices = dict(beta_schedule=BETA_SCHEDULES, prediction_type=("epsilon", "v_prediction"), timestep_spacing=SPACINGS)
    unsupported = dict(use_beta_sigmas=False)  # needs scipy.stats
    order = 2
    ancestral = False

    def __init__(self, **config):
        super().__init__(**config)
        self.sample = None  # x_i between the two stages; None means "next call is the first stage"

    @property
    def state_in_first_order(self) -> bool:
        return self.sample is None

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        n = self._check_num_steps(num_inference_steps)
        self.num_inference_steps = n
        timesteps, sigmas, log_sigmas = self._sigma_schedule(n)
        if self.config.use_karras_sigmas:
            timesteps = timesteps.round()
        self.log_sigmas = torch.from_numpy(log_sigmas)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        if self.ancestral:  # sigma_up / sigma_down of each step, the midpoint between sigma_i and sigma_down
            sigmas_next = sigmas.roll(-1)
            sigmas_next[-1] = 0.0
            sigmas_up, sigmas_down = ancestral_step(sigmas, sigmas_next)
            sigmas_down[-1] = 0.0
            sigmas_mid = log_midpoint(sigmas, sigmas_down)
            sigmas_mid[-2:] = 0.0
            self.sigmas_up, self.sigmas_down = repeat_inner(sigmas_up, False), repeat_inner(sigmas_down, False)
        else:  # geometric mean of sigma_{i-1} and sigma_i, stored at i
            sigmas_mid = log_midpoint(sigmas, sigmas.roll(1))
        self.sigmas = repeat_inner(sigmas, keep_last=False)
        self.sigmas_interpol = repeat_inner(sigmas_mid, keep_last=False)
        # timesteps: t_0, then (midpoint timestep, grid timestep) pairs; the midpoints' in float32 like diffusers
        timesteps = torch.from_numpy(np.asarray(timesteps)).to(device)
        mid_t = _float32_sigma_to_t(sigmas_mid, self.log_sigmas)
        mid_t = torch.from_numpy(mid_t).to(device, dtype=timesteps.dtype)
        mid_t = mid_t[:-2] if self.ancestral else mid_t[1:-1]
        pairs = torch.stack((mid_t[:, None], timesteps[1:, None]), dim=-1).flatten()
        self.timesteps = torch.cat([timesteps[:1], pairs])
        self.sample = None
        self._step_index = None
        self._begin_index = None

    def _model_input_sigma(self) -> torch.Tensor:
        if self.state_in_first_order:
            return self.sigmas[self._step_index]
        return self.sigmas_interpol[self._step_index - 1 if self.ancestral else self._step_index]

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        return self._step(model_output, timestep, sample, None, return_dict)

    def _step(self, model_output, timestep, sample, generator, return_dict):
        self._begin_step(timestep)
        i, first = self._step_index, self.state_in_first_order
        if self.ancestral:
            sigma = self.sigmas[i] if first else self.sigmas[i - 1]
            sigma_mid = self.sigmas_interpol[i] if first else self.sigmas_interpol[i - 1]
            sigma_up = self.sigmas_up[i] if first else self.sigmas_up[i - 1]
            sigma_end = self.sigmas_down[i - 1]
        else:
            sigma = self.sigmas[i] if first else self.sigmas[i - 1]
            sigma_mid = self.sigmas_interpol[i + 1] if first else self.sigmas_interpol[i]
            sigma_end = self.sigmas[i + 1] if first else self.sigmas[i]
        sigma_input = sigma if first else sigma_mid  # the noise level of the sample the model saw
        # 1. predicted x_0
        x0 = x0_from_model_output(sample, model_output, sigma_input, self.config.prediction_type)
        if first:
            # 2a. Euler half step to the midpoint
            derivative = to_d(sample, x0, sigma)
            dt = sigma_mid - sigma
            self.sample = sample
        else:
            # 2b. full step from x_i with the midpoint slope
            derivative = to_d(sample, x0, sigma_mid)
            dt = sigma_end - sigma
            sample, self.sample = self.sample, None
        prev_sample = sample + derivative * dt
        if self.ancestral and not first:  # 3. fresh noise after the full step
            noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                                 generator=generator)
            prev_sample = prev_sample + noise * sigma_up
        self._step_index += 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


class KDPM2AncestralDiscreteScheduler(KDPM2DiscreteScheduler):
    """DPM-Solver-2 ancestral sampler, step-for-step equal to diffusers' `KDPM2AncestralDiscreteScheduler`."""

    ancestral = True

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        return self._step(model_output, timestep, sample, generator, return_dict)


def _float32_sigma_to_t(sigmas: torch.Tensor, log_sigmas: torch.Tensor) -> np.ndarray:
    """common.sigma_to_t, but in float32 torch arithmetic (numpy's float32 log) as diffusers ends up computing it
    for the KDPM2 midpoints (its numpy code receives torch tensors there); timesteps then match bit for bit."""
    log_sigma = torch.from_numpy(np.log(np.maximum(sigmas.numpy(), 1e-10)))
    dists = log_sigma[None, :] - log_sigmas[:, None]
    low_idx = torch.from_numpy(np.cumsum(dists.numpy() >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2))
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = ((low - log_sigma) / (low - high)).clamp(0, 1)
    return ((1 - w) * low_idx + w * high_idx).numpy()
