"""The schedulers' maths, once: small pure functions in the spirit of k-diffusion's `to_d` / `get_ancestral_step`.

The scheduler classes are the diffusers-compatible outside (config, schedule, state between steps); every formula they
share lives here. Each function keeps diffusers' order of floating-point operations, so results stay bit-exact; where
that order differs from the textbook form, the docstring gives both.

Two parametrisations of the same noisy sample (see common.py):
- sigma ("variance exploding", Karras et al. 2022, https://arxiv.org/abs/2206.00364): x = x_0 + sigma eps, used by LMS,
  Euler, Heun and KDPM2; the model sees x / sqrt(sigma^2 + 1).
- alpha/sigma ("variance preserving"): x_t = alpha_t x_0 + sigma_t eps, alpha_t^2 + sigma_t^2 = 1, used by DDIM,
  DDPM, PNDM and the exponential-integrator solvers (DPM-Solver, DEIS, UniPC), with the half-log-SNR
  lambda_t = log(alpha_t / sigma_t) (Lu et al. 2022a, https://arxiv.org/abs/2206.00927, Sec. 3).
A model predicts eps ("epsilon"), x_0 ("sample") or v = alpha_t eps - sigma_t x_0 ("v_prediction"; Salimans & Ho 2022,
https://arxiv.org/abs/2202.00512, Sec. 4).
"""

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# --------------------------------------------------------------------------------------------------------------------
# sigma parametrisation (k-diffusion family)
# --------------------------------------------------------------------------------------------------------------------
def x0_from_model_output(sample, model_output, sigma, prediction_type: str, v_sigma=None):
    """The denoised x_0 (Karras et al.'s D(x; sigma)) from the model output at noise level sigma, x = x_0 + sigma eps:

        epsilon:       x_0 = x - sigma eps
        sample:        x_0 = model output
        v_prediction:  x_0 = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) v

    The v form is alpha x_vp - sigma_vp v at x_vp = x / sqrt(sigma^2 + 1), (alpha, sigma_vp) = vp_alpha_sigma(sigma).
    `v_sigma` replaces sigma in the v form only: diffusers' Euler with churn uses sigma_hat for eps but sigma for v.
    """
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        s = sigma if v_sigma is None else v_sigma
        return model_output * (-s / (s**2 + 1) ** 0.5) + (sample / (s**2 + 1))
    raise ValueError(f"prediction_type={prediction_type!r} is not supported; accepted: {PREDICTION_TYPES}")


def to_d(sample, x0, sigma):
    """The probability-flow ODE's slope dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, eqs. (1) and (3)
    with sigma(t) = t; Algorithm 1, d_i). It is the noise estimate eps for an eps model."""
    return (sample - x0) / sigma


def ancestral_step(sigma_from, sigma_to):
    """Split an ancestral step sigma_from -> sigma_to into a deterministic step to sigma_down and fresh noise of
    std sigma_up (k-diffusion's `get_ancestral_step` with eta = 1: the DDPM posterior, Ho et al. 2020 eq. (7), in
    sigma):

        sigma_up   = sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2)
        sigma_down = sqrt(sigma_to^2 - sigma_up^2)

    so sigma_down^2 + sigma_up^2 = sigma_to^2: the sample has the right marginal std at sigma_to. Elementwise on
    tensors (sigma_from = 0 gives nan). Returns (sigma_up, sigma_down)."""
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_up, sigma_down


def log_midpoint(sigma_a: torch.Tensor, sigma_b: torch.Tensor) -> torch.Tensor:
    """The geometric mean sqrt(sigma_a sigma_b), taken as the midpoint in log sigma (k-diffusion's `sample_dpm_2`:
    the second evaluation of DPM-Solver-2, Lu et al. 2022a Algorithm 1 with r_1 = 1/2). Elementwise."""
    return sigma_a.log().lerp(sigma_b.log(), 0.5).exp()


# --------------------------------------------------------------------------------------------------------------------
# alpha/sigma parametrisation (DDIM, DDPM, PNDM, exponential-integrator solvers)
# --------------------------------------------------------------------------------------------------------------------
def vp_alpha_sigma(sigma):
    """(alpha_t, sigma_t) = (1, sigma) / sqrt(sigma^2 + 1): the table sigma (x = x_0 + sigma eps) rescaled to
    x_t = alpha_t x_0 + sigma_t eps."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def half_log_snr(alpha_t, sigma_t):
    """lambda_t = log(alpha_t / sigma_t), the time variable of the exponential integrators (Lu et al. 2022a, Sec. 3.1),
    computed as log(alpha_t) - log(sigma_t)."""
    return torch.log(alpha_t) - torch.log(sigma_t)


def x0_from_eps(sample, eps, alpha_t, sigma_t):
    """x_0 = (x_t - sigma_t eps) / alpha_t (Ho et al. 2020, eq. (15); Song et al. 2021, eq. (12) "predicted x_0")."""
    return (sample - sigma_t * eps) / alpha_t


def eps_from_x0(sample, x0, alpha_t, sigma_t):
    """eps = (x_t - alpha_t x_0) / sigma_t, the inverse of x0_from_eps."""
    return (sample - alpha_t * x0) / sigma_t


def x0_from_model_output_vp(sample, model_output, alpha_t, sigma_t, prediction_type: str):
    """x_0 from an eps / x_0 / v model output at x_t = alpha_t x_0 + sigma_t eps (v: x_0 = alpha_t x_t - sigma_t v)."""
    if prediction_type == "epsilon":
        return x0_from_eps(sample, model_output, alpha_t, sigma_t)
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_t * sample - sigma_t * model_output
    raise ValueError(f"prediction_type={prediction_type!r} is not supported; accepted: {PREDICTION_TYPES}")


def eps_from_model_output_vp(sample, model_output, alpha_t, sigma_t, prediction_type: str):
    """eps from an eps / x_0 / v model output at x_t = alpha_t x_0 + sigma_t eps (v: eps = alpha_t v + sigma_t x_t)."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return eps_from_x0(sample, model_output, alpha_t, sigma_t)
    if prediction_type == "v_prediction":
        return alpha_t * model_output + sigma_t * sample
    raise ValueError(f"prediction_type={prediction_type!r} is not supported; accepted: {PREDICTION_TYPES}")


