"""The observer API (minidepth/observers.py): the study tools watch a generation through it and never patch the
pipeline; watching changes no bit of the image; the events come in the documented order.

The no-patching check has two halves: a static one (no module of the package replaces a pipeline method, by name or
by `setattr`) and a run-time one (while the filmstrip and attention recorders watch a generation, no pipeline method
is ever shadowed by an instance attribute).
"""

from __future__ import annotations

import ast
import inspect
import pathlib

import numpy as np
import pytest
import torch
from test_pipeline import photo

from minidepth.inside.attention_maps import record_attention
from minidepth.inside.filmstrip import record_filmstrip
from minidepth.observers import EVENTS
from minidepth.pipeline import StableDiffusionDepth2ImgPipeline

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "minidepth"
PIPELINE_METHODS = {name for name, _ in inspect.getmembers(StableDiffusionDepth2ImgPipeline, callable)
                    if not (name.startswith("__") and name.endswith("__"))}
PROMPT = "a wooden cabin in the snow"
KW = dict(prompt=PROMPT, num_inference_steps=5, output_type="np")


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Log:
    """An observer of every event: (event, keywords) in the order they come."""

    def __init__(self):
        self.events: list[tuple[str, dict]] = []

    def __getattr__(self, name):
        if name not in EVENTS:
            raise AttributeError(name)
        return lambda pipe, **data: self.events.append((name, data))

    def names(self) -> list[str]:
        return [name for name, _ in self.events]


class ShadowCheck(Log):
    """A Log that also notes, at every event, the pipeline methods shadowed by an instance attribute (a patch)."""

    def __init__(self):
        super().__init__()
        self.shadowed: set[str] = set()

    def __getattr__(self, name):
        log = super().__getattr__(name)

        def check(pipe, **data):
            self.shadowed |= {k for k, v in vars(pipe).items() if callable(v) and hasattr(type(pipe), k)}
            log(pipe, **data)
        return check


# ------------------------------------------------------------------------------------------------ no patching
class PatchFinder(ast.NodeVisitor):
    """Places in a module that replace a pipeline method: the old helper `observe_method` (any mention), an attribute
    named like a pipeline method assigned to (`x.denoise = ...`), and `setattr(x, name, ...)` (or `__setattr__`) with
    `name` a pipeline method's name -- written out, or a variable in a function whose strings include one (the pattern
    `for name in ("denoise", "decode"): setattr(pipe, name, wrap(...))`)."""

    def __init__(self):
        self.found: list[tuple[int, str]] = []
        self.scopes: list[ast.AST] = []

    def scan(self, tree: ast.Module) -> list[tuple[int, str]]:
        self.scopes = [tree]
        self.visit(tree)
        return self.found

    def visit_FunctionDef(self, node):
        if node.name == "observe_method":
            self.found.append((node.lineno, "defines observe_method"))
        self.scopes.append(node)
        self.generic_visit(node)
        self.scopes.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Name(self, node):
        if node.id == "observe_method":
            self.found.append((node.lineno, "uses observe_method"))

    def visit_alias(self, node):
        if node.name.split(".")[-1] == "observe_method":
            self.found.append((getattr(node, "lineno", 0), "imports observe_method"))

    def visit_Attribute(self, node):
        if node.attr == "observe_method":
            self.found.append((node.lineno, "uses observe_method"))
        elif isinstance(node.ctx, ast.Store) and node.attr in PIPELINE_METHODS:
            self.found.append((node.lineno, f"assigns {ast.unparse(node)}"))
        self.generic_visit(node)

    def visit_Call(self, node):
        func = node.func
        is_setattr = (isinstance(func, ast.Name) and func.id == "setattr") or \
            (isinstance(func, ast.Attribute) and func.attr == "__setattr__")
        if is_setattr and len(node.args) >= 2:
            name = node.args[1]
            if isinstance(name, ast.Constant):
                if name.value in PIPELINE_METHODS:
                    self.found.append((node.lineno, f"setattr(..., {name.value!r}, ...)"))
            else:
                strings = {n.value for n in ast.walk(self.scopes[-1])
                           if isinstance(n, ast.Constant) and isinstance(n.value, str)}
                named = sorted(strings & PIPELINE_METHODS)
                if named:
                    self.found.append((node.lineno, f"setattr with a variable name, near the names {named}"))
        self.generic_visit(node)


def patches_in(source: str) -> list[tuple[int, str]]:
    return PatchFinder().scan(ast.parse(source))


def test_the_patch_finder_finds_patches():
    """The static check below would find each of these (and not the harmless ones)."""
    assert PIPELINE_METHODS >= {"denoise", "decode", "encode_prompt", "prepare_depth_map", "preprocess", "observing"}
    for source in ["from minidepth.inside._patch import observe_method",
                   "with observe_method(pipe, 'denoise'): pass",
                   "pipe.decode = wrapper",
                   "self.pipe.denoise, x = wrapper, 1",
                   "setattr(pipe, 'encode_prompt', wrapper)",
                   "object.__setattr__(pipe, 'preprocess', wrapper)",
                   "def f(pipe):\n    for key, name in (('d', 'prepare_depth_map'),):\n        setattr(pipe, name, w)"]:
        assert patches_in(source), source
    for source in ["self.sums = x", "object.__setattr__(self, '_regex', r)", "pipe.scheduler = s",
                   "def f(obj, name):\n    setattr(obj, name, 1)", "x = pipe.decode(latents)"]:
        assert not patches_in(source), source


