"""DPM-Solver / DPM-Solver++ multistep (Lu et al. 2022a, https://arxiv.org/abs/2206.00927; Lu et al. 2022b,
https://arxiv.org/abs/2211.01095), including the SDE variants. "DPM++ 2M" is the default (order 2, dpmsolver++).

The diffusion ODE is solved exactly in its linear part, in half-log-SNR lambda = log(alpha / sigma). For a step from
s to t (h = lambda_t - lambda_s) with the model's current prediction D0 and finite differences D1, D2 of earlier ones:
    dpmsolver++ (data prediction, Lu et al. 2022b; 2M = Algorithm 2):
        x_t = sigma_t/sigma_s x_s - alpha_t (e^-h - 1) D0 + ...
    dpmsolver (noise prediction, Lu et al. 2022a; first order = DDIM):
        x_t = alpha_t/alpha_s x_s - sigma_t (e^h - 1) eps + ...
    sde-dpmsolver++ (the SDE solver of Lu et al. 2022b):
        x_t = sigma_t/sigma_s e^-h x_s + alpha_t (1 - e^-2h) D0 + ... + sigma_t sqrt(1 - e^-2h) z
The higher-order terms use D1 with the "midpoint" (1/2 phi_1) or "heun" (phi_2) weights and, at order 3, D2; the
weights and the update itself are maths.dpm_solver_coefficients and maths.dpm_solver_update.
"""

import numpy as np
import torch

from .common import BETA_SCHEDULES, SPACINGS, SchedulerOutput, dynamic_threshold, randn_tensor, sigma_to_t, train_sigmas
from .families import VPSolverScheduler
from .maths import (PREDICTION_TYPES, dpm_solver_coefficients, dpm_solver_update, eps_from_x0, half_log_snr,
                    vp_alpha_sigma, x0_from_eps)

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")


