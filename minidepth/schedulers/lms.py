"""LMS: linear multistep sampling on the probability-flow ODE in sigma (Karras et al. 2022, Sec. 3, after
k-diffusion's `sample_lms`).

With the derivative d_i = (x_i - x0_i) / sigma_i (= the noise estimate), the ODE is dx/dsigma = d. A step from
sigma_i to sigma_{i+1} integrates the Lagrange polynomial through the last `order` derivatives (Adams-Bashforth):
    x_{i+1} = x_i + sum_j c_j d_{i-j},
    c_j = integral over s from sigma_i to sigma_{i+1} of prod_{k != j} (s - sigma_{i-k}) / (sigma_{i-j} - sigma_{i-k})
diffusers integrates c_j numerically with scipy.integrate.quad; the integrand is a polynomial of degree <= 3, so we
integrate it exactly in closed form (no scipy), which matches quad to float rounding.
"""

import numpy as np
import torch

from .common import BETA_SCHEDULES, SPACINGS, SchedulerOutput
from .families import SigmaScheduler

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def lagrange_integral(nodes: list[float], j: int, a: float, b: float) -> float:
    """Exact integral over [a, b] of the Lagrange basis polynomial l_j through `nodes` (l_j(nodes[k]) = [j == k])."""
    poly = np.array([1.0])  # coefficients, highest power first
    for k, node in enumerate(nodes):
        if k != j:
            poly = np.polymul(poly, np.array([1.0, -node]) / (nodes[j] - node))
    antiderivative = np.polyint(poly)
    return float(np.polyval(antiderivative, b) - np.polyval(antiderivative, a))


class LMSDiscreteScheduler(SigmaScheduler):
    """Linear multistep sampler, step-for-step equal to diffusers' `LMSDiscreteScheduler`.

    Quirk kept: after an img2img start at step k the order is min(k + 1, 4) although fewer derivatives are stored;
    the extra coefficients are computed and then dropped (diffusers zips coefficients with the derivatives).
    """

    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                    prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0)
    choices = dict(beta_schedule=BETA_SCHEDULES, prediction_type=PREDICTION_TYPES, timestep_spacing=SPACINGS)
    unsupported = dict(use_beta_sigmas=False)  # needs scipy.stats

    def __init__(self, **config):
        super().__init__(**config)
        self.derivatives = []

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        n = self._check_num_steps(num_inference_steps)
        self.num_inference_steps = n
        # diffusers' LMS takes the Karras range from the interpolated sigmas only (not config sigma_min/max)
        timesteps, sigmas, _ = self._sigma_schedule(n, range_from_config=False)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.timesteps = torch.from_numpy(np.asarray(timesteps)).to(device=device, dtype=torch.float32)
        self._step_index = None
        self._begin_index = None
        self.derivatives = []

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        """c_j for j = current_order at step t: the integral from sigma_t to sigma_{t+1} of l_j through
        sigma_t, sigma_{t-1}, ..., sigma_{t-order+1}."""
        nodes = [float(self.sigmas[t - k]) for k in range(order)]
        return lagrange_integral(nodes, current_order, float(self.sigmas[t]), float(self.sigmas[t + 1]))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, order: int = 4,
             return_dict: bool = True):
        self._begin_step(timestep)
        sigma = self.sigmas[self._step_index]
        # 1. predicted x_0
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = sample - sigma * model_output
        elif kind == "v_prediction":
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        else:
            x0 = model_output
        # 2. ODE derivative d = (x - x_0) / sigma; keep the last `order`
        self.derivatives.append((sample - x0) / sigma)
        if len(self.derivatives) > order:
            self.derivatives.pop(0)
        # 3. Adams-Bashforth step with exactly integrated Lagrange coefficients
        order = min(self._step_index + 1, order)
        coeffs = [self.get_lms_coefficient(order, self._step_index, j) for j in range(order)]
        prev_sample = sample + sum(c * d for c, d in zip(coeffs, reversed(self.derivatives)))
        self._step_index += 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
