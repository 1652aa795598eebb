"""Schedulers: step-for-step parity with the live diffusers 0.42.1 classes, plus config handling and errors.

Every scheduler is driven along a trajectory by a deterministic fake denoiser, in both implementations built from the
same config dict (SD2-depth's scheduler_config.json plus the case's options), over a grid of step counts, timestep
spacings, prediction types, Karras sigmas (where the class has them), scheduler-specific options and two starts:
"full" (noise * init_noise_sigma, no begin index: the step index is found by timestep lookup) and "img2img" (strength
0.6: timesteps[t_start * order:], set_begin_index, add_noise, as the depth2img pipeline does). At every step the
timesteps, the scaled model input, x_{t-1} and x_0 (where given) must agree to MAX_ABS_ERROR (fp32). Stochastic steps
use separately seeded generators in each implementation, so equal numbers also mean equal random draws.

Combinations diffusers itself rejects (e.g. PNDM with prediction_type="sample", which diffusers only refuses inside
step()) are checked the other way round: minidepth raises a ValueError up front AND diffusers fails too.

Run `pytest tests/test_schedulers.py -s` to print, per scheduler, the number of trajectories and the largest error.
"""

import copy
import functools
import inspect
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

import minidepth.schedulers as ms

diffusers = pytest.importorskip("diffusers")
# diffusers' numpy-on-torch code emits tens of thousands of numpy 2 DeprecationWarnings; recording them is slow
pytestmark = pytest.mark.filterwarnings("ignore")

SD2_CONFIG = json.loads((Path(__file__).parent / "data/sd2-depth-configs/scheduler_config.json").read_text())
NAMES = list(ms.SCHEDULERS)
STEPS = (1, 2, 3, 10, 50)
SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SHAPE = (2, 4, 8, 8)
MAX_ABS_ERROR = 1e-6
STATS = defaultdict(lambda: [0, 0.0])  # scheduler -> [trajectories, max abs error]

# Scheduler-specific options, each run over the whole grid: (id, config overrides, extra step() kwargs).
# The first entry is the plain scheduler; the others run with "linspace" spacing and Karras sigmas off only, to keep
# the file fast.
VARIANTS = {
    "DDIMScheduler": [("plain", {}, {}), ("eta0.8", {}, {"eta": 0.8}),
                      ("clip+alpha1+zerosnr", {"clip_sample": True, "set_alpha_to_one": True,
                                               "rescale_betas_zero_snr": True}, {"eta": 0.3}),
                      ("threshold", {"thresholding": True, "sample_max_value": 1.5}, {})],
    "DDPMScheduler": [("plain", {}, {}),
                      ("fixed_large+clip", {"variance_type": "fixed_large", "clip_sample": True}, {}),
                      ("small_log+zerosnr", {"variance_type": "fixed_small_log", "rescale_betas_zero_snr": True}, {}),
                      ("threshold", {"thresholding": True, "sample_max_value": 1.5}, {})],
    "PNDMScheduler": [("plain", {}, {}), ("prk", {"skip_prk_steps": False}, {}),
                      ("alpha1", {"set_alpha_to_one": True}, {})],
    "LMSDiscreteScheduler": [("plain", {}, {}), ("exponential", {"use_exponential_sigmas": True}, {})],
    "EulerDiscreteScheduler": [("plain", {}, {}), ("churn", {}, {"s_churn": 1.0}),
                               ("sigma_min+zerosnr",
                                {"final_sigmas_type": "sigma_min", "rescale_betas_zero_snr": True}, {}),
                               ("exponential", {"use_exponential_sigmas": True}, {}),
                               ("log_linear", {"interpolation_type": "log_linear"}, {}),
                               ("continuous", {"timestep_type": "continuous"}, {})],
    "EulerAncestralDiscreteScheduler": [("plain", {}, {}), ("zerosnr", {"rescale_betas_zero_snr": True}, {})],
    "HeunDiscreteScheduler": [("plain", {}, {}), ("clip", {"clip_sample": True}, {})],
    "KDPM2DiscreteScheduler": [("plain", {}, {})],
    "KDPM2AncestralDiscreteScheduler": [("plain", {}, {})],
    "DPMSolverMultistepScheduler": [
        ("plain", {}, {}), ("order3", {"solver_order": 3}, {}), ("heun", {"solver_type": "heun"}, {}),
        ("sde++", {"algorithm_type": "sde-dpmsolver++"}, {}),
        ("sde++order3", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, {}),
        ("dpmsolver", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, {}),
        ("dpmsolver-heun-o3", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_order": 3,
                               "solver_type": "heun"}, {}),
        ("sde-dpmsolver", {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min",
                           "solver_type": "heun"}, {}),
        ("euler_at_final", {"euler_at_final": True, "lower_order_final": False, "final_sigmas_type": "sigma_min"}, {}),
        ("lu+order1", {"use_lu_lambdas": True, "solver_order": 1}, {}),
        ("threshold+zerosnr", {"thresholding": True, "sample_max_value": 1.5, "rescale_betas_zero_snr": True}, {}),
        ("cosine+clipped", {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}, {})],
    "DPMSolverSinglestepScheduler": [
        ("plain", {}, {}), ("order3", {"solver_order": 3}, {}),
        ("order3-heun", {"solver_order": 3, "solver_type": "heun"}, {}),
        ("sde++", {"algorithm_type": "sde-dpmsolver++"}, {}),
        ("sde++order3-heun", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "solver_type": "heun"}, {}),
        ("dpmsolver-o3", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_order": 3}, {}),
        ("sigma_min", {"final_sigmas_type": "sigma_min"}, {})],
    "DEISMultistepScheduler": [("plain", {}, {}), ("order3", {"solver_order": 3}, {}),
                               ("order3-no-lower-final", {"solver_order": 3, "lower_order_final": False}, {}),
                               ("threshold", {"thresholding": True, "sample_max_value": 1.5}, {})],
    "UniPCMultistepScheduler": [("plain", {}, {}), ("order3", {"solver_order": 3}, {}),
                                ("bh1", {"solver_type": "bh1"}, {}),
                                ("noise-pred-o3", {"predict_x0": False, "solver_order": 3}, {}),
                                ("no-corrector", {"disable_corrector": [0, 2]}, {}),
                                ("sigma_min+zerosnr",
                                 {"final_sigmas_type": "sigma_min", "rescale_betas_zero_snr": True}, {})],
}


