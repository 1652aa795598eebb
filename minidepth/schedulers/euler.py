"""Euler and Euler-ancestral sampling in sigma (Karras et al. 2022, https://arxiv.org/abs/2206.00364).

Euler, Algorithm 2 of Karras et al. without the Heun correction (churn s_churn = 0 by default):
    sigma_hat = sigma_i (1 + gamma),  x_hat = x_i + sqrt(sigma_hat^2 - sigma_i^2) z      (only when gamma > 0)
    d = (x_hat - x0) / sigma_hat,     x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) d
Euler ancestral (k-diffusion's `sample_euler_ancestral`): step deterministically down to sigma_down, then add fresh
noise of std sigma_up, where sigma_up^2 = sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2 and
sigma_down^2 = sigma_{i+1}^2 - sigma_up^2, so the marginal std at sigma_{i+1} is right.
"""

import numpy as np
import torch

from .common import BETA_SCHEDULES, SPACINGS, SchedulerOutput, randn_tensor, train_sigmas
from .families import SigmaScheduler
from .maths import PREDICTION_TYPES, ancestral_step, to_d, x0_from_model_output


def _reject_integer_timestep(timestep, name):
    if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
        raise ValueError(f"{name}.step: pass a value from scheduler.timesteps as `timestep`, not an integer index "
                         f"(got {timestep!r})")


class EulerDiscreteScheduler(SigmaScheduler):
    """Euler sampler, step-for-step equal to diffusers' `EulerDiscreteScheduler`."""

    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, prediction_type="epsilon", interpolation_type="linear",
                    use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, sigma_min=None,
                    sigma_max=None, timestep_spacing="linspace", timestep_type="discrete", steps_offset=0,
                    rescale_betas_zero_snr=False, final_sigmas_type="zero")
    choices = dict(beta_schedule=BETA_SCHEDULES, prediction_type=PREDICTION_TYPES, timestep_spacing=SPACINGS,
                   interpolation_type=("linear", "log_linear"), timestep_type=("discrete", "continuous"),
                   final_sigmas_type=("zero", "sigma_min"))
    unsupported = dict(use_beta_sigmas=False)  # needs scipy.stats

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        n = self._check_num_steps(num_inference_steps)
        c = self.config
        self.num_inference_steps = n
        timesteps, sigmas, _ = self._sigma_schedule(n, log_linear=c.interpolation_type == "log_linear")
        if c.final_sigmas_type == "sigma_min":  # the smallest training sigma instead of 0
            sigma_last = train_sigmas(self.alphas_cumprod[0])
        else:
            sigma_last = 0
        sigmas = torch.from_numpy(np.concatenate([sigmas, [sigma_last]]).astype(np.float32))
        if c.timestep_type == "continuous" and c.prediction_type == "v_prediction":
            self.timesteps = torch.Tensor([0.25 * s.log() for s in sigmas[:-1]]).to(device=device)  # EDM c_noise
        else:
            self.timesteps = torch.from_numpy(np.asarray(timesteps).astype(np.float32)).to(device=device)
        self.sigmas = sigmas
        self._step_index = None
        self._begin_index = None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True):
        _reject_integer_timestep(timestep, type(self).__name__)
        self._begin_step(timestep)
        sample = sample.to(torch.float32)
        sigma = self.sigmas[self._step_index]
        # 1. churn: raise the noise level to sigma_hat by adding fresh noise (Algorithm 2, lines 4-6)
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                                 generator=generator)
            sample = sample + noise * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
        # 2. predicted x_0 (v-prediction uses sigma, not sigma_hat, as diffusers)
        x0 = x0_from_model_output(sample, model_output, sigma_hat, self.config.prediction_type, v_sigma=sigma)
        # 3. Euler step on dx/dsigma = (x - x_0) / sigma (Algorithm 2, lines 7-8)
        derivative = to_d(sample, x0, sigma_hat)
        dt = self.sigmas[self._step_index + 1] - sigma_hat
        prev_sample = (sample + derivative * dt).to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    """Euler ancestral sampler, step-for-step equal to diffusers' `EulerAncestralDiscreteScheduler`."""

    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0,
                    rescale_betas_zero_snr=False)
    # diffusers accepts "sample" at construction and raises NotImplementedError in step(); we refuse it up front
    choices = dict(beta_schedule=BETA_SCHEDULES, prediction_type=("epsilon", "v_prediction"), timestep_spacing=SPACINGS)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        n = self._check_num_steps(num_inference_steps)
        self.num_inference_steps = n
        timesteps, sigmas, _ = self._sigma_schedule(n)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps).to(device=device)
        self._step_index = None
        self._begin_index = None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        _reject_integer_timestep(timestep, type(self).__name__)
        self._begin_step(timestep)
        sigma = self.sigmas[self._step_index]
        sample = sample.to(torch.float32)
        # 1. predicted x_0
        x0 = x0_from_model_output(sample, model_output, sigma, self.config.prediction_type)
        # 2. split the step into a deterministic part (to sigma_down) and fresh noise (sigma_up)
        sigma_up, sigma_down = ancestral_step(sigma, self.sigmas[self._step_index + 1])
        # 3. Euler step to sigma_down, then add sigma_up z
        derivative = to_d(sample, x0, sigma)
        prev_sample = sample + derivative * (sigma_down - sigma)
        noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                             generator=generator)
        prev_sample = (prev_sample + noise * sigma_up).to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
