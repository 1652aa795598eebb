"""What every scheduler shares: the training noise schedule, timestep spacing, sigma schedules, config handling,
step bookkeeping and random draws.

Notation (Ho et al. 2020; Karras et al. 2022): the forward process is
    x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * eps,     alpha_bar_t = prod_{s<=t} (1 - beta_s)
and the same noise level written as a "variance exploding" scale is sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t),
so x_t / sqrt(alpha_bar_t) = x_0 + sigma_t * eps. Schedulers in the k-diffusion family (LMS, Euler, Heun, KDPM2)
walk on sigma; the exponential-integrator family (DPM-Solver, DEIS, UniPC) on
(alpha_t, sigma_t) = (1, sigma) / sqrt(1 + sigma^2) (see families.py).

Every number here follows diffusers 0.42.1 operation by operation (same dtypes, same order of float operations), so
trajectories agree to float rounding. Where diffusers computes in numpy float64 before casting, so do we.
"""

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..noise import randn_tensor  # noqa: F401  (re-exported for the schedulers)

SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
CONFIG_NAME = "scheduler_config.json"


# --------------------------------------------------------------------------------------------------------------------
# Training noise schedule
# --------------------------------------------------------------------------------------------------------------------
def alpha_bar_betas(num_train_timesteps: int, kind: str = "cosine", max_beta: float = 0.999) -> torch.Tensor:
    """Betas discretising a continuous alpha_bar(t), t in [0, 1]: beta_i = 1 - alpha_bar(t_{i+1}) / alpha_bar(t_i).
    "cosine" is Nichol & Dhariwal 2021, eq. (17) (s = 0.008). Computed in float64, returned as float32."""
    if kind == "cosine":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    elif kind == "exp":
        def alpha_bar(t):
            return math.exp(t * -12.0)
    elif kind == "laplace":
        def alpha_bar(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            return math.sqrt(math.exp(lmb) / (1 + math.exp(lmb)))
    else:
        raise ValueError(f"alpha_bar kind {kind!r} is not supported; accepted: 'cosine', 'exp', 'laplace'")
    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(config) -> torch.Tensor:
    """beta_1..beta_T (float32) from a scheduler config: `trained_betas` wins, else `beta_schedule`."""
    n, start, end = config["num_train_timesteps"], config["beta_start"], config["beta_end"]
    if config["trained_betas"] is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
    elif config["beta_schedule"] == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float32)
    elif config["beta_schedule"] == "scaled_linear":  # Stable Diffusion: linear in sqrt(beta)
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
    elif config["beta_schedule"] == "squaredcos_cap_v2":
        betas = alpha_bar_betas(n, "cosine")
    elif config["beta_schedule"] in ("exp", "laplace"):
        betas = alpha_bar_betas(n, config["beta_schedule"])
    elif config["beta_schedule"] == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, n)) * (end - start) + start
    else:  # already rejected by Scheduler._check_config
        raise ValueError(f"beta_schedule={config['beta_schedule']!r} is not supported")
    if config.get("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return betas


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so the last step has zero signal (SNR = 0)."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab -= last
    sqrt_ab *= first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[0:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


# --------------------------------------------------------------------------------------------------------------------
# Inference timesteps and sigma schedules
# --------------------------------------------------------------------------------------------------------------------
def spaced_timesteps(spacing: str, num_train: int, n: int, steps_offset: int = 0, *, solver_grid: bool = False,
                     last: int | None = None) -> np.ndarray:
    """n descending training timesteps (float64, not yet rounded), Lin et al. 2023, Table 2.

    - "leading":  0, k, 2k, ... (k = T // n) reversed, plus `steps_offset` (the SD recipe: 981, 961, ... at n=50);
    - "trailing": T - 1, T - 1 - T/n, ... rounded;
    - "linspace": n points evenly from 0 to T - 1 (not rounded here: the k-diffusion family keeps fractions).
    `solver_grid` is the DPM-Solver/DEIS/UniPC variant: n + 1 points with the final t = 0 dropped, on [0, last).
    """
    last = num_train if last is None else last
    if spacing == "linspace":
        if solver_grid:
            return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy()
        return np.linspace(0, num_train - 1, n)[::-1].copy()
    if spacing == "leading":
        if solver_grid:
            ratio = last // (n + 1)
            return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.float64) + steps_offset
        ratio = num_train // n
        return (np.arange(0, n) * ratio)[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.arange(last, 0, -num_train / n).round() - 1
    raise ValueError(f"timestep_spacing={spacing!r} is not supported; accepted: {', '.join(map(repr, SPACINGS))}")


def train_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for t = 0..T-1 (float32, ascending)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. (5): sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho, rho = 7."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n sigmas evenly spaced in log sigma, from sigma_max down to sigma_min."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: linear interpolation in log sigma between the two neighbouring
    training sigmas (clamped to the table). `log_sigmas` is the float32 table of log training sigmas."""
    sigmas = np.asarray(sigmas)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigmas.shape)


def convert_sigmas(config, kind: str | None, sigmas: np.ndarray, n: int, range_from_config: bool = True):
    """The "karras" or "exponential" schedule spanning the range of `sigmas` (descending); None if kind is None.
    `sigma_min` / `sigma_max` present in the config (even as keys carried over from another class, as diffusers'
    `hasattr(config, ...)` sees them) override the range unless `range_from_config` is False."""
    if kind is None:
        return None
    karras = kind == "karras"
    lo, hi = sigmas[-1].item(), sigmas[0].item()
    if range_from_config or not karras:
        lo = config.get("sigma_min") if config.get("sigma_min") is not None else lo
        hi = config.get("sigma_max") if config.get("sigma_max") is not None else hi
    return karras_sigmas(lo, hi, n) if karras else exponential_sigmas(lo, hi, n)


# --------------------------------------------------------------------------------------------------------------------
# Shared pieces of `step`
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class SchedulerOutput:
    """What `step` returns: x_{t-1} and, where diffusers gives it, the model's current estimate of x_0."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None

    def __getitem__(self, i):  # out[0] works like diffusers' BaseOutput
        if self.pred_original_sample is None:
            return (self.prev_sample,)[i]
        return (self.prev_sample, self.pred_original_sample)[i]


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Saharia et al. 2022 (Imagen), dynamic thresholding: s = the `ratio` quantile of |x0| per sample, clamped to
    [1, max_value]; x0 is clipped to [-s, s] and divided by s."""
    dtype, shape = x0.dtype, x0.shape
    if dtype not in (torch.float32, torch.float64):
        x0 = x0.float()  # quantile needs float32/64
    flat = x0.reshape(shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(shape).to(dtype)


def broadcast_to(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) per-sample scalars -> (B, 1, 1, ...) to multiply a (B, ...) tensor."""
    values = values.flatten()
    return values.reshape(values.shape + (1,) * (like.ndim - 1))


# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------
class SchedulerConfig(dict):
    """A scheduler's settings: a read-only dict with attribute access, like diffusers' `FrozenDict` (so diffusers'
    `from_config` accepts it too).

    It holds every constructor argument, keys passed in but not used (another scheduler's options, `_class_name`,
    `_diffusers_version`; kept so that a config survives a round trip through other classes, as in diffusers) and
    `_use_default_values`: the arguments that took this class's default. A different class built from this config
    uses ITS OWN defaults for those (e.g. SD2-depth's PNDM config has no `timestep_spacing`, so PNDM uses "leading"
    but `EulerDiscreteScheduler.from_config(pndm.config)` uses Euler's "linspace").
    """

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"scheduler config has no {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError("a scheduler config is read-only: build a new one, e.g. "
                             "Scheduler.from_config({**scheduler.config, 'key': value})")

    def _read_only(self, *args, **kwargs):
        raise TypeError("a scheduler config is read-only: build a new one, e.g. "
                        "Scheduler.from_config({**scheduler.config, 'key': value})")

    __setitem__ = __delitem__ = __ior__ = setdefault = pop = popitem = update = clear = _read_only

    def __reduce__(self):  # copy / pickle without going through the blocked methods
        return SchedulerConfig, (dict(self),)

    def __repr__(self):
        return f"SchedulerConfig({dict.__repr__(self)})"

    def replace(self, **changes) -> "SchedulerConfig":
        return SchedulerConfig({**self, **changes})

    def to_json_dict(self, class_name: str | None = None) -> dict:
        """The scheduler_config.json content (`_use_default_values` is not saved, as in diffusers)."""
        out = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.items()}
        out.pop("_use_default_values", None)
        if class_name is not None:
            out["_class_name"] = class_name
        return out