def fake_denoiser(x: torch.Tensor, t) -> torch.Tensor:
    """A smooth function of the sample and the timestep, standing in for the UNet."""
    return 0.1 * torch.sin(x) + (t / 1000) * torch.cos(x)


def has_option(name: str, option: str) -> bool:
    return option in inspect.signature(getattr(diffusers, name).__init__).parameters


@functools.lru_cache(maxsize=16)
def _constructed(name: str, config_json: str):
    return getattr(diffusers, name).from_config(json.loads(config_json))


@functools.lru_cache(maxsize=16)
def _reference_prototype(name: str, config_json: str, n: int | None):
    scheduler = copy.deepcopy(_constructed(name, config_json))
    if n is not None:
        scheduler.set_timesteps(n)
    return scheduler


def reference(name: str, config: dict, n: int | None = None):
    """A fresh diffusers scheduler, after set_timesteps(n) if n is given. diffusers' KDPM2 takes ~1 s to construct
    and ~50 ms per set_timesteps, so prototypes are cached and copied."""
    return copy.deepcopy(_reference_prototype(name, json.dumps(config, sort_keys=True), n))


@pytest.fixture(scope="module", autouse=True)
def quiet_diffusers():
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    yield
    dlogging.set_verbosity(level)
    if STATS:
        print("\nscheduler parity: trajectories and max abs error over all steps")
        for name, (count, err) in STATS.items():
            print(f"  {name:34s} {count:5d}  {err:.3g}")