# --------------------------------------------------------------------------------------------------------------------
# DPM-Solver(++) updates (Lu et al. 2022a; Lu et al. 2022b, https://arxiv.org/abs/2211.01095)
# --------------------------------------------------------------------------------------------------------------------
def dpm_solver_coefficients(algorithm: str, h, alpha_t, sigma_t, alpha_s, sigma_s) -> dict:
    """Weights of one exponential-integrator step from s to t, h = lambda_t - lambda_s, for `dpm_solver_update`:

        x_t = x * x_s + d0 * D0 + (mid | heun) * D1 + d2 * D2 + noise * z

    D0 is the model's (converted) output, D1, D2 scaled differences of outputs. First order:
        dpmsolver++      x_t = sigma_t/sigma_s x_s - alpha_t (e^-h - 1) x_0      (DPM-Solver++(1), Lu et al. 2022b)
        dpmsolver        x_t = alpha_t/alpha_s x_s - sigma_t (e^h - 1) eps        (DPM-Solver-1, Lu et al. 2022a)
        sde-dpmsolver++  x_t = sigma_t/sigma_s e^-h x_s + alpha_t (1 - e^-2h) x_0 + sigma_t sqrt(1 - e^-2h) z
    `mid` = 1/2 the D0 weight (the "midpoint" solver type: Lu et al. 2022b Algorithms 1-2, DPM-Solver++(2S)/(2M);
    Lu et al. 2022a Algorithm 1, DPM-Solver-2), `heun` = the exact integral of a term linear in lambda, h phi_2(h)
    (the "heun" type), `d2` the order-3 weight (Lu et al. 2022a Algorithm 2, DPM-Solver-3); sde-dpmsolver has none.
    """
    if algorithm == "dpmsolver++":  # data prediction: phi_1(-h) h = e^-h - 1
        phi = torch.exp(-h) - 1.0
        return dict(x=sigma_t / sigma_s, d0=-(alpha_t * phi), mid=-(0.5 * (alpha_t * phi)),
                    heun=alpha_t * (phi / h + 1.0), d2=-(alpha_t * ((phi + h) / h**2 - 0.5)), noise=None)
    if algorithm == "dpmsolver":  # noise prediction: phi_1(h) h = e^h - 1
        phi = torch.exp(h) - 1.0
        return dict(x=alpha_t / alpha_s, d0=-(sigma_t * phi), mid=-(0.5 * (sigma_t * phi)),
                    heun=-(sigma_t * (phi / h - 1.0)), d2=-(sigma_t * ((phi - h) / h**2 - 0.5)), noise=None)
    if algorithm == "sde-dpmsolver++":
        decay = 1 - torch.exp(-2.0 * h)
        return dict(x=sigma_t / sigma_s * torch.exp(-h), d0=alpha_t * decay, mid=0.5 * (alpha_t * decay),
                    heun=alpha_t * (decay / (-2.0 * h) + 1.0), d2=alpha_t * ((decay - 2.0 * h) / (2.0 * h) ** 2 - 0.5),
                    noise=sigma_t * torch.sqrt(decay))
    if algorithm == "sde-dpmsolver":
        phi = torch.exp(h) - 1.0
        return dict(x=alpha_t / alpha_s, d0=-(2.0 * (sigma_t * phi)), mid=-(sigma_t * phi),
                    heun=-(2.0 * (sigma_t * (phi / h - 1.0))), d2=None,
                    noise=sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0))
    raise ValueError(f"algorithm_type={algorithm!r} is not supported")


def dpm_solver_update(coeffs: dict, sample, d0, d1=None, d2=None, *, d1_weight: str = "mid", noise=None):
    """x_t = x * x_s + d0 * D0 (+ w * D1) (+ d2 * D2) (+ noise * z) with the weights of `dpm_solver_coefficients`,
    w = coeffs[d1_weight] ("mid" or "heun"), summed left to right as diffusers writes it.

    With D1 = (m_0 - m_1) / r_0, r_0 = (lambda_0 - lambda_1) / h, and the midpoint weight this is DPM-Solver++(2M)
    (Lu et al. 2022b, Algorithm 2): x_t = sigma_t/sigma_s x_s - alpha_t (e^-h - 1) ((1 + 1/(2 r_0)) m_0 - m_1/(2 r_0)).
    """
    x_t = coeffs["x"] * sample + coeffs["d0"] * d0
    if d1 is not None:
        x_t = x_t + coeffs[d1_weight] * d1
    if d2 is not None:
        x_t = x_t + coeffs["d2"] * d2
    if coeffs["noise"] is not None:
        x_t = x_t + coeffs["noise"] * noise
    return x_t
