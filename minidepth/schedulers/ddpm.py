"""DDPM: ancestral sampling of denoising diffusion probabilistic models (Ho et al. 2020,
https://arxiv.org/abs/2006.11239), on any subset of the training timesteps.

One step from t to the previous inference timestep t' (a = alpha_bar, a_t|t' = a_t / a_t', b_t|t' = 1 - a_t|t'):
    x_0  = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)                                        eq. (15)
    mean = sqrt(a_t') b_t|t' / (1 - a_t) x_0 + sqrt(a_t|t') (1 - a_t') / (1 - a_t) x_t    eq. (7)
    x_t' = mean + sigma_t z,   sigma_t^2 = (1 - a_t') / (1 - a_t) b_t|t'  ("fixed_small")   eqs. (6)-(7)
"""

import numpy as np
import torch

from .common import BETA_SCHEDULES, SPACINGS, Scheduler, SchedulerOutput, dynamic_threshold, randn_tensor
from .maths import PREDICTION_TYPES, x0_from_model_output_vp

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


class DDPMScheduler(Scheduler):
    """DDPM sampler, step-for-step equal to diffusers' `DDPMScheduler` (noise is added at every step with t > 0)."""

    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, variance_type="fixed_small", clip_sample=True, prediction_type="epsilon",
                    thresholding=False, dynamic_thresholding_ratio=0.995, clip_sample_range=1.0,
                    sample_max_value=1.0, timestep_spacing="leading", steps_offset=0, rescale_betas_zero_snr=False)
    choices = dict(beta_schedule=BETA_SCHEDULES + ("laplace", "sigmoid"), prediction_type=PREDICTION_TYPES,
                   timestep_spacing=SPACINGS, variance_type=VARIANCE_TYPES)

    def __init__(self, **config):
        super().__init__(**config)
        self.one = torch.tensor(1.0)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        n = self._check_num_steps(num_inference_steps)
        self.num_inference_steps = n
        self.timesteps = torch.from_numpy(self._spaced_timesteps(n).round().astype(np.int64)).to(device)

    def previous_timestep(self, timestep):
        """The next entry of `timesteps` (-1 after the last); t - 1 before set_timesteps."""
        if not self.num_inference_steps:
            return timestep - 1
        index = (self.timesteps == timestep).nonzero(as_tuple=True)[0][0]
        return torch.tensor(-1) if index == self.timesteps.shape[0] - 1 else self.timesteps[index + 1]

    def _variance(self, t, predicted_variance=None):
        """The noise term's scale, eqs. (6)-(7), for each `variance_type` (a log-variance for *_log, learned_range)."""
        prev_t = self.previous_timestep(t)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
        variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)
        kind = self.config.variance_type
        if kind == "fixed_small_log":
            return torch.exp(0.5 * torch.log(variance))
        if kind == "fixed_large":
            return current_beta_t
        if kind == "fixed_large_log":
            return torch.log(current_beta_t)
        if kind == "learned":
            return predicted_variance
        if kind == "learned_range":  # Nichol & Dhariwal 2021, eq. (15): interpolate the two log-variances
            frac = (predicted_variance + 1) / 2
            return frac * torch.log(current_beta_t) + (1 - frac) * torch.log(variance)
        return variance

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        c, t = self.config, timestep
        prev_t = self.previous_timestep(t)
        predicted_variance = None
        if model_output.shape[1] == sample.shape[1] * 2 and c.variance_type in ("learned", "learned_range"):
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        # 1. a_t, a_t' and the one-step alpha / beta between them
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        # 2. predicted x_0, eq. (15), with alpha_t = sqrt(a_t), sigma_t = sqrt(1 - a_t)
        x0 = x0_from_model_output_vp(sample, model_output, alpha_prod_t**0.5, beta_prod_t**0.5, c.prediction_type)
        # 3. optional clipping of x_0
        if c.thresholding:
            x0 = dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        elif c.clip_sample:
            x0 = x0.clamp(-c.clip_sample_range, c.clip_sample_range)
        # 4. posterior mean, eq. (7)
        x0_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
        sample_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
        prev_sample = x0_coeff * x0 + sample_coeff * sample
        # 5. add sigma_t z (not at t = 0)
        noise_term = 0
        if t > 0:
            z = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=model_output.dtype)
            if c.variance_type == "fixed_small_log":
                noise_term = self._variance(t, predicted_variance) * z
            elif c.variance_type == "learned_range":
                noise_term = torch.exp(0.5 * self._variance(t, predicted_variance)) * z
            else:
                noise_term = (self._variance(t, predicted_variance) ** 0.5) * z
        prev_sample = prev_sample + noise_term
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
