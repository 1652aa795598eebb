"""LMS: linear multistep sampling on the probability-flow ODE in sigma (Karras et al. 2022, Sec. 3, after
k-diffusion's `sample_lms`).

With the derivative d_i = (x_i - x0_i) / sigma_i (= the noise estimate), the ODE is dx/dsigma = d. A step from
sigma_i to sigma_{i+1} integrates the Lagrange polynomial through the last `order` derivatives (Adams-Bashforth):
    x_{i+1} = x_i + sum_j c_j d_{i-j},
    c_j = integral over s from sigma_i to sigma_{i+1} of prod_{k != j} (s - sigma_{i-k}) / (sigma_{i-j} - sigma_{i-k})
diffusers integrates c_j with scipy.integrate.quad, evaluating the integrand in float32 (its sigmas are float32 tensors).
For these smooth integrands quad returns the result of its first rule, QUADPACK's 21-point Gauss-Kronrod sum (qk21),
which we reproduce here -- same nodes, weights, summation order and float32 integrand -- so the coefficients equal
diffusers' bit for bit, without scipy. The integrand is a polynomial of degree <= 3, so its exact integral is also
available in closed form (`coefficient_rule = "exact"`); it differs from quad's float32-noisy value by ~3e-7 relative.
"""

import numpy as np
import torch

from .common import BETA_SCHEDULES, SPACINGS, SchedulerOutput
from .families import SigmaScheduler
from .maths import PREDICTION_TYPES, to_d, x0_from_model_output


def lagrange_integral(nodes: list[float], j: int, a: float, b: float) -> float:
    """Exact integral over [a, b] of the Lagrange basis polynomial l_j through `nodes` (l_j(nodes[k]) = [j == k])."""
    poly = np.array([1.0])  # coefficients, highest power first
    for k, node in enumerate(nodes):
        if k != j:
            poly = np.polymul(poly, np.array([1.0, -node]) / (nodes[j] - node))
    antiderivative = np.polyint(poly)
    return float(np.polyval(antiderivative, b) - np.polyval(antiderivative, a))


# QUADPACK's 21-point Kronrod rule on [-1, 1] (Piessens et al. 1983): abscissae xgk and weights wgk; the entries at odd
# positions (0-based) are the 10-point Gauss-Legendre nodes, the last is the centre.
_XGK = (0.995657163025808080735527280689003, 0.973906528517171720077964012084452,
        0.930157491355708226001207180059508, 0.865063366688984510732096688423493,
        0.780817726586416897063717578345042, 0.679409568299024406234327365114874,
        0.562757134668604683339000099272694, 0.433395394129247190799265943165784,
        0.294392862701460198131126603103866, 0.148874338981631210884826001129720, 0.0)
_WGK = (0.011694638867371874278064396062192, 0.032558162307964727478818972459390,
        0.054755896574351996031381300244580, 0.075039674810919952767043140916190,
        0.093125454583697605535065465083366, 0.109387158802297641899210590325805,
        0.123491976262065851077208067124815, 0.134709217311473325928054001771707,
        0.142775938577060080797094273138717, 0.147739104901338491374841515972068,
        0.149445554002916905664936468389821)


def gauss_kronrod21(f, a: float, b: float) -> float:
    """QUADPACK qk21: the integral of f over [a, b] by the 21-point Kronrod rule, summed in QUADPACK's order
    (centre, then the Gauss pairs, then the Kronrod-only pairs). Exact for polynomials up to degree 31."""
    centre, half = 0.5 * (a + b), 0.5 * (b - a)
    total = _WGK[10] * f(centre)
    for j in (1, 3, 5, 7, 9, 0, 2, 4, 6, 8):
        offset = half * _XGK[j]
        total = total + _WGK[j] * (f(centre - offset) + f(centre + offset))
    return total * half


def lagrange_basis(tau: float, nodes: list[torch.Tensor], j: int) -> float:
    """l_j(tau) through `nodes`, evaluated like diffusers' integrand (float32 tensor arithmetic, same order)."""
    prod = 1.0
    for k, node in enumerate(nodes):
        if k != j:
            prod *= (tau - node) / (nodes[j] - node)
    return float(prod)


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

    coefficient_rule = "quadpack"  # "quadpack": diffusers' numbers bit for bit; "exact": the closed-form integral

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        """c_j for j = current_order at step t: the integral from sigma_t to sigma_{t+1} of l_j through
        sigma_t, sigma_{t-1}, ..., sigma_{t-order+1}."""
        a, b = float(self.sigmas[t]), float(self.sigmas[t + 1])
        if self.coefficient_rule == "exact":
            return lagrange_integral([float(self.sigmas[t - k]) for k in range(order)], current_order, a, b)
        if self.coefficient_rule != "quadpack":
            raise ValueError(f"coefficient_rule must be 'quadpack' or 'exact', got {self.coefficient_rule!r}")
        nodes = [self.sigmas[t - k] for k in range(order)]
        return gauss_kronrod21(lambda tau: lagrange_basis(tau, nodes, current_order), a, b)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, order: int = 4,
             return_dict: bool = True):
        self._begin_step(timestep)
        sigma = self.sigmas[self._step_index]
        # 1. predicted x_0
        x0 = x0_from_model_output(sample, model_output, sigma, self.config.prediction_type)
        # 2. ODE derivative d = (x - x_0) / sigma; keep the last `order`
        self.derivatives.append(to_d(sample, x0, sigma))
        if len(self.derivatives) > order:
            self.derivatives.pop(0)
        # 3. Adams-Bashforth step with the integrated Lagrange coefficients
        order = min(self._step_index + 1, order)
        coeffs = [self.get_lms_coefficient(order, self._step_index, j) for j in range(order)]
        prev_sample = sample + sum(c * d for c, d in zip(coeffs, reversed(self.derivatives)))
        self._step_index += 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