# Assignments the finder cannot tell from a patch by the name alone: (file, what) -> why it is not the pipeline.
NOT_THE_PIPELINE = {
    ("minidepth/cli/serve.py", "assigns component.preprocess"): "a gradio input component's own preprocess",
}


def test_no_module_of_the_package_patches_a_pipeline_method():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE.parent).as_posix()
        for line, what in patches_in(path.read_text()):
            if (name, what) not in NOT_THE_PIPELINE:
                offenders.append(f"{name}:{line}: {what}")
    assert not offenders, "pipeline methods replaced (observe the pipeline instead, minidepth/observers.py):\n" + \
        "\n".join(offenders)


def test_recorders_watch_without_shadowing_a_pipeline_method(pipe):
    check = ShadowCheck()
    with record_filmstrip(pipe, every=2) as film, record_attention(pipe, ["cabin"]) as rec, pipe.observing(check):
        pipe(image=photo(96, 64), generator=torch.Generator().manual_seed(0), **KW)
    assert set(check.names()) == set(EVENTS)  # every event was seen, and checked
    assert check.shadowed == set(), f"pipeline methods shadowed during the generation: {sorted(check.shadowed)}"
    assert film.frames and rec.count > 0
    assert pipe.observers == [] and not any(callable(v) and hasattr(type(pipe), k) for k, v in vars(pipe).items())


# ------------------------------------------------------------------------------------------------ bit-identical
def test_recording_leaves_the_output_bit_identical(pipe):
    exact = pipe.exact
    pipe.set_exact(True)
    try:
        run = lambda: pipe(image=photo(96, 64), generator=torch.Generator().manual_seed(3), **KW).images
        plain = run()
        log = Log()
        with record_filmstrip(pipe, every=1) as film, record_attention(pipe, ["cabin", "snow"]) as rec, \
                pipe.observing(log):
            recorded = run()
        again = run()
    finally:
        pipe.set_exact(exact)
    assert len(film.frames) == 5 and rec.count > 0 and "step_done" in log.names()  # they did record
    assert np.abs(recorded.astype(np.float64) - plain).max() == 0
    assert np.abs(again.astype(np.float64) - plain).max() == 0  # and left nothing behind


# ------------------------------------------------------------------------------------------------ the events
def test_events_come_in_the_documented_order(pipe):
    log = Log()
    with pipe.observing(log) as same:
        assert same is pipe and pipe.observers == [log]
        pipe(image=photo(96, 64), generator=torch.Generator().manual_seed(0), guidance_scale=6.0, **KW)
    assert pipe.observers == []

    stages = [(name, data["stage"]) for name, data in log.events if name.startswith("stage_")]
    assert stages == [(edge, stage) for stage in ("prompt", "depth", "encode", "denoise", "decode")
                      for edge in ("stage_started", "stage_finished")]

    events = [(name, data) for name, data in log.events if not name.startswith("stage_")]
    names = [name for name, _ in events]
    timesteps = dict(events)["denoising_started"]["timesteps"]
    n = len(timesteps)
    assert n > 0
    assert names == ["generation_started", "prompt_encoded", "depth_ready", "image_ready", "latents_ready",
                     "denoising_started"] + ["step_done"] * n + ["decoded"]

    started = dict(events)["generation_started"]
    assert started["prompt"] == PROMPT and started["num_images_per_prompt"] == 1 and started["guidance_scale"] == 6.0
    assert dict(events)["denoising_started"]["guidance_scale"] == 6.0
    steps = [data for name, data in events if name == "step_done"]
    assert [s["index"] for s in steps] == list(range(n))
    assert all(torch.equal(torch.as_tensor(s["timestep"]), torch.as_tensor(t)) for s, t in zip(steps, timesteps))
    assert all(s["model_input"].shape == s["noise_pred"].shape == s["latents"].shape == (1, 4, 8, 12) for s in steps)
    assert dict(events)["decoded"]["output_type"] == "np"

    # every step lies inside the denoise stage
    started, finished = [i for i, (_, data) in enumerate(log.events) if data.get("stage") == "denoise"]
    places = [i for i, name in enumerate(log.names()) if name == "step_done"]
    assert started < min(places) and max(places) < finished


def test_observing_removes_its_observers_and_refuses_non_observers(pipe):
    log = Log()
    with pytest.raises(RuntimeError, match="stop"), pipe.observing(log):
        raise RuntimeError("stop")
    assert pipe.observers == []
    with pytest.raises(TypeError, match="not an observer"):
        with pipe.observing(object()):
            pass
    assert pipe.observers == []
