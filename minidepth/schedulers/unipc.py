"""UniPC: unified predictor-corrector (Zhao et al. 2023, https://arxiv.org/abs/2302.04867).

Each step first CORRECTS the sample it just reached (UniC, using the model output that was just computed there, at no
extra model cost), then PREDICTS the next one (UniP). Both are exponential-integrator updates in
lambda = log(alpha / sigma) with h = lambda_t - lambda_s (data prediction, predict_x0=True, shown):
    x_t = sigma_t/sigma_s x_s - alpha_t h phi_1 m_s - alpha_t B(h) sum_k a_k D_k,    D_k = (m_k - m_s) / r_k
where r_k are the earlier steps' lambda offsets over h and the weights a solve R a = b with R_ik = r_k^(i-1),
b_i = phi_(i+1)(h) i! / B(h) (Zhao et al. 2023, Sec. 3.2-3.3). B(h) = h ("bh1") or e^h - 1 ("bh2"). Orders 1 and 2
use the fixed weight a = 1/2 instead of solving.
"""

import numpy as np
import torch

from .common import BETA_SCHEDULES, SPACINGS, SchedulerOutput
from .families import VPSolverScheduler
from .maths import PREDICTION_TYPES, half_log_snr, vp_alpha_sigma


class UniPCMultistepScheduler(VPSolverScheduler):
    """UniPC multistep sampler (UniP-p + UniC-p), step-for-step equal to diffusers' `UniPCMultistepScheduler`."""

    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, solver_order=2, prediction_type="epsilon", thresholding=False,
                    dynamic_thresholding_ratio=0.995, sample_max_value=1.0, predict_x0=True, solver_type="bh2",
                    lower_order_final=True, disable_corrector=[], solver_p=None, use_karras_sigmas=False,
                    use_exponential_sigmas=False, use_beta_sigmas=False, use_flow_sigmas=False, flow_shift=1.0,
                    timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero",
                    rescale_betas_zero_snr=False, use_dynamic_shifting=False, time_shift_type="exponential",
                    sigma_min=None, sigma_max=None, shift_terminal=None)
    choices = dict(beta_schedule=BETA_SCHEDULES, prediction_type=PREDICTION_TYPES, solver_type=("bh1", "bh2"),
                   final_sigmas_type=("zero", "sigma_min"), timestep_spacing=SPACINGS)
    aliases = dict(solver_type={"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"})
    unsupported = dict(use_beta_sigmas=False, use_flow_sigmas=False, use_dynamic_shifting=False, solver_p=None,
                       shift_terminal=None)

    def __init__(self, **config):
        super().__init__(**config)
        if not isinstance(self.config.solver_order, int) or self.config.solver_order < 1:
            raise ValueError("UniPCMultistepScheduler: solver_order must be an integer >= 1, "
                             f"got {self.config.solver_order!r}")
        self.last_sample = None  # the sample the last prediction started from (for the corrector)
        self.this_order = None

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        n = self._check_num_steps(num_inference_steps)
        c = self.config
        timesteps = self._spaced_timesteps(n, solver_grid=True).astype(np.int64)
        timesteps, sigmas = self._solver_sigmas(timesteps, n)
        if c.final_sigmas_type == "zero":
            sigma_last = 0
        elif c.use_karras_sigmas or c.use_exponential_sigmas:
            sigma_last = sigmas[-1]  # the schedule's own minimum
        else:
            sigma_last = self.train_sigma_min
        self._install_schedule(timesteps, sigmas, sigma_last, device)
        self.last_sample = None

    def _convert_model_output(self, model_output, sample):
        if self.config.predict_x0:
            return self._data_prediction(model_output, sample)
        return self._noise_prediction(model_output, sample)

    def _linear_system(self, h, rks, order):
        """R (order x order, R_ik = r_k^(i-1)), b (b_i = phi_(i+1)(h) i! / B(h)), h phi_1(h) and B(h); the phi's
        are built by the recursion phi_(k+1) = (phi_k - 1/k!) / h with h phi_1 = e^h - 1 (h -> -h for x_0)."""
        hh = -h if self.config.predict_x0 else h
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if self.config.solver_type == "bh1" else torch.expm1(hh)
        factorial, R, b = 1, [], []
        for i in range(1, order + 1):
            R.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        return torch.stack(R), torch.stack(b), h_phi_1, b_h

    def _uni_update(self, x, order: int, s: int, model_t=None):
        """UniP (model_t None) from x at sigmas[s] to sigmas[s + 1], or UniC: x at sigmas[s] corrected to the
        sample at sigmas[s + 1] given the model output model_t computed there."""
        m = self.model_outputs
        m0 = m[-1]
        alpha_t, sigma_t = vp_alpha_sigma(self.sigmas[s + 1])
        alpha_s0, sigma_s0 = vp_alpha_sigma(self.sigmas[s])
        lambda_s0 = half_log_snr(alpha_s0, sigma_s0)
        h = half_log_snr(alpha_t, sigma_t) - lambda_s0
        # 1. earlier outputs as scaled differences D_k = (m_k - m_s) / r_k
        rks, d1s = [], []
        for k in range(1, order):
            rk = (self._lambda(self.sigmas[s - k]) - lambda_s0) / h
            rks.append(rk)
            d1s.append((m[-(k + 1)] - m0) / rk)
        rks.append(torch.ones(()))
        R, b, h_phi_1, b_h = self._linear_system(h, torch.stack(rks), order)
        # 2. their weights: 1/2 at the lowest order, else the solution of the order conditions
        fixed = order == 2 if model_t is None else order == 1
        if model_t is None and not d1s:
            rhos = None
        elif fixed:
            rhos = torch.ones(1, dtype=x.dtype) * 0.5
        else:
            rhos = torch.linalg.solve(R[:-1, :-1], b[:-1]) if model_t is None else torch.linalg.solve(R, b)
            rhos = rhos.to(x.dtype)
        # 3. the exponential-integrator step plus the weighted differences
        if self.config.predict_x0:
            x_t, scale = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0, alpha_t * b_h
        else:
            x_t, scale = alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0, sigma_t * b_h
        res = 0
        if d1s:
            res = torch.einsum("k,bkc...->bc...", rhos[: len(d1s)].to(x.device), torch.stack(d1s, dim=1))
        if model_t is not None:  # the corrector also uses the new output: D_t = m_t - m_s with the last weight
            res = res + rhos[-1].to(x.device) * (model_t - m0)
        return (x_t - scale * res).to(x.dtype)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        self._begin_step(timestep)
        c, i = self.config, self._step_index
        converted = self._convert_model_output(model_output, sample)
        # 1. UniC: correct the sample we arrived at with the output just computed there
        if i > 0 and (i - 1) not in c.disable_corrector and self.last_sample is not None:
            sample = self._uni_update(self.last_sample, self.this_order, i - 1, model_t=converted)
        self.model_outputs = self.model_outputs[1:] + [converted]
        # 2. order: warm up from 1, lower near the end with lower_order_final
        order = min(c.solver_order, len(self.timesteps) - i) if c.lower_order_final else c.solver_order
        self.this_order = min(order, self.lower_order_nums + 1)
        # 3. UniP: predict the next sample
        self.last_sample = sample
        prev_sample = self._uni_update(sample, self.this_order, i)
        self.lower_order_nums = min(self.lower_order_nums + 1, c.solver_order)
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)
