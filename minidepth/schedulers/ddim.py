"""DDIM: denoising diffusion implicit models (Song et al. 2021, https://arxiv.org/abs/2010.02502).

One step from t to the previous inference timestep t' (eq. (12)), with a_t = alpha_bar_t:
    x_0  = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    x_t' = sqrt(a_t') x_0 + sqrt(1 - a_t' - s_t^2) eps + s_t z,   s_t = eta sqrt((1 - a_t')/(1 - a_t) (1 - a_t/a_t'))
eta = 0 is deterministic DDIM, eta = 1 is DDPM-like ancestral sampling (eq. (16)).
"""

import numpy as np
import torch

from .common import BETA_SCHEDULES, SPACINGS, Scheduler, SchedulerOutput, dynamic_threshold, randn_tensor
from .maths import PREDICTION_TYPES, eps_from_model_output_vp, eps_from_x0, x0_from_model_output_vp


class DDIMScheduler(Scheduler):
    """DDIM sampler, step-for-step equal to diffusers' `DDIMScheduler`.

    Quirk kept: the previous timestep is always t - T // N (the "leading" gap), whatever `timestep_spacing` is.
    """

    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                    prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
                    clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading",
                    rescale_betas_zero_snr=False)
    choices = dict(beta_schedule=BETA_SCHEDULES, prediction_type=PREDICTION_TYPES, timestep_spacing=SPACINGS)

    def __init__(self, **config):
        super().__init__(**config)
        # alpha_bar "before" the first training step: 1, or alpha_bar_0 (SD's configs use set_alpha_to_one=False)
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        n = self._check_num_steps(num_inference_steps)
        self.num_inference_steps = n
        self.timesteps = torch.from_numpy(self._spaced_timesteps(n).round().astype(np.int64)).to(device)

    def _variance(self, timestep, prev_timestep) -> torch.Tensor:
        """(1 - a_t')/(1 - a_t) * (1 - a_t / a_t'): the DDPM posterior variance between t and t' (eq. (16) / eta^2)."""
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        return ((1 - alpha_prod_t_prev) / (1 - alpha_prod_t)) * (1 - alpha_prod_t / alpha_prod_t_prev)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise=None, return_dict: bool = True):
        self._require_timesteps()
        c = self.config
        # 1. previous timestep t' (always the "leading" gap, as diffusers)
        prev_timestep = timestep - c.num_train_timesteps // self.num_inference_steps
        # 2. a_t and a_t'
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        # 3. predicted x_0 and eps ("predicted x_0" of eq. (12)); alpha_t = sqrt(a_t), sigma_t = sqrt(1 - a_t)
        alpha_t, sigma_t = alpha_prod_t**0.5, beta_prod_t**0.5
        x0 = x0_from_model_output_vp(sample, model_output, alpha_t, sigma_t, c.prediction_type)
        eps = eps_from_model_output_vp(sample, model_output, alpha_t, sigma_t, c.prediction_type)
        # 4. optional clipping of x_0
        if c.thresholding:
            x0 = dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        elif c.clip_sample:
            x0 = x0.clamp(-c.clip_sample_range, c.clip_sample_range)
        # 5. sigma_t(eta), eq. (16)
        std_dev_t = eta * self._variance(timestep, prev_timestep) ** (0.5)
        if use_clipped_model_output:  # eps re-derived from the clipped x_0
            eps = eps_from_x0(sample, x0, alpha_t, sigma_t)
        # 6. "direction pointing to x_t" and 7. x_t' without noise, eq. (12)
        direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * eps
        prev_sample = alpha_prod_t_prev ** (0.5) * x0 + direction
        # 8. random noise s_t z
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise to DDIMScheduler.step, not both")
            if variance_noise is None:
                variance_noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                              dtype=model_output.dtype)
            prev_sample = prev_sample + std_dev_t * variance_noise
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
