"""Stage-by-stage parity against diffusers: run minidepth and the reference on the same inputs and compare every stage.

    report = minidepth.parity.compare("weights/sd2-depth", image="photo.jpg", prompt="a red house", steps=4)
    print(report.table())          # stage, shape, max abs, max rel, tolerance, ok
    report.ok, report.first_failure, report.drill

Both pipelines run their real `__call__` once, on the same photo and arguments (`output_type="pt"`), each with a
`torch.Generator` seeded alike (so the posterior sample, the img2img noise and a stochastic scheduler's draws line
up), and minidepth in exact mode (`pipe.set_exact(True)`, diffusers' kernels) unless `fast=True`. Nothing is
replayed: each side runs on its own previous outputs, so differences accumulate as in a real run, and a mistake in
our `__call__` or a change in diffusers' loop shows. trace.py records the stages: token ids, text embeddings, the
DPT's input and depth estimate, the depth channel, the image tensor, the posterior sample, the img2img noise, the
noised latents, each denoising step's UNet output and latents, and the decoded image (in [0, 1]) -- minidepth
through its observer API and forward hooks, diffusers through `callback_on_step_end`, forward hooks and recording
subclasses of its scheduler and image processor classes (its `add_noise` / `preprocess` are not replaced).

A stage is within tolerance when max |ours - ref| <= tolerance * max |ref| (`max_rel_diff`). Default tolerances
(`default_tolerance`): 0 (exact) on the CPU in every dtype, where both libraries call the same kernels in the same
order; on GPUs 1e-4 in fp32 and 1e-2 in fp16/bf16. At the first stage beyond tolerance, `drill.py` reruns that
network on both sides (on the inputs our run gave it) with hooks and names the first module whose output differs;
a stage computed outside the networks (the guidance, a scheduler step) has no drill-down.

diffusers and transformers are needed only here (`pip install "minidepth[parity]"`); the command is in cli/parity.py.
"""

from __future__ import annotations

import gc
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .drill import DrillResult, differences, first_difference, module_pairs
from .trace import DTYPES, Trace, trace_diffusers, trace_minidepth

INSTALL = 'pip install "minidepth[parity]"'
REFERENCE_VERSIONS = {"diffusers": "0.42.1", "transformers": "5.24.0"}


class ReferenceMissing(ImportError):
    """diffusers or transformers cannot be imported."""


def require_references() -> dict[str, str]:
    """Import the reference libraries; their versions, or ReferenceMissing with the install command."""
    try:
        import diffusers
        import transformers
    except ImportError as e:
        missing = e.name or "diffusers or transformers"
        raise ReferenceMissing(f"{missing} is not installed, and the parity check runs diffusers and transformers as "
                               f"its reference; install them with: {INSTALL}") from e
    return {"diffusers": diffusers.__version__, "transformers": transformers.__version__}


def quiet_loading() -> None:
    """No "Loading pipeline components" / "Loading weights" progress bars from the references (the CLI's table)."""
    import diffusers
    import transformers
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def default_tolerance(device: str, dtype: str) -> float:
    """Allowed max relative difference per stage: exact on the CPU; on an accelerator, 1e-4 in fp32, 1e-2 in half."""
    if torch.device(device).type == "cpu":
        return 0.0
    return 1e-4 if dtype == "fp32" else 1e-2


# ------------------------------------------------------------------------------------------------ the report
@dataclass
class Stage:
    name: str
    shape: tuple
    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    ok: bool
    network: str | None = None    # the network that computes this stage (where a drill-down looks)

    def to_dict(self) -> dict:
        def num(x):
            return x if math.isfinite(x) else str(x)
        return {"name": self.name, "shape": list(self.shape), "max_abs_diff": num(self.max_abs_diff),
                "max_rel_diff": num(self.max_rel_diff), "tolerance": self.tolerance, "ok": self.ok}


