"""DEIS: diffusion exponential integrator sampler (Zhang & Chen 2022, https://arxiv.org/abs/2204.13902), the
multistep "rho-AB-DEIS" variant with a log-rho polynomial.

In rho = sigma / alpha (the VE noise level), the probability-flow ODE reads d(x / alpha) = eps d rho. A multistep update
extrapolates eps with the Lagrange polynomial through the last 1-3 noise estimates, as a function of log rho, and
integrates it exactly from rho_s to rho_t:
    x_t = alpha_t (x_s / alpha_s + sum_j C_j eps_j),    C_j = integral_{rho_s}^{rho_t} l_j(log rho) d rho
Order 1 is the DDIM step. The closed forms of C_j are `_integral_order2` / `_integral_order3` below.
"""

import numpy as np
import torch

from .common import BETA_SCHEDULES, SPACINGS, SchedulerOutput
from .families import VPSolverScheduler
from .maths import (PREDICTION_TYPES, dpm_solver_coefficients, dpm_solver_update, eps_from_x0, half_log_snr,
                    vp_alpha_sigma)


def _log(x: torch.Tensor) -> torch.Tensor:
    """numpy's float32 log (what diffusers' DEIS uses; torch.log may differ in the last bit)."""
    return torch.tensor(np.log(x.numpy()))


def _integral_order2(t, b, c):
    """Antiderivative at rho = t of the linear Lagrange basis in log rho that is 1 at rho = b and 0 at rho = c."""
    return t * (-_log(c) + _log(t) - 1) / (_log(b) - _log(c))


def _integral_order3(t, b, c, d):
    """Antiderivative at rho = t of the quadratic Lagrange basis in log rho: 1 at b, 0 at c and d."""
    lt, lc, ld, lb = _log(t), _log(c), _log(d), _log(b)
    numerator = t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2)
    return numerator / ((lb - lc) * (lb - ld))


class DEISMultistepScheduler(VPSolverScheduler):
    """DEIS multistep sampler, step-for-step equal to diffusers' `DEISMultistepScheduler`."""

    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, solver_order=2, prediction_type="epsilon", thresholding=False,
                    dynamic_thresholding_ratio=0.995, sample_max_value=1.0, algorithm_type="deis",
                    solver_type="logrho", lower_order_final=True, use_karras_sigmas=False,
                    use_exponential_sigmas=False, use_beta_sigmas=False, use_flow_sigmas=False, flow_shift=1.0,
                    timestep_spacing="linspace", steps_offset=0, use_dynamic_shifting=False,
                    time_shift_type="exponential")
    choices = dict(beta_schedule=BETA_SCHEDULES, prediction_type=PREDICTION_TYPES, solver_order=(1, 2, 3),
                   algorithm_type=("deis",), solver_type=("logrho",), timestep_spacing=SPACINGS)
    aliases = dict(algorithm_type={"dpmsolver": "deis", "dpmsolver++": "deis"},
                   solver_type={"midpoint": "logrho", "heun": "logrho", "bh1": "logrho", "bh2": "logrho"})
    unsupported = dict(use_beta_sigmas=False, use_flow_sigmas=False, use_dynamic_shifting=False)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        n = self._check_num_steps(num_inference_steps)
        c = self.config
        timesteps = self._spaced_timesteps(n, solver_grid=True).astype(np.int64)
        timesteps, sigmas = self._solver_sigmas(timesteps, n)
        if c.use_karras_sigmas or c.use_exponential_sigmas:
            sigma_last = sigmas[-1]  # the schedule's own minimum (not 0)
        else:
            sigma_last = self.train_sigma_min
        self._install_schedule(timesteps, sigmas, sigma_last, device)

    def _convert_model_output(self, model_output, sample):
        """eps, re-derived from the (optionally thresholded) x_0 prediction."""
        x0 = self._data_prediction(model_output, sample)
        return eps_from_x0(sample, x0, *vp_alpha_sigma(self.sigmas[self._step_index]))

    def _update(self, order: int, sample):
        i, m = self._step_index, self.model_outputs
        alpha_t, sigma_t = vp_alpha_sigma(self.sigmas[i + 1])
        (alpha_s0, sigma_s0), *older = [vp_alpha_sigma(self.sigmas[i - k]) for k in range(order)]
        if order == 1:  # DDIM in exponential-integrator form (= DPM-Solver-1)
            h = half_log_snr(alpha_t, sigma_t) - half_log_snr(alpha_s0, sigma_s0)
            coeffs = dpm_solver_coefficients("dpmsolver", h, alpha_t, sigma_t, alpha_s0, sigma_s0)
            return dpm_solver_update(coeffs, sample, m[-1])
        rho_t, rho_s0 = sigma_t / alpha_t, sigma_s0 / alpha_s0
        rho_s = [rho_s0] + [s / a for a, s in older]
        if order == 2:
            r0, r1 = rho_s
            coef1 = _integral_order2(rho_t, r0, r1) - _integral_order2(rho_s0, r0, r1)
            coef2 = _integral_order2(rho_t, r1, r0) - _integral_order2(rho_s0, r1, r0)
            return alpha_t * (sample / alpha_s0 + coef1 * m[-1] + coef2 * m[-2])
        r0, r1, r2 = rho_s
        coef1 = _integral_order3(rho_t, r0, r1, r2) - _integral_order3(rho_s0, r0, r1, r2)
        coef2 = _integral_order3(rho_t, r1, r2, r0) - _integral_order3(rho_s0, r1, r2, r0)
        coef3 = _integral_order3(rho_t, r2, r0, r1) - _integral_order3(rho_s0, r2, r0, r1)
        return alpha_t * (sample / alpha_s0 + coef1 * m[-1] + coef2 * m[-2] + coef3 * m[-3])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        self._begin_step(timestep)
        c, i, n = self.config, self._step_index, len(self.timesteps)
        # 1. order: warm up from 1; short schedules end with orders 2, 1
        last_step_lower = i == n - 1 and c.lower_order_final and n < 15
        second_last_step_lower = i == n - 2 and c.lower_order_final and n < 15
        # 2. convert and store the model output
        self.model_outputs = self.model_outputs[1:] + [self._convert_model_output(model_output, sample)]
        order = self._multistep_order(last_step_lower, second_last_step_lower)
        prev_sample = self._update(order, sample)
        self.lower_order_nums = min(self.lower_order_nums + 1, c.solver_order)
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)
