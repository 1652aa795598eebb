"""Singlestep DPM-Solver(++) (Lu et al. 2022a, https://arxiv.org/abs/2206.00927, Algorithms 1-2 "DPM-Solver-2/3";
Lu et al. 2022b, https://arxiv.org/abs/2211.01095, Algorithm 1 "DPM-Solver++(2S)").

The schedule is cut into blocks of `solver_order` steps (`order_list`, e.g. 1, 2, 1, 2, ... for order 2). Inside a block
every step restarts from the block's first sample x_s: the first step is a first-order (DDIM-like) update to an
intermediate time; the next ones use the model outputs at the intermediate times to reach further with a higher
order (D1, D2 as in dpmsolver.py, but measured from the block's start). Same update weights as the multistep solver
(maths.dpm_solver_coefficients).
"""

import numpy as np
import torch

from .common import BETA_SCHEDULES, SchedulerOutput, randn_tensor, spaced_timesteps
from .families import VPSolverScheduler
from .maths import PREDICTION_TYPES, dpm_solver_coefficients, dpm_solver_update, half_log_snr, vp_alpha_sigma


class DPMSolverSinglestepScheduler(VPSolverScheduler):
    """Singlestep DPM-Solver(++), step-for-step equal to diffusers' `DPMSolverSinglestepScheduler`.

    Quirks kept: only "linspace" timesteps; set_timesteps switches `lower_order_final` on in the config when the number
    of steps is not a multiple of the order or when the final sigma is zero (diffusers rewrites its config too).
    """

    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, solver_order=2, prediction_type="epsilon", thresholding=False,
                    dynamic_thresholding_ratio=0.995, sample_max_value=1.0, algorithm_type="dpmsolver++",
                    solver_type="midpoint", lower_order_final=False, use_karras_sigmas=False,
                    use_exponential_sigmas=False, use_beta_sigmas=False, use_flow_sigmas=False, flow_shift=1.0,
                    final_sigmas_type="zero", lambda_min_clipped=-float("inf"), variance_type=None,
                    use_dynamic_shifting=False, time_shift_type="exponential")
    choices = dict(beta_schedule=BETA_SCHEDULES, prediction_type=PREDICTION_TYPES, solver_order=(1, 2, 3),
                   algorithm_type=("dpmsolver++", "sde-dpmsolver++", "dpmsolver"), solver_type=("midpoint", "heun"),
                   final_sigmas_type=("zero", "sigma_min"), variance_type=(None, "learned", "learned_range"))
    aliases = dict(algorithm_type={"deis": "dpmsolver++"}, solver_type={"logrho": "midpoint", "bh1": "midpoint",
                                                                        "bh2": "midpoint"})
    unsupported = dict(use_beta_sigmas=False, use_flow_sigmas=False, use_dynamic_shifting=False)

    def __init__(self, **config):
        super().__init__(**config)
        self.sample = None  # x_s, the sample at the start of the current block

    def _check_config(self):
        super()._check_config()
        c, name = self.config, type(self).__name__
        if c.algorithm_type == "dpmsolver" and c.final_sigmas_type == "zero":
            raise ValueError(f"{name}: final_sigmas_type='zero' is not supported with algorithm_type='dpmsolver'; "
                             "use final_sigmas_type='sigma_min'")
        if c.algorithm_type == "dpmsolver" and c.thresholding:  # diffusers crashes on this combination
            raise ValueError(f"{name}: thresholding=True is not supported with algorithm_type='dpmsolver'")

    def get_order_list(self, num_inference_steps: int) -> list[int]:
        """The order of each step: blocks 1, 2(, 3); with lower_order_final the tail uses lower orders."""
        steps, order, c = num_inference_steps, self.config.solver_order, self.config
        if c.lower_order_final and order == 3:
            tails = {0: [1, 2] + [1], 1: [1], 2: [1, 2]}
            orders = [1, 2, 3] * (steps // 3 - (steps % 3 == 0)) + tails[steps % 3]
        elif c.lower_order_final and order == 2:
            orders = [1, 2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * (steps // 2) + [1]
        else:
            orders = list(range(1, order + 1)) * (steps // order)
        if c.final_sigmas_type == "zero":
            orders[-1] = 1
        return orders

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        n = self._check_num_steps(num_inference_steps)
        c = self.config
        self.num_inference_steps = n
        clipped_idx = torch.searchsorted(torch.flip(self.lambda_t, [0]), c.lambda_min_clipped).item()
        timesteps = spaced_timesteps("linspace", c.num_train_timesteps, n, solver_grid=True,
                                     last=c.num_train_timesteps - clipped_idx).astype(np.int64)
        timesteps, sigmas = self._solver_sigmas(timesteps, n)
        if c.final_sigmas_type == "sigma_min":
            sigma_last = self.train_sigma_min
        else:
            sigma_last = 0
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [sigma_last]]).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        if not c.lower_order_final and (n % c.solver_order != 0 or c.final_sigmas_type == "zero"):
            self._config = c.replace(lower_order_final=True)  # diffusers' register_to_config, see the class doc
        self.order_list = self.get_order_list(n)
        self._reset_history()
        self.sample = None

    def _convert_model_output(self, model_output, sample):
        c = self.config
        if c.prediction_type == "epsilon" and c.variance_type in ("learned", "learned_range"):
            model_output = model_output[:, :3]  # diffusers keeps the first 3 channels (learned-variance models)
        if c.algorithm_type == "dpmsolver":
            return self._noise_prediction(model_output, sample)
        return self._data_prediction(model_output, sample)

    def _update(self, order: int, sample, noise):
        """Update of the given order from the block start x_s = `sample` (s = current index - order + 1)."""
        i, m = self._step_index, self.model_outputs
        alpha_t, sigma_t = vp_alpha_sigma(self.sigmas[i + 1])
        alphas_sigmas = [vp_alpha_sigma(self.sigmas[i - k]) for k in range(order)]  # s0 (newest), s1, s2
        lambdas = [half_log_snr(a, s) for a, s in alphas_sigmas]
        h = half_log_snr(alpha_t, sigma_t) - lambdas[-1]  # from the block start
        coeffs = dpm_solver_coefficients(self.config.algorithm_type, h, alpha_t, sigma_t, *alphas_sigmas[-1])
        midpoint = self.config.solver_type == "midpoint"
        if order == 1:
            return dpm_solver_update(coeffs, sample, m[-1], noise=noise)
        if order == 2:  # Lu et al. 2022a, Algorithm 1 (DPM-Solver-2); 2022b, Algorithm 1 (DPM-Solver++(2S))
            r0 = (lambdas[0] - lambdas[1]) / h
            d1 = (1.0 / r0) * (m[-1] - m[-2])
            return dpm_solver_update(coeffs, sample, m[-2], d1, d1_weight="mid" if midpoint else "heun", noise=noise)
        # order 3: Lu et al. 2022a, Algorithm 2 (DPM-Solver-3)
        r0, r1 = (lambdas[0] - lambdas[2]) / h, (lambdas[1] - lambdas[2]) / h
        d1_0, d1_1 = (1.0 / r1) * (m[-2] - m[-3]), (1.0 / r0) * (m[-1] - m[-3])
        if midpoint:
            return dpm_solver_update(coeffs, sample, m[-3], d1_1, d1_weight="heun", noise=noise)
        d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
        d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
        return dpm_solver_update(coeffs, sample, m[-3], d1, d2, d1_weight="heun", noise=noise)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        self._begin_step(timestep)
        # 1. convert and store the model output
        model_output = self._convert_model_output(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [model_output]
        noise = None
        if self.config.algorithm_type == "sde-dpmsolver++":
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=model_output.dtype)
        # 2. this step's order (lower while earlier outputs are missing, e.g. after an img2img start)
        order = self.order_list[self._step_index]
        while self.model_outputs[-order] is None:
            order -= 1
        if order == 1:  # a new block starts here
            self.sample = sample
        prev_sample = self._update(order, self.sample, noise)
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)