class DPMSolverMultistepScheduler(VPSolverScheduler):
    """Multistep DPM-Solver(++), step-for-step equal to diffusers' `DPMSolverMultistepScheduler`."""

    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, solver_order=2, prediction_type="epsilon", thresholding=False,
                    dynamic_thresholding_ratio=0.995, sample_max_value=1.0, algorithm_type="dpmsolver++",
                    solver_type="midpoint", lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
                    use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False,
                    flow_shift=1.0, final_sigmas_type="zero", lambda_min_clipped=-float("inf"), variance_type=None,
                    timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False,
                    use_dynamic_shifting=False, time_shift_type="exponential")
    choices = dict(beta_schedule=BETA_SCHEDULES, prediction_type=PREDICTION_TYPES, algorithm_type=ALGORITHMS,
                   solver_type=("midpoint", "heun"), final_sigmas_type=("zero", "sigma_min"), solver_order=(1, 2, 3),
                   timestep_spacing=SPACINGS, variance_type=(None, "learned", "learned_range"))
    # diffusers silently maps these older names (the config then shows the new value)
    aliases = dict(algorithm_type={"deis": "dpmsolver++"}, solver_type={"logrho": "midpoint", "bh1": "midpoint",
                                                                        "bh2": "midpoint"})
    unsupported = dict(use_beta_sigmas=False, use_flow_sigmas=False, use_dynamic_shifting=False)

    def _check_config(self):
        super()._check_config()
        c = self.config
        if c.algorithm_type in ("dpmsolver", "sde-dpmsolver") and c.final_sigmas_type == "zero":
            raise ValueError(f"{type(self).__name__}: final_sigmas_type='zero' is not supported with algorithm_type="
                             f"{c.algorithm_type!r}; use final_sigmas_type='sigma_min'")
        if c.algorithm_type == "sde-dpmsolver" and c.get("solver_order") == 3:
            raise ValueError(f"{type(self).__name__}: algorithm_type='sde-dpmsolver' has no order-3 solver; "
                             "use solver_order 1 or 2")

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        n = self._check_num_steps(num_inference_steps)
        c = self.config
        # drop the noisiest timesteps whose lambda is below lambda_min_clipped (for cosine schedules)
        clipped_idx = torch.searchsorted(torch.flip(self.lambda_t, [0]), c.lambda_min_clipped)
        last = (c.num_train_timesteps - clipped_idx).numpy().item()
        timesteps = self._spaced_timesteps(n, solver_grid=True, last=last).astype(np.int64)
        round_karras = c.beta_schedule != "squaredcos_cap_v2"
        if c.use_lu_lambdas and self._sigma_kind() is None:  # evenly spaced in log sigma over the training range
            log_sigmas = np.log(train_sigmas(self.alphas_cumprod).numpy())
            lambdas = np.flip(log_sigmas.copy())
            lo, hi = lambdas[-1].item(), lambdas[0].item()
            sigmas = np.exp(hi + np.linspace(0, 1, n) * (lo - hi))
            timesteps = sigma_to_t(sigmas, log_sigmas)
            timesteps = timesteps.round() if round_karras else timesteps
        else:
            timesteps, sigmas = self._solver_sigmas(timesteps, n, round_karras=round_karras)
        if c.final_sigmas_type == "sigma_min":  # the smallest training sigma instead of 0
            sigma_last = self.train_sigma_min
        else:
            sigma_last = 0
        self._install_schedule(timesteps, sigmas, sigma_last, device)

    def _convert_model_output(self, model_output, sample):
        """The solver's quantity: x_0 (dpmsolver++ types) or eps (dpmsolver types), from any prediction type."""
        c = self.config
        if c.prediction_type == "epsilon" and c.variance_type in ("learned", "learned_range"):
            model_output = model_output[:, :3]  # diffusers keeps the first 3 channels (learned-variance models)
        if c.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            return self._data_prediction(model_output, sample)
        eps = self._noise_prediction(model_output, sample)
        if c.thresholding:  # threshold x_0, then back to eps
            alpha_t, sigma_t = vp_alpha_sigma(self.sigmas[self._step_index])
            x0 = dynamic_threshold(x0_from_eps(sample, eps, alpha_t, sigma_t), c.dynamic_thresholding_ratio,
                                   c.sample_max_value)
            eps = eps_from_x0(sample, x0, alpha_t, sigma_t)
        return eps

    def _update(self, order: int, sample, noise):
        """One multistep update of the given order from the stored model outputs (newest last)."""
        i, m = self._step_index, self.model_outputs
        alpha_t, sigma_t = vp_alpha_sigma(self.sigmas[i + 1])
        alphas_sigmas = [vp_alpha_sigma(self.sigmas[i - k]) for k in range(order)]  # s0, s1, s2
        lambdas = [half_log_snr(a, s) for a, s in alphas_sigmas]
        h = half_log_snr(alpha_t, sigma_t) - lambdas[0]
        coeffs = dpm_solver_coefficients(self.config.algorithm_type, h, alpha_t, sigma_t, *alphas_sigmas[0])
        if order == 1:
            return dpm_solver_update(coeffs, sample, m[-1], noise=noise)
        r0 = (lambdas[0] - lambdas[1]) / h
        d1_0 = (1.0 / r0) * (m[-1] - m[-2])
        if order == 2:  # Lu et al. 2022b, Algorithm 2 (DPM-Solver++(2M))
            d1_weight = "mid" if self.config.solver_type == "midpoint" else "heun"
            return dpm_solver_update(coeffs, sample, m[-1], d1_0, d1_weight=d1_weight, noise=noise)
        r1 = (lambdas[1] - lambdas[2]) / h  # order 3: second differences
        d1_1 = (1.0 / r1) * (m[-2] - m[-3])
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        return dpm_solver_update(coeffs, sample, m[-1], d1, d2, d1_weight="heun", noise=noise)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None, variance_noise=None,
             return_dict: bool = True):
        self._begin_step(timestep)
        c, i, n = self.config, self._step_index, len(self.timesteps)
        # 1. order: warm up from 1, and drop to 1 (2) at the last (second to last) step of short schedules
        last_step_first_order = i == n - 1 and (
            c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero")
        second_last_step_lower = i == n - 2 and c.lower_order_final and n < 15
        # 2. convert and store the model output
        model_output = self._convert_model_output(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [model_output]
        sample = sample.to(torch.float32)
        # 3. SDE noise
        noise = None
        if c.algorithm_type in ("sde-dpmsolver", "sde-dpmsolver++"):
            if variance_noise is None:
                noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                     dtype=torch.float32)
            else:
                noise = variance_noise.to(device=model_output.device, dtype=torch.float32)
        # 4. the update
        order = self._multistep_order(last_step_first_order, second_last_step_lower)
        prev_sample = self._update(order, sample, noise).to(model_output.dtype)
        self.lower_order_nums = min(self.lower_order_nums + 1, c.solver_order)
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)