def record(key: str, err: float) -> None:
    STATS[key][0] += 1
    STATS[key][1] = max(STATS[key][1], err)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference; non-finite entries (e.g. eps-prediction at zero terminal SNR) must match exactly."""
    if torch.equal(a, b):  # the usual case: bit for bit
        return 0.0
    a, b = a.double(), b.double()
    finite = torch.isfinite(a) & torch.isfinite(b)
    same_nonfinite = (a == b) | (torch.isnan(a) & torch.isnan(b))
    if not bool((finite | same_nonfinite).all()):
        return float("nan")
    return (a[finite] - b[finite]).abs().max().item() if finite.any() else 0.0


def _check(what: str, a: torch.Tensor, b: torch.Tensor, tol: float, where: str) -> float:
    err = _max_err(a, b)
    if not err <= tol:  # also catches NaN
        mean = (a.double() - b.double()).abs().mean().item()
        pytest.fail(f"{where}: {what} differs: max abs {err:.3g}, mean abs {mean:.3g} (tol {tol:g})")
    return err


def run_pair(name: str, config: dict, n: int, mode: str, step_kwargs: dict, tol: float = MAX_ABS_ERROR,
             seed: int = 0) -> float:
    """Drive both implementations along their own trajectories; assert agreement at every step; return max error."""
    ours = getattr(ms, name).from_config(config)
    where = f"{name} {config} N={n} {mode} {step_kwargs}"
    try:
        ours.set_timesteps(n)
    except ValueError:  # e.g. PNDM's PRK warm-up needs N >= 4: diffusers must fail as well
        with pytest.raises(Exception):
            reference(name, config, n)
        return 0.0
    ref = reference(name, config, n)
    assert ours.timesteps.dtype == ref.timesteps.dtype and torch.equal(ours.timesteps, ref.timesteps), \
        f"{where}: timesteps {ours.timesteps.tolist()} != {ref.timesteps.tolist()}"
    assert ours.order == ref.order
    assert float(ours.init_noise_sigma) == float(ref.init_noise_sigma), where
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)

    if mode == "full":
        timesteps = ref.timesteps
        worst = _check("add_noise (timestep lookup)", ours.add_noise(x0, noise, timesteps[:1].repeat(SHAPE[0])),
                       ref.add_noise(x0, noise, timesteps[:1].repeat(SHAPE[0])), tol, where)
        xa, xb = noise * ours.init_noise_sigma, noise * ref.init_noise_sigma
    else:  # img2img as in the depth2img pipeline, strength 0.6
        t_start = n - min(int(n * 0.6), n)
        timesteps = ref.timesteps[t_start * ref.order:]
        assert torch.equal(ours.timesteps[t_start * ours.order:], timesteps)
        if len(timesteps) == 0:
            return 0.0
        for s in (ours, ref):
            if hasattr(s, "set_begin_index"):
                s.set_begin_index(t_start * s.order)
        latent_t = timesteps[:1].repeat(SHAPE[0])
        xa, xb = ours.add_noise(x0, noise, latent_t), ref.add_noise(x0, noise, latent_t)
        worst = _check("add_noise", xa, xb, tol, where)

    ga, gb = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    takes_generator = "generator" in inspect.signature(ref.step).parameters
    for i, t in enumerate(timesteps):
        at = f"{where} step {i} (t={t.item()})"
        ka, kb = dict(step_kwargs), dict(step_kwargs)
        if takes_generator:
            ka["generator"], kb["generator"] = ga, gb
        try:
            ia = ours.scale_model_input(xa, t)
            out_a = ours.step(fake_denoiser(ia, t), t, xa, **ka)
        except (ValueError, IndexError):  # only where diffusers fails too (e.g. stepping past the schedule
            with pytest.raises(Exception):  # after a timestep lookup landed on a duplicated Karras timestep)
                ref.step(fake_denoiser(ref.scale_model_input(xb, t), t), t, xb, **kb)
            STATS["(trajectories where both raise mid-way)"][0] += 1
            return worst
        ib = ref.scale_model_input(xb, t)
        worst = max(worst, _check("scale_model_input", ia, ib, tol, at))
        out_b = ref.step(fake_denoiser(ib, t), t, xb, **kb)
        worst = max(worst, _check("prev_sample", out_a.prev_sample, out_b.prev_sample, tol, at))
        if getattr(out_b, "pred_original_sample", None) is not None:
            worst = max(worst, _check("pred_original_sample", out_a.pred_original_sample,
                                      out_b.pred_original_sample, tol, at))
        xa, xb = out_a.prev_sample, out_b.prev_sample
        assert getattr(ours, "step_index", None) == getattr(ref, "step_index", None) or not hasattr(ref, "step_index")
    return worst


def assert_both_reject(name: str, config: dict, step_kwargs: dict):
    """minidepth refuses `config` with a ValueError; diffusers fails too (at construction or while stepping)."""
    with pytest.raises(ValueError, match=r"not (supported|implemented)|one of|must be"):
        getattr(ms, name).from_config(config)
    with pytest.raises(Exception):
        ref = getattr(diffusers, name).from_config(config)
        ref.set_timesteps(10)
        x = torch.randn(SHAPE) * ref.init_noise_sigma
        kwargs = dict(step_kwargs)
        if "generator" in inspect.signature(ref.step).parameters:
            kwargs["generator"] = torch.Generator().manual_seed(0)
        for t in ref.timesteps:
            x = ref.step(fake_denoiser(ref.scale_model_input(x, t), t), t, x, **kwargs).prev_sample


def _grid():
    for name in NAMES:
        for index, (vid, overrides, step_kwargs) in enumerate(VARIANTS[name]):
            spacings = SPACINGS if index == 0 else ("linspace",)
            for spacing in spacings:
                for prediction in PREDICTIONS:
                    yield pytest.param(name, overrides, step_kwargs, spacing, prediction,
                                       id=f"{name}-{vid}-{spacing}-{prediction}")


@pytest.mark.parametrize("name,overrides,step_kwargs,spacing,prediction", list(_grid()))
def test_trajectory_matches_diffusers(name, overrides, step_kwargs, spacing, prediction):
    # Karras sigmas on and off for the plain scheduler; the option variants run with Karras sigmas off
    plain = VARIANTS[name][0][1] is overrides
    karras_options = (False, True) if has_option(name, "use_karras_sigmas") and plain else (False,)
    for karras in karras_options:
        config = {**SD2_CONFIG, **overrides, "timestep_spacing": spacing, "prediction_type": prediction}
        if karras:
            config["use_karras_sigmas"] = True
        try:
            getattr(ms, name).from_config(config)
        except ValueError:
            assert_both_reject(name, config, step_kwargs)
            continue
        for n in STEPS:
            for mode in ("full", "img2img"):
                record(name, run_pair(name, config, n, mode, step_kwargs))


# ------------------------------------------------------------------------------------------------------------------
# LMS against real scipy quadrature; no scipy at run time
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_lms_coefficients_match_scipy_quad(spacing, karras):
    config = {**SD2_CONFIG, "timestep_spacing": spacing, "use_karras_sigmas": karras}
    ours, ref = ms.LMSDiscreteScheduler.from_config(config), diffusers.LMSDiscreteScheduler.from_config(config)
    worst = 0.0
    for n in (3, 10, 50):
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        for t in range(n):
            order = min(t + 1, 4)
            a = np.array([ours.get_lms_coefficient(order, t, j) for j in range(order)])
            b = np.array([ref.get_lms_coefficient(order, t, j) for j in range(order)])
            worst = max(worst, np.abs(a - b).max() / np.abs(b).max())
            ours.coefficient_rule = "exact"  # the closed-form integral: scipy's float32 integrand noise away
            exact = np.array([ours.get_lms_coefficient(order, t, j) for j in range(order)])
            ours.coefficient_rule = "quadpack"
            assert np.abs(exact - b).max() / np.abs(b).max() <= 1e-6
    # our QUADPACK qk21 replica (same nodes, weights, order, float32 integrand) equals scipy's quad bit for bit
    assert worst == 0, f"LMS coefficients vs scipy quad: max relative difference {worst:.3g}"


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_lms_trajectory_matches_real_diffusers(prediction):
    """Long LMS runs against diffusers with its real scipy quadrature (the grid test covers N <= 50 too)."""
    for spacing in SPACINGS:
        for karras in (False, True):
            config = {**SD2_CONFIG, "timestep_spacing": spacing, "prediction_type": prediction,
                      "use_karras_sigmas": karras}
            for n, mode in ((50, "full"), (10, "img2img")):
                record("LMSDiscreteScheduler vs scipy quad", run_pair("LMSDiscreteScheduler", config, n, mode, {}))


def test_no_scipy_at_run_time():
    code = ("import sys; sys.modules['scipy'] = None\n"
            "import torch, minidepth.schedulers as ms\n"
            "s = ms.LMSDiscreteScheduler(use_karras_sigmas=True); s.set_timesteps(10)\n"
            "x = torch.randn(1, 4, 8, 8) * s.init_noise_sigma\n"
            "for t in s.timesteps: x = s.step(s.scale_model_input(x, t) * 0.1, t, x).prev_sample\n"
            "loaded = [m.split('.')[0] for m in sys.modules if sys.modules[m]]\n"
            "assert torch.isfinite(x).all() and 'scipy' not in loaded\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------------------------------
# Quirks, outputs and random draws
# ------------------------------------------------------------------------------------------------------------------
def test_pndm_duplicated_timestep_quirk():
    s = ms.PNDMScheduler.from_config(SD2_CONFIG)
    s.set_timesteps(50)
    assert s.timesteps[:4].tolist() == [981, 961, 961, 941] and len(s.timesteps) == 51
    assert len(s.timesteps[50 - int(50 * 0.8):]) == 41  # strength 0.8: the loop runs 41 times
    s.set_timesteps(2)
    assert s.timesteps[2 - int(2 * 0.75):].tolist() == [1, 1]


def test_step_signatures_and_tuple_outputs_match_diffusers():
    for name in NAMES:
        ours, ref = getattr(ms, name).from_config(SD2_CONFIG), reference(name, SD2_CONFIG)
        assert list(inspect.signature(ours.step).parameters) == [
            p for p in inspect.signature(ref.step).parameters if p not in ("args", "kwargs")], name
        for s in (ours, ref):
            s.set_timesteps(5)
        t = ref.timesteps[0]
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        kwargs = lambda: {"generator": torch.Generator().manual_seed(3)} if "generator" in inspect.signature(
            ref.step).parameters else {}  # noqa: E731
        a = ours.step(fake_denoiser(x, t), t, x, return_dict=False, **kwargs())
        b = ref.step(fake_denoiser(x, t), t, x, return_dict=False, **kwargs())
        assert isinstance(a, tuple) and len(a) == len(b), name
        for u, v in zip(a, b):
            _check("tuple output", u, v, MAX_ABS_ERROR, name)


def test_schedulers_copy_and_pickle():
    import pickle

    s = ms.UniPCMultistepScheduler.from_config(SD2_CONFIG)
    s.set_timesteps(4)
    for clone in (copy.deepcopy(s), pickle.loads(pickle.dumps(s))):
        assert clone.config == s.config and torch.equal(clone.timesteps, s.timesteps)


def test_randn_tensor_matches_diffusers():
    from diffusers.utils.torch_utils import randn_tensor

    for generator in (lambda: torch.Generator().manual_seed(5),
                      lambda: [torch.Generator().manual_seed(i) for i in range(3)],
                      lambda: [torch.Generator().manual_seed(9)]):
        a = ms.randn_tensor((3, 4, 5, 5), generator=generator(), device=torch.device("cpu"), dtype=torch.float32)
        b = randn_tensor((3, 4, 5, 5), generator=generator(), device=torch.device("cpu"), dtype=torch.float32)
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------------------------
# Config handling
# ------------------------------------------------------------------------------------------------------------------
def _comparable(config) -> dict:
    d = dict(config)
    d["_use_default_values"] = sorted(d.get("_use_default_values", []))
    return d


@pytest.mark.parametrize("source", NAMES)
def test_from_config_round_trip_across_classes(source):
    """`B.from_config(A.from_config(sd2).config)` gives diffusers' config (carried keys, defaults) and timesteps."""
    ours_a, ref_a = getattr(ms, source).from_config(SD2_CONFIG), getattr(diffusers, source).from_config(SD2_CONFIG)
    assert _comparable(ours_a.config) == _comparable(ref_a.config)
    slow = ("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler")  # ~1 s each to build in diffusers
    for target in NAMES:
        if target in slow and source not in ("PNDMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
            continue
        ours_b = getattr(ms, target).from_config(ours_a.config)
        ref_b = getattr(diffusers, target).from_config(ref_a.config)
        assert _comparable(ours_b.config) == _comparable(ref_b.config), f"{source} -> {target}"
        if target not in slow:  # and diffusers accepts our config the same way
            ref_from_ours = getattr(diffusers, target).from_config(ours_a.config)
            assert _comparable(ref_from_ours.config) == _comparable(ref_b.config), f"{source} -> {target} (diffusers)"
        ours_b.set_timesteps(10)
        ref_b.set_timesteps(10)
        assert torch.equal(ours_b.timesteps, ref_b.timesteps), f"{source} -> {target}"


def test_config_is_read_only_and_ignores_unknown_keys(tmp_path):
    config = {**SD2_CONFIG, "not_an_option": 3, "_some_private": "x"}
    s = ms.DDIMScheduler.from_config(config)
    assert s.config.not_an_option == 3 and s.config["steps_offset"] == 1 and s.config.clip_sample is False
    with pytest.raises(AttributeError):
        s.config.steps_offset = 0
    with pytest.raises(TypeError):
        s.config["steps_offset"] = 0
    s.set_timesteps(4)
    ref = diffusers.DDIMScheduler.from_config(config)
    ref.set_timesteps(4)
    assert torch.equal(s.timesteps, ref.timesteps)
    # save -> diffusers loads it; diffusers saves -> we load it
    path = s.save_config(tmp_path / "ours")
    saved = json.loads(Path(path).read_text())
    assert saved["_class_name"] == "DDIMScheduler" and "_use_default_values" not in saved
    assert dict(diffusers.DDIMScheduler.from_pretrained(tmp_path / "ours").config)["steps_offset"] == 1
    ref.save_pretrained(tmp_path / "ref")
    again = ms.scheduler_from_config(json.loads((tmp_path / "ref" / "scheduler_config.json").read_text()))
    assert isinstance(again, ms.DDIMScheduler) and again.config.steps_offset == 1
    assert ms.DDIMScheduler.from_pretrained(tmp_path / "ref").config.clip_sample is False
    # overrides win; our own config is accepted back by every class
    assert ms.EulerDiscreteScheduler.from_config(s.config, use_karras_sigmas=True).config.use_karras_sigmas is True
    assert ms.scheduler_from_config(SD2_CONFIG).__class__ is ms.PNDMScheduler
    assert set(ms.SCHEDULERS) == {c.name for c in diffusers.schedulers.scheduling_utils.KarrasDiffusionSchedulers} - {
        "DPMSolverSDEScheduler", "EDMEulerScheduler"}


def test_singlestep_rewrites_lower_order_final_like_diffusers():
    ours, ref = ms.DPMSolverSinglestepScheduler.from_config({}), diffusers.DPMSolverSinglestepScheduler.from_config({})
    for s in (ours, ref):
        assert s.config.lower_order_final is False
        s.set_timesteps(7)
    assert ours.config.lower_order_final is True and ref.config.lower_order_final is True
    assert ours.order_list == ref.order_list


# ------------------------------------------------------------------------------------------------------------------
# Errors a person can act on
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_bad_arguments_raise_clear_errors(name):
    cls = getattr(ms, name)
    with pytest.raises(ValueError, match="beta_schedule='cubic'.*accepted.*'linear'"):
        cls.from_config({"beta_schedule": "cubic"})
    with pytest.raises(ValueError, match="prediction_type='noise'.*accepted.*'epsilon'"):
        cls.from_config({"prediction_type": "noise"})
    if "timestep_spacing" in cls.defaults:
        with pytest.raises(ValueError, match="timestep_spacing='even'.*accepted.*'leading'"):
            cls.from_config({"timestep_spacing": "even"})
    with pytest.raises(TypeError, match="unexpected arguments.*not_an_option"):
        cls(not_an_option=1)
    s = cls()
    for bad in (0, -3, 1001, 2.5, True, None):
        with pytest.raises(ValueError, match=r"num_inference_steps must be an integer in \[1, num_train_time"):
            s.set_timesteps(bad)
    if name != "DDPMScheduler":  # DDPM steps through all training timesteps without set_timesteps
        with pytest.raises(ValueError, match="set_timesteps"):
            s.step(torch.zeros(SHAPE), torch.tensor(999.0), torch.zeros(SHAPE))


def test_solver_specific_errors():
    with pytest.raises(ValueError, match="algorithm_type='dpm3'.*accepted.*'dpmsolver\\+\\+'"):
        ms.DPMSolverMultistepScheduler(algorithm_type="dpm3")
    with pytest.raises(ValueError, match="final_sigmas_type='zero' is not supported with algorithm_type='dpmsolver'"):
        ms.DPMSolverMultistepScheduler(algorithm_type="dpmsolver")
    with pytest.raises(ValueError, match="use_beta_sigmas=True is not implemented"):
        ms.EulerDiscreteScheduler(use_beta_sigmas=True)
    with pytest.raises(ValueError, match="only one of use_karras_sigmas"):
        ms.HeunDiscreteScheduler(use_karras_sigmas=True, use_exponential_sigmas=True)
    with pytest.raises(ValueError, match="_class_name='FooScheduler'.*accepted.*DDIMScheduler"):
        ms.scheduler_from_config({"_class_name": "FooScheduler"})
    with pytest.raises(ValueError, match="timestep 5.*not in"):
        s = ms.EulerDiscreteScheduler()
        s.set_timesteps(3)
        s.scale_model_input(torch.zeros(SHAPE), torch.tensor(5.0))
    # diffusers' silent renames are kept: the config shows the value used
    assert ms.DPMSolverMultistepScheduler(algorithm_type="deis").config.algorithm_type == "dpmsolver++"
    assert ms.DEISMultistepScheduler(solver_type="midpoint").config.solver_type == "logrho"