@dataclass
class ParityReport:
    stages: list[Stage]
    settings: dict
    versions: dict
    drill: DrillResult | None = None
    images: tuple = field(default=(), repr=False)   # (ours, reference) decoded images, (B, 3, H, W) in [0, 1]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.stages)

    @property
    def first_failure(self) -> Stage | None:
        return next((s for s in self.stages if not s.ok), None)

    def table(self) -> str:
        width = max(len(s.name) for s in self.stages) + 2
        lines = [f"{'stage':<{width}}{'shape':<18}{'max abs':>10}{'max rel':>10}{'tolerance':>11}  ok"]
        for s in self.stages:
            shape = "x".join(map(str, s.shape))
            lines.append(f"{s.name:<{width}}{shape:<18}{s.max_abs_diff:>10.3g}{s.max_rel_diff:>10.3g}"
                         f"{s.tolerance:>11.3g}  {'yes' if s.ok else 'NO'}")
        return "\n".join(lines)

    def summary(self) -> str:
        failed = [s for s in self.stages if not s.ok]
        if not failed:
            return f"all {len(self.stages)} stages within tolerance"
        text = f"{len(failed)} of {len(self.stages)} stages beyond tolerance; the first: {failed[0].name}"
        if self.drill is not None:
            text += f"\nfirst differing module: {self.drill.summary()}"
        elif failed[0].network is None:
            text += " (computed outside the networks: scheduler or tensor arithmetic; no drill-down)"
        return text

    def to_dict(self) -> dict:
        first = self.first_failure
        return {"stages": [s.to_dict() for s in self.stages], "ok": self.ok,
                "first_failure": first.name if first else None,
                "drill": self.drill.to_dict() if self.drill else None, "settings": self.settings,
                "versions": self.versions}

    def save_json(self, path: str | os.PathLike) -> None:
        _write_atomic(Path(path), (json.dumps(self.to_dict(), indent=2) + "\n").encode())

    def save_diff(self, path: str | os.PathLike) -> float:
        """A heat map PNG of |ours - reference| for the image stage (the largest over the colour channels of the
        first image; black 0, through red and yellow, to white at the largest difference). Returns that largest
        difference (the map is all black when it is 0)."""
        import io

        import numpy as np
        from PIL import Image
        ours, ref = self.images
        diff = (ours[0].detach().double().cpu() - ref[0].detach().double().cpu()).abs().amax(dim=0).numpy()  # (H, W)
        top = float(diff.max())
        t = diff / top if top > 0 else diff
        stops = np.array([0.0, 0.35, 0.7, 1.0])
        ramp = np.array([[0, 0, 0], [200, 0, 0], [255, 210, 0], [255, 255, 255]], dtype=np.float64)
        rgb = np.stack([np.interp(t, stops, ramp[:, c]) for c in range(3)], axis=-1).round().astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(rgb, "RGB").save(buffer, format="PNG")
        _write_atomic(Path(path), buffer.getvalue())
        return top


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ compare
def _keymap(network: str, ours: torch.nn.Module, ref: torch.nn.Module):
    """Our key map for the reference's naming of this network (e.g. transformers 5's CLIP names)."""
    from ..checkpoints.pretrained import folder_format
    return folder_format(type(ours)).keymap_for(list(ref.state_dict()))