class Scheduler:
    """Base class: config handling, the training noise schedule (`betas`, `alphas_cumprod`), step bookkeeping.

    Subclasses declare `defaults` (constructor argument -> diffusers' default, per class), `choices` (argument ->
    accepted values), `unsupported` (diffusers options minidepth does not implement -> the only accepted value) and
    `aliases` (argument -> {old value: value used}).
    """

    defaults: dict = {}
    choices: dict = {}
    unsupported: dict = {}
    aliases: dict = {}
    order = 1  # model evaluations per scheduler "step" (Heun and KDPM2: 2)
    init_noise_sigma = 1.0  # std of the initial noise; the sigma-based schedulers override it
    missing_timestep_is_last = False  # index lookup of a timestep not in the schedule: error (False) or last index

    def __init__(self, **config):
        unknown = sorted(set(config) - set(self.defaults))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {unknown}; accepted: "
                            f"{sorted(self.defaults)} (use from_config(dict) to ignore unknown keys)")
        values = {**self.defaults, **config}
        defaulted = [k for k in self.defaults if k not in config]
        if defaulted:
            values["_use_default_values"] = defaulted
        self._config = SchedulerConfig(values)
        self._check_config()
        self.betas = make_betas(self._config)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.num_inference_steps = None
        self.timesteps = None
        self._step_index = None
        self._begin_index = None

    # ---- config ----
    @property
    def config(self) -> SchedulerConfig:
        return self._config

    @classmethod
    def from_config(cls, config: Mapping, **overrides):
        """Build from a scheduler_config.json dict or another scheduler's `.config` (any class), as diffusers does:
        unknown keys are kept but unused, missing keys and keys listed in `_use_default_values` take this class's
        defaults, `overrides` win."""
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict or a scheduler's .config, got {type(config).__name__}")
        config = dict(config)
        defaulted = set(config.pop("_use_default_values", []))
        config = {k: v for k, v in config.items() if k not in defaulted}
        scheduler = cls(**{k: v for k, v in {**config, **overrides}.items() if k in cls.defaults})
        carried = {k: v for k, v in config.items() if k not in cls.defaults and k not in overrides}
        if "_class_name" in carried:
            carried["_class_name"] = cls.__name__
        scheduler._config = SchedulerConfig({**scheduler._config, **carried})
        return scheduler

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, subfolder: str | None = None, **overrides):
        """Read `<folder>[/<subfolder>]/scheduler_config.json` (a local folder)."""
        path = os.path.join(folder, subfolder or "", CONFIG_NAME)
        with open(path, encoding="utf-8") as f:
            return cls.from_config(json.load(f), **overrides)

    def to_json_dict(self) -> dict:
        return self._config.to_json_dict(class_name=type(self).__name__)

    def save_config(self, folder: str | os.PathLike) -> str:
        """Write `<folder>/scheduler_config.json` (with `_class_name`); returns its path."""
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_json_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        return path

    save_pretrained = save_config

    def _check_config(self):
        renamed = {k: names[self._config[k]] for k, names in self.aliases.items() if self._config[k] in names}
        if renamed:  # older option names diffusers maps silently (its config then shows the new value too)
            self._config = self._config.replace(**renamed)
        c, name = self._config, type(self).__name__
        for key, accepted in self.choices.items():
            if c[key] not in accepted:
                accepted = ", ".join(map(repr, accepted))
                raise ValueError(f"{name}: {key}={c[key]!r} is not supported; accepted: {accepted}")
        for key, only in self.unsupported.items():
            if c[key] != only:
                raise ValueError(f"{name}: {key}={c[key]!r} is not implemented in minidepth (only {only!r})")
        if sum(bool(c.get(k)) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")) > 1:
            raise ValueError(f"{name}: only one of use_karras_sigmas / use_exponential_sigmas can be True")

    def _check_num_steps(self, num_inference_steps) -> int:
        n, limit = num_inference_steps, self._config["num_train_timesteps"]
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= limit:
            raise ValueError(f"num_inference_steps must be an integer in [1, num_train_timesteps={limit}], got {n!r}")
        return int(n)

    def _sigma_kind(self) -> str | None:
        """"karras" / "exponential" if this class has that option and it is on (a key carried over from another
        class's config does not count, as in diffusers)."""
        for kind in ("karras", "exponential"):
            if f"use_{kind}_sigmas" in self.defaults and self._config[f"use_{kind}_sigmas"]:
                return kind
        return None

    def _spaced_timesteps(self, n: int, **kwargs) -> np.ndarray:
        c = self._config
        return spaced_timesteps(c["timestep_spacing"], c["num_train_timesteps"], n, c["steps_offset"], **kwargs)

    def _require_timesteps(self):
        if self.timesteps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before step()")

    def _begin_step(self, timestep) -> None:
        """Start of step(): schedule set, step index known (from begin_index or by lookup) and inside the schedule."""
        self._require_timesteps()
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= len(self.timesteps):
            raise ValueError(f"{type(self).__name__}.step called past the end of the schedule (step index "
                             f"{self._step_index}, {len(self.timesteps)} timesteps); call set_timesteps again")

    # ---- step bookkeeping: which entry of `timesteps` / `sigmas` the next step uses ----
    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Index of the first step the loop will run (img2img: t_start * order); set after set_timesteps."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Position of `timestep` in the schedule. A timestep listed twice gives the SECOND position (diffusers' rule,
        so that img2img starting in the middle of a duplicated pair does not skip a sigma)."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        found = (schedule == timestep).nonzero()
        if len(found) == 0:
            if self.missing_timestep_is_last:
                return len(self.timesteps) - 1
            raise ValueError(f"timestep {timestep} is not in this scheduler's timesteps {schedule.tolist()}")
        return found[1 if len(found) > 1 else 0].item()

    def _init_step_index(self, timestep) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
        else:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)

    def _step_indices(self, timesteps: torch.Tensor, device) -> list[int]:
        """Schedule positions for add_noise: looked up, or the current / begin index once one is known."""
        if self._begin_index is None:
            schedule = self.timesteps.to(device)
            return [self.index_for_timestep(t, schedule) for t in timesteps.to(device)]
        return [self._step_index if self._step_index is not None else self._begin_index] * timesteps.shape[0]

    # ---- defaults for the discrete-time (alpha_bar) schedulers ----
    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The model input at this step (identity here; the sigma-based schedulers divide by sqrt(sigma^2 + 1))."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process q(x_t | x_0) (Ho et al. 2020, eq. (4)): sqrt(a_bar_t) x_0 + sqrt(1 - a_bar_t) eps."""
        self.alphas_cumprod = self.alphas_cumprod.to(device=original_samples.device)
        alpha_bar = self.alphas_cumprod.to(dtype=original_samples.dtype)[timesteps.to(original_samples.device)]
        return (broadcast_to(alpha_bar**0.5, original_samples) * original_samples
                + broadcast_to((1 - alpha_bar) ** 0.5, original_samples) * noise)

    def __len__(self) -> int:
        return self._config["num_train_timesteps"]

    def __repr__(self):
        return f"{type(self).__name__}({json.dumps(self.to_json_dict(), sort_keys=True, default=str)})"

