"""The two scheduler families' shared machinery (on top of common.Scheduler):

- SigmaScheduler: the k-diffusion family (LMS, Euler, Heun, KDPM2), which walks on sigma = sqrt((1 - a) / a) with the
  sample kept as x_0 + sigma * eps;
- VPSolverScheduler: the exponential-integrator family (DPM-Solver, DEIS, UniPC), which keeps the sample as
  alpha_t x_0 + sigma_t eps and steps in half-log-SNR lambda.
The formulas themselves (x_0 / eps from a model output, alpha_t / sigma_t, lambda) are in maths.py.
"""

import numpy as np
import torch

from .common import Scheduler, broadcast_to, convert_sigmas, dynamic_threshold, sigma_to_t, train_sigmas
from .maths import eps_from_model_output_vp, half_log_snr, vp_alpha_sigma, x0_from_model_output_vp


class SigmaScheduler(Scheduler):
    """The k-diffusion family (LMS, Euler, Heun, KDPM2): the sample lives in "variance exploding" coordinates
    x = x_0 + sigma * eps, and the model sees x / sqrt(sigma^2 + 1) (Karras et al. 2022, Table 1, c_in)."""

    def __init__(self, **config):
        super().__init__(**config)
        if self._config.get("rescale_betas_zero_snr"):
            self.alphas_cumprod[-1] = 2**-24  # diffusers: keeps the last sigma finite (it would be infinite)
        self.sigmas = torch.cat([train_sigmas(self.alphas_cumprod).flip(0), torch.zeros(1)])

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """Std of the initial noise: sigma_max, or sqrt(sigma_max^2 + 1) with "leading" spacing (diffusers' rule)."""
        sigma_max = self.sigmas.max()
        return sigma_max if self._config["timestep_spacing"] in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5

    def _model_input_sigma(self) -> torch.Tensor:
        return self.sigmas[self._step_index]

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self._model_input_sigma()
        return sample / ((sigma**2 + 1) ** 0.5)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_0 + sigma_t * eps at the schedule position of `timesteps` (or of the current / begin index)."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        sigma = broadcast_to(sigmas[self._step_indices(timesteps, original_samples.device)], original_samples)
        return original_samples + noise * sigma

    def _sigma_schedule(self, n: int, range_from_config: bool = True, log_linear: bool = False):
        """Shared part of set_timesteps: float32 spaced timesteps, sigmas interpolated at them (float64), optionally
        replaced by a Karras / exponential schedule over the same range with matching fractional timesteps.
        `log_linear` (Euler's interpolation_type): n + 1 sigmas evenly spaced in log between the table's ends,
        ascending (sic, as diffusers)."""
        timesteps = self._spaced_timesteps(n).astype(np.float32)
        full = train_sigmas(self.alphas_cumprod).numpy()
        log_sigmas = np.log(full)
        if log_linear:
            sigmas = torch.linspace(np.log(full[-1]), np.log(full[0]), n + 1).exp().numpy()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(full)), full)
        converted = convert_sigmas(self._config, self._sigma_kind(), sigmas, n, range_from_config)
        if converted is not None:
            sigmas, timesteps = converted, sigma_to_t(converted, log_sigmas)
        return timesteps, sigmas, log_sigmas


class VPSolverScheduler(Scheduler):
    """The exponential-integrator family (DPM-Solver, DEIS, UniPC): x_t = alpha_t x_0 + sigma_t eps with
    alpha_t = 1 / sqrt(1 + s^2), sigma_t = s * alpha_t for the table sigma s, and half-log-SNR
    lambda_t = log(alpha_t) - log(sigma_t) (Lu et al. 2022, Sec. 3)."""

    missing_timestep_is_last = True

    def __init__(self, **config):
        super().__init__(**config)
        if self._config.get("rescale_betas_zero_snr"):
            self.alphas_cumprod[-1] = 2**-24  # diffusers: keeps lambda finite at the last training step
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = half_log_snr(self.alpha_t, self.sigma_t)
        self.sigmas = train_sigmas(self.alphas_cumprod)
        self.model_outputs = [None] * self._config["solver_order"]  # the last solver_order outputs, newest last
        self.lower_order_nums = 0  # steps taken so far, capped at solver_order: the warm-up of multistep solvers

    @property
    def train_sigma_min(self) -> float:
        """The smallest training sigma, sqrt((1 - alpha_bar_0) / alpha_bar_0) (a `final_sigmas_type` choice)."""
        return train_sigmas(self.alphas_cumprod[0])

    def _install_schedule(self, timesteps: np.ndarray, sigmas: np.ndarray, sigma_last, device) -> None:
        """Store the inference schedule (sigmas get `sigma_last` appended) and clear the solver history."""
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [sigma_last]]).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self._reset_history()

    def _multistep_order(self, force_first: bool, force_second: bool) -> int:
        """The order of this step: a multistep solver warms up at first order (one stored output), then second, and
        may drop back near the end (`force_*`, e.g. lower_order_final on short schedules)."""
        c = self.config
        if c.solver_order == 1 or self.lower_order_nums < 1 or force_first:
            return 1
        if c.solver_order == 2 or self.lower_order_nums < 2 or force_second:
            return 2
        return 3

    def _lambda(self, sigma: torch.Tensor) -> torch.Tensor:
        return half_log_snr(*vp_alpha_sigma(sigma))

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """alpha_t x_0 + sigma_t eps at the schedule position of `timesteps` (or of the current / begin index)."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        sigma = broadcast_to(sigmas[self._step_indices(timesteps, original_samples.device)], original_samples)
        alpha_t, sigma_t = vp_alpha_sigma(sigma)
        return alpha_t * original_samples + sigma_t * noise

    def _data_prediction(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """x_0 predicted at the current step from an eps / x_0 / v model output (then dynamic thresholding)."""
        alpha_t, sigma_t = vp_alpha_sigma(self.sigmas[self._step_index])
        x0 = x0_from_model_output_vp(sample, model_output, alpha_t, sigma_t, self._config["prediction_type"])
        if self._config["thresholding"]:
            x0 = dynamic_threshold(x0, self._config["dynamic_thresholding_ratio"], self._config["sample_max_value"])
        return x0

    def _noise_prediction(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """eps predicted at the current step from an eps / x_0 / v model output."""
        alpha_t, sigma_t = vp_alpha_sigma(self.sigmas[self._step_index])
        return eps_from_model_output_vp(sample, model_output, alpha_t, sigma_t, self._config["prediction_type"])

    def _solver_sigmas(self, timesteps: np.ndarray, n: int, round_karras: bool = True):
        """Sigmas at `timesteps` (interpolated in the training table), or a Karras / exponential schedule over the
        whole training range with the matching (rounded, for Karras) timesteps."""
        full = train_sigmas(self.alphas_cumprod).numpy()
        log_sigmas = np.log(full)
        kind = self._sigma_kind()
        converted = convert_sigmas(self._config, kind, np.flip(full).copy(), n)
        if converted is None:
            return timesteps, np.interp(timesteps, np.arange(0, len(full)), full)
        timesteps = sigma_to_t(converted, log_sigmas)
        if kind == "karras" and round_karras:
            timesteps = timesteps.round()
        return timesteps, converted

    def _reset_history(self):
        self.model_outputs = [None] * self._config["solver_order"]
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None