def load_ours(model, dtype: str, device: str):
    """minidepth's pipeline: a folder is loaded, an already loaded pipeline is used as it is."""
    from ..pipeline import StableDiffusionDepth2ImgPipeline
    pipe = model
    if isinstance(model, (str, os.PathLike)):
        pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(model, torch_dtype=DTYPES[dtype], device=device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_reference(model, dtype: str, device: str):
    """diffusers' pipeline: a folder is loaded, an already loaded pipeline is used as it is."""
    pipe = model
    if isinstance(model, (str, os.PathLike)):
        from diffusers import StableDiffusionDepth2ImgPipeline as Reference
        pipe = Reference.from_pretrained(model, dtype=DTYPES[dtype]).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipelines(model, reference_model, dtype: str, device: str):
    """(minidepth pipeline, diffusers pipeline): folders are loaded, already loaded pipelines are used as they are."""
    return (load_ours(model, dtype, device),
            load_reference(reference_model if reference_model is not None else model, dtype, device))


def _set_scheduler(pipe, library, name: str | None) -> None:
    """`name`: a `minidepth generate --scheduler` name (e.g. "dpm++2m-karras") or a class name; None keeps the
    checkpoint's own. Each side gets that class of its `library` (minidepth.schedulers or diffusers) from its own
    checkpoint's scheduler config with the same overrides, so both run the same schedule."""
    if name is None:
        return
    import diffusers

    from .. import schedulers
    from ..schedulers.names import SCHEDULERS
    cls, overrides = SCHEDULERS.get(name, (name, {}))
    if not hasattr(schedulers, cls) or not hasattr(diffusers, cls):
        raise ValueError(f"unknown scheduler {name!r}; one of: {', '.join(SCHEDULERS)}")
    pipe.scheduler = getattr(library, cls).from_config({**dict(pipe.scheduler.config), **overrides})


def _compare_traces(ours: Trace, ref: Trace, tolerance: float) -> list[Stage]:
    """One Stage per recorded name, in our order (a stage missing on one side, or of another shape, fails)."""
    stages = []
    for name in [*ours.stages, *(n for n in ref.stages if n not in ours.stages)]:
        a, b = ours.stages.get(name), ref.stages.get(name)
        shape = tuple((a if a is not None else b).shape)
        if a is None or b is None or a.shape != b.shape:
            stages.append(Stage(name, shape, math.inf, math.inf, tolerance, False, ours.networks.get(name)))
            continue
        max_abs, max_rel = differences(a, b)
        stages.append(Stage(name, shape, max_abs, max_rel, tolerance, max_rel <= tolerance, ours.networks.get(name)))
    return stages


def compare(model, reference_model=None, *, image, prompt: str, negative_prompt: str | None = None,
            steps: int = 10, strength: float = 0.8, guidance_scale: float = 7.5, eta: float = 0.0,
            scheduler: str | None = None, seed: int = 0, dtype: str = "fp32", device: str = "cpu",
            tolerance: float | None = None, drill: bool = True, fast: bool = False) -> ParityReport:
    """Run minidepth on `model` and diffusers on `reference_model` (default: `model`) with the same inputs and
    generators, compare every stage (see the module docstring), drill into the network of the first stage beyond
    `tolerance` (default: `default_tolerance(device, dtype)`). `model` / `reference_model`: a checkpoint folder or an
    already loaded pipeline; `image`: a path or a PIL image. minidepth runs in exact mode (`pipe.set_exact(True)`,
    diffusers' kernels) unless `fast=True`: then with its default fast CPU kernels, and a default tolerance of 1e-3."""
    import PIL.Image

    from ..image_processing import to_rgb
    versions = require_references()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if tolerance is None:
        tolerance = max(default_tolerance(device, dtype), 1e-3 if fast else 0.0)
    photo = to_rgb(PIL.Image.open(image) if isinstance(image, (str, os.PathLike)) else image)
    reference_model = model if reference_model is None else reference_model
    name = lambda x: str(x) if isinstance(x, (str, os.PathLike)) else type(x).__name__
    s = {"model": name(model), "reference_model": name(reference_model),
         "prompt": prompt, "negative_prompt": negative_prompt, "steps": steps,
         "strength": strength, "guidance_scale": guidance_scale, "eta": eta,
         "scheduler": scheduler, "seed": seed, "dtype": dtype, "device": device,
         "size": list(photo.size), "tolerance": tolerance, "kernels": "fast" if fast else "exact"}
    # One pipeline in memory at a time when the tool loads them (two official-size pipelines are 11 GB): each is
    # traced, and a loaded one is dropped before the next loads; given pipelines are used and kept as they are.
    import diffusers

    from .. import schedulers
    traces, pipes = [], {}
    for side, (load, tracer, library, source) in {
            "ours": (load_ours, trace_minidepth, schedulers, model),
            "ref": (load_reference, trace_diffusers, diffusers, reference_model)}.items():
        pipe = load(source, dtype, device)
        saved_scheduler, saved_exact = pipe.scheduler, getattr(pipe, "exact", None)
        if side == "ours":
            pipe.set_exact(not fast)  # exact: diffusers' kernels, so that every stage can be bit-identical
        _set_scheduler(pipe, library, scheduler)
        if side == "ref":
            s["scheduler"] = scheduler or type(pipe.scheduler).__name__
        try:
            traces.append(tracer(pipe, photo, s, torch.Generator(device).manual_seed(seed)))
        finally:
            pipe.scheduler = saved_scheduler  # given pipelines keep their own schedulers (and kernel mode)
            if side == "ours":
                pipe.set_exact(saved_exact)
        if not isinstance(source, (str, os.PathLike)):
            pipes[side] = pipe
        del pipe
        gc.collect()
    stages = _compare_traces(*traces, tolerance)
    report = ParityReport(stages, s, versions, images=(traces[0].stages["image"], traces[1].stages["image"]))
    first = report.first_failure
    if drill and first is not None and first.network is not None:  # (re)load what a loaded side dropped
        ours = pipes.get("ours") or load_ours(model, dtype, device)
        ref = pipes.get("ref") or load_reference(reference_model, dtype, device)
        net_ours, net_ref = getattr(ours, first.network), getattr(ref, first.network)
        pairs = module_pairs(net_ours, net_ref, _keymap(first.network, net_ours, net_ref))
        report.drill = first_difference(net_ours, net_ref, traces[0].reruns[first.name], pairs,
                                        tolerance=tolerance, network=first.network, stage=first.name)
    return report
