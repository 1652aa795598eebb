"""minidepth/schedulers/maths.py: each pure function against an independently written formula (float64, real
numbers), and the schedulers really use it (no scheduler writes the prediction-type branch itself).

Bit-exactness with diffusers is tests/test_schedulers.py's job; here the question is whether the maths is the maths
of the papers: x_0 and eps from a model output, the ODE slope, the ancestral split, and the DPM-Solver(++) update
against a numerical integral of the exact exponential-integrator solution (Lu et al. 2022a/b).
"""

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from minidepth.schedulers import maths

SCHEDULERS_DIR = Path(maths.__file__).parent
SIGMAS = (0.03, 0.5, 1.0, 4.2, 14.6)


def assert_close(actual, expected, what: str, tol: float = 1e-12):
    actual, expected = torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    diff = (actual - expected).abs()
    scale = max(1.0, expected.abs().max().item())
    if not diff.max().item() <= tol * scale:  # also catches NaN
        pytest.fail(f"{what}: max abs difference {diff.max().item():.3g}, mean {diff.mean().item():.3g} "
                    f"(tol {tol:g} x {scale:.3g})")


def _truth(seed: int = 0):
    """A clean sample x_0 and noise eps (float64)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64), torch.randn(2, 4, 3, 3, generator=g,
                                                                                   dtype=torch.float64)


# --------------------------------------------------------------------------------------------------------------------
# sigma parametrisation: x = x_0 + sigma eps
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", SIGMAS)
def test_x0_from_model_output_recovers_x0(sigma):
    x0, eps = _truth()
    s = torch.tensor(sigma, dtype=torch.float64)
    x = x0 + sigma * eps
    # v is defined on the model's input x / sqrt(sigma^2 + 1) = alpha x_0 + sigma_vp eps (Salimans & Ho 2022)
    alpha, sigma_vp = 1 / math.sqrt(sigma**2 + 1), sigma / math.sqrt(sigma**2 + 1)
    v = alpha * eps - sigma_vp * x0
    for kind, output in (("epsilon", eps), ("sample", x0), ("v_prediction", v)):
        assert_close(maths.x0_from_model_output(x, output, s, kind), x0, f"x0 from {kind} at sigma={sigma}")


def test_x0_from_model_output_v_sigma_only_changes_the_v_form():
    x0, eps = _truth(1)
    x, s, s_hat = x0 + 2.0 * eps, torch.tensor(2.0, dtype=torch.float64), torch.tensor(2.5, dtype=torch.float64)
    assert_close(maths.x0_from_model_output(x, eps, s_hat, "epsilon", v_sigma=s), x - 2.5 * eps, "eps with v_sigma")
    assert_close(maths.x0_from_model_output(x, eps, s_hat, "v_prediction", v_sigma=s),
                 maths.x0_from_model_output(x, eps, s, "v_prediction"), "v with v_sigma")
    with pytest.raises(ValueError, match="prediction_type"):
        maths.x0_from_model_output(x, eps, s, "noise")


@pytest.mark.parametrize("sigma", SIGMAS)
def test_to_d_is_the_noise_and_the_ode_slope(sigma):
    x0, eps = _truth(2)
    x = x0 + sigma * eps
    assert_close(maths.to_d(x, x0, torch.tensor(sigma, dtype=torch.float64)), eps, f"to_d at sigma={sigma}")
    # dx/dsigma along the ODE trajectory x(sigma) = x_0 + sigma eps with a perfect denoiser is eps
    h = 1e-6
    slope = ((x0 + (sigma + h) * eps) - (x0 + (sigma - h) * eps)) / (2 * h)
    assert_close(maths.to_d(x, x0, sigma), slope, "to_d vs finite difference", tol=1e-8)


@pytest.mark.parametrize("sigma_from,sigma_to", [(14.6, 10.0), (1.0, 0.5), (0.5, 0.03), (3.0, 3.0), (2.0, 0.0)])
def test_ancestral_step(sigma_from, sigma_to):
    up, down = maths.ancestral_step(torch.tensor(sigma_from, dtype=torch.float64),
                                    torch.tensor(sigma_to, dtype=torch.float64))
    # k-diffusion's get_ancestral_step, eta = 1, written out
    up_ref = min(sigma_to, math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    down_ref = math.sqrt(sigma_to**2 - up_ref**2)
    assert_close(up, up_ref, "sigma_up")
    assert_close(down, down_ref, "sigma_down")
    assert_close(up**2 + down**2, sigma_to**2, "sigma_up^2 + sigma_down^2 = sigma_to^2")
    # the DDPM posterior in sigma: sigma_down = sigma_to^2 / sigma_from
    assert_close(down, sigma_to**2 / sigma_from, "sigma_down = sigma_to^2 / sigma_from")


def test_ancestral_step_is_elementwise():
    sigmas = torch.tensor([14.6, 7.0, 2.0, 0.4], dtype=torch.float64)
    up, down = maths.ancestral_step(sigmas[:-1], sigmas[1:])
    for i in range(3):
        u, d = maths.ancestral_step(sigmas[i], sigmas[i + 1])
        assert_close(up[i], u, f"sigma_up[{i}]", tol=0)
        assert_close(down[i], d, f"sigma_down[{i}]", tol=0)


def test_log_midpoint_is_the_geometric_mean():
    a, b = torch.tensor([14.6, 1.0, 0.03], dtype=torch.float64), torch.tensor([7.0, 0.25, 0.02], dtype=torch.float64)
    assert_close(maths.log_midpoint(a, b), (a * b).sqrt(), "log midpoint")


# --------------------------------------------------------------------------------------------------------------------
# alpha/sigma parametrisation: x_t = alpha_t x_0 + sigma_t eps
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", SIGMAS)
def test_vp_alpha_sigma_and_half_log_snr(sigma):
    alpha_t, sigma_t = maths.vp_alpha_sigma(torch.tensor(sigma, dtype=torch.float64))
    assert_close(alpha_t**2 + sigma_t**2, 1.0, "alpha^2 + sigma^2 = 1")
    assert_close(sigma_t / alpha_t, sigma, "sigma_t / alpha_t = table sigma")
    assert_close(maths.half_log_snr(alpha_t, sigma_t), -math.log(sigma), "lambda = log(alpha / sigma)")


@pytest.mark.parametrize("alpha_bar", (0.9991, 0.5, 0.0047))
def test_x0_and_eps_from_model_output_vp(alpha_bar):
    x0, eps = _truth(3)
    alpha_t = torch.tensor(alpha_bar, dtype=torch.float64).sqrt()
    sigma_t = torch.tensor(1 - alpha_bar, dtype=torch.float64).sqrt()
    x = alpha_t * x0 + sigma_t * eps  # Ho et al. 2020, eq. (4)
    v = alpha_t * eps - sigma_t * x0  # Salimans & Ho 2022
    for kind, output in (("epsilon", eps), ("sample", x0), ("v_prediction", v)):
        assert_close(maths.x0_from_model_output_vp(x, output, alpha_t, sigma_t, kind), x0, f"x0 from {kind}")
        assert_close(maths.eps_from_model_output_vp(x, output, alpha_t, sigma_t, kind), eps, f"eps from {kind}")
    assert_close(maths.x0_from_eps(x, eps, alpha_t, sigma_t), x0, "x0_from_eps")
    assert_close(maths.eps_from_x0(x, x0, alpha_t, sigma_t), eps, "eps_from_x0")
    for fn in (maths.x0_from_model_output_vp, maths.eps_from_model_output_vp):
        with pytest.raises(ValueError, match="prediction_type"):
            fn(x, eps, alpha_t, sigma_t, "noise")


def test_k_diffusion_and_vp_x0_agree():
    """The sigma form of the v formula is the VP one applied to the model input x / sqrt(sigma^2 + 1)."""
    x0, eps = _truth(4)
    s = torch.tensor(3.3, dtype=torch.float64)
    x = x0 + s * eps
    alpha_t, sigma_t = maths.vp_alpha_sigma(s)
    for kind, output in (("epsilon", eps), ("v_prediction", alpha_t * eps - sigma_t * x0)):
        assert_close(maths.x0_from_model_output(x, output, s, kind),
                     maths.x0_from_model_output_vp(x * alpha_t, output, alpha_t, sigma_t, kind), kind)


# --------------------------------------------------------------------------------------------------------------------
# DPM-Solver(++) updates against the exact solution of the diffusion ODE, integrated numerically
# --------------------------------------------------------------------------------------------------------------------
def _exact_step(algorithm: str, x_s, poly, sigma_s: float, sigma_t: float):
    """The exponential-integrator solution from s to t (Lu et al. 2022a eq. (3.4) form / 2022b), with the model
    output along the way replaced by the polynomial poly(u) = sum_k D_k u^k / (k! h^k) in u = lambda - lambda_s,
    integrated by 40-point Gauss-Legendre quadrature:
        data prediction:  x_t = sigma_t/sigma_s x_s + sigma_t   int e^lambda  x_0(lambda) dlambda
        noise prediction: x_t = alpha_t/alpha_s x_s - alpha_t   int e^-lambda eps(lambda) dlambda"""
    a_s, s_s = 1 / math.sqrt(1 + sigma_s**2), sigma_s / math.sqrt(1 + sigma_s**2)
    a_t, s_t = 1 / math.sqrt(1 + sigma_t**2), sigma_t / math.sqrt(1 + sigma_t**2)
    lam_s, lam_t = math.log(a_s / s_s), math.log(a_t / s_t)
    h = lam_t - lam_s
    nodes, weights = np.polynomial.legendre.leggauss(40)
    integral = 0
    for u_unit, w in zip(nodes, weights):
        u = (u_unit + 1) * h / 2
        value = sum(d * (u**k / (math.factorial(k) * h**k)) for k, d in enumerate(poly))
        kernel = math.exp(lam_s + u) if algorithm == "dpmsolver++" else math.exp(-(lam_s + u))
        integral = integral + (w * h / 2) * kernel * value
    if algorithm == "dpmsolver++":
        return s_t / s_s * x_s + s_t * integral
    return a_t / a_s * x_s - a_t * integral


def _coefficients(algorithm: str, sigma_s: float, sigma_t: float):
    alpha_s, s_s = maths.vp_alpha_sigma(torch.tensor(sigma_s, dtype=torch.float64))
    alpha_t, s_t = maths.vp_alpha_sigma(torch.tensor(sigma_t, dtype=torch.float64))
    h = maths.half_log_snr(alpha_t, s_t) - maths.half_log_snr(alpha_s, s_s)
    return maths.dpm_solver_coefficients(algorithm, h, alpha_t, s_t, alpha_s, s_s), h


@pytest.mark.parametrize("algorithm", ("dpmsolver++", "dpmsolver"))
@pytest.mark.parametrize("sigma_s,sigma_t", [(14.6, 8.0), (2.0, 1.1), (0.4, 0.03)])
def test_dpm_solver_update_is_the_exact_integral(algorithm, sigma_s, sigma_t):
    """Order 1 (DPM-Solver-1 / DPM-Solver++(1)), the "heun" order-2 weight and the order-3 weight integrate the
    constant, linear and quadratic terms of the model output exactly."""
    x_s, d0 = _truth(5)
    d1, d2 = _truth(6)
    coeffs, _ = _coefficients(algorithm, sigma_s, sigma_t)
    for order, terms in ((1, (d0,)), (2, (d0, d1)), (3, (d0, d1, d2))):
        ours = maths.dpm_solver_update(coeffs, x_s, *terms, d1_weight="heun")
        assert_close(ours, _exact_step(algorithm, x_s, terms, sigma_s, sigma_t),
                     f"{algorithm} order {order} from sigma {sigma_s} to {sigma_t}", tol=1e-10)


def test_dpm_solver_pp_2m_is_algorithm_2():
    """DPM-Solver++(2M), Lu et al. 2022b Algorithm 2: r = h_prev / h, D = (1 + 1/(2r)) m_0 - 1/(2r) m_1,
    x_t = sigma_t/sigma_s x_s - alpha_t (e^-h - 1) D; our midpoint update with D1 = (m_0 - m_1) / r."""
    x_s, m0 = _truth(7)
    m1, _ = _truth(8)
    sigma_prev, sigma_s, sigma_t = 9.0, 5.0, 2.5
    coeffs, h = _coefficients("dpmsolver++", sigma_s, sigma_t)
    h_prev = math.log(sigma_prev) - math.log(sigma_s)  # lambda = -log(table sigma)
    r = h_prev / h.item()
    alpha_t, s_t = 1 / math.sqrt(1 + sigma_t**2), sigma_t / math.sqrt(1 + sigma_t**2)
    s_s = sigma_s / math.sqrt(1 + sigma_s**2)
    big_d = (1 + 1 / (2 * r)) * m0 - (1 / (2 * r)) * m1
    expected = s_t / s_s * x_s - alpha_t * (math.exp(-h.item()) - 1) * big_d
    ours = maths.dpm_solver_update(coeffs, x_s, m0, (1.0 / r) * (m0 - m1), d1_weight="mid")
    assert_close(ours, expected, "DPM-Solver++(2M)")


def test_sde_dpm_solver_pp_first_order():
    """SDE-DPM-Solver++(1): x_t = sigma_t/sigma_s e^-h x_s + alpha_t (1 - e^-2h) x_0 + sigma_t sqrt(1 - e^-2h) z."""
    x_s, x0 = _truth(9)
    z, _ = _truth(10)
    sigma_s, sigma_t = 3.0, 1.2
    coeffs, h = _coefficients("sde-dpmsolver++", sigma_s, sigma_t)
    h = h.item()
    alpha_t, s_t = 1 / math.sqrt(1 + sigma_t**2), sigma_t / math.sqrt(1 + sigma_t**2)
    s_s = sigma_s / math.sqrt(1 + sigma_s**2)
    expected = (s_t / s_s * math.exp(-h) * x_s + alpha_t * (1 - math.exp(-2 * h)) * x0
                + s_t * math.sqrt(1 - math.exp(-2 * h)) * z)
    assert_close(maths.dpm_solver_update(coeffs, x_s, x0, noise=z), expected, "SDE-DPM-Solver++(1)")
    with pytest.raises(ValueError, match="algorithm_type"):
        maths.dpm_solver_coefficients("euler", torch.tensor(h), *maths.vp_alpha_sigma(torch.tensor(1.0)),
                                      *maths.vp_alpha_sigma(torch.tensor(2.0)))


# --------------------------------------------------------------------------------------------------------------------
# The schedulers use these functions instead of writing the maths again
# --------------------------------------------------------------------------------------------------------------------
# prediction-type comparisons outside maths.py that are not the x_0 / eps conversion, each with its reason
ALLOWED_PREDICTION_CHECKS = {
    ("euler.py", "v_prediction"),  # timestep_type="continuous": EDM's c_noise timesteps for v-prediction models
    ("dpmsolver.py", "epsilon"),  # learned-variance models: keep the first 3 channels of an eps output
    ("dpmsolver_singlestep.py", "epsilon"),  # the same
}


def _prediction_type_checks(path: Path) -> set:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                if isinstance(operand, ast.Constant) and operand.value in maths.PREDICTION_TYPES:
                    found.add((path.name, operand.value, node.lineno))
    return found


def test_no_scheduler_writes_the_prediction_type_branch_itself():
    checks = set()
    for path in sorted(SCHEDULERS_DIR.glob("*.py")):
        if path.name != "maths.py":
            checks |= _prediction_type_checks(path)
    unexpected = sorted(c for c in checks if c[:2] not in ALLOWED_PREDICTION_CHECKS)
    assert not unexpected, f"prediction-type branches outside maths.py (use maths.x0_from_model_output*): {unexpected}"
    assert _prediction_type_checks(SCHEDULERS_DIR / "maths.py"), "maths.py should hold the branches"


USERS = {  # function -> scheduler modules that must import it from maths
    "x0_from_model_output": ("euler", "heun", "lms", "kdpm2"),
    "to_d": ("euler", "heun", "lms", "kdpm2"),
    "ancestral_step": ("euler", "kdpm2"),
    "log_midpoint": ("kdpm2",),
    "vp_alpha_sigma": ("families", "dpmsolver", "dpmsolver_singlestep", "deis", "unipc"),
    "half_log_snr": ("families", "dpmsolver", "dpmsolver_singlestep", "deis", "unipc"),
    "x0_from_model_output_vp": ("ddim", "ddpm", "families"),
    "eps_from_model_output_vp": ("ddim", "pndm", "families"),
    "dpm_solver_coefficients": ("dpmsolver", "dpmsolver_singlestep", "deis"),
    "dpm_solver_update": ("dpmsolver", "dpmsolver_singlestep", "deis"),
}


@pytest.mark.parametrize("function", sorted(USERS))
def test_schedulers_import_the_maths(function):
    for module in USERS[function]:
        tree = ast.parse((SCHEDULERS_DIR / f"{module}.py").read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and node.module == "maths" for alias in node.names}
        assert function in imported, f"{module}.py does not use maths.{function}"
