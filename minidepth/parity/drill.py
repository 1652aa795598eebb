"""Drill into one network: which of its modules is the first (in execution order) whose output differs?

    pairs = module_pairs(our_unet, their_unet, keymap)       # our module name -> the reference's module name
    found = first_difference(our_unet, their_unet, run, pairs, tolerance=0.0)

Modules are matched through our checkpoint key maps (`minidepth/checkpoints/`), the same tables that load the
reference's weights into our models: for a module that owns parameters, `keymap.rule_for("<module>.<param>")` names the
reference tensor the parameter is loaded from, and that tensor's name without its last part is the reference's module.
Only modules owning parameters are matched (convolutions, linear layers, norms, embeddings), so the answer is a leaf
such as `up_blocks.0.resnets.0.conv1`: both networks run once on the same inputs with forward hooks on every matched
module, and the first of our modules whose output is off by more than `tolerance` (relative to the reference output's
largest magnitude) is reported. Used by `minidepth.parity` at the first stage that differs; imports no reference
library itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class DrillResult:
    """The outcome of a drill-down: `module` is the reference's name of the first differing module (None if every
    matched module agreed: then the difference comes from code between modules, e.g. attention or an activation)."""
    network: str                  # "unet", "vae", "text_encoder", "depth_estimator"
    stage: str                    # the stage whose difference started the drill
    module: str | None = None     # the reference's module name, e.g. "up_blocks.0.resnets.0.conv1"
    our_module: str | None = None  # our name for the same module (often the same)
    shape: tuple = ()
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0
    compared: int = 0             # module outputs compared before stopping
    matched: int = 0              # modules matched through the key map
    note: str = ""

    def summary(self) -> str:
        if self.module is None:
            return (f"{self.network}: no module output differs ({self.compared} outputs of {self.matched} matched "
                    f"modules compared){'; ' + self.note if self.note else ''}")
        ours = f" (ours: {self.our_module})" if self.our_module != self.module else ""
        return (f"{self.network}: {self.module}{ours}, max abs {self.max_abs_diff:.3g}, "
                f"max rel {self.max_rel_diff:.3g}")

    def to_dict(self) -> dict:
        return {"network": self.network, "stage": self.stage, "module": self.module, "our_module": self.our_module,
                "shape": list(self.shape), "max_abs_diff": self.max_abs_diff, "max_rel_diff": self.max_rel_diff,
                "compared": self.compared, "matched": self.matched, "note": self.note}


def differences(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |ours - ref|, that / max |ref|) in float64. NaN or inf anywhere gives inf (never "within tolerance"),
    unless both hold the same non-finite values at the same places."""
    a, b = ours.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    same_nonfinite = (~torch.isfinite(a) | ~torch.isfinite(b)) & ((a == b) | (a.isnan() & b.isnan()))
    diff = torch.where(same_nonfinite, torch.zeros_like(a), (a - b).abs())
    max_abs = float(diff.max()) if diff.numel() else 0.0
    if math.isnan(max_abs):  # NaN on one side only
        max_abs = float("inf")
    finite = b[torch.isfinite(b)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return max_abs, max_rel


def module_pairs(ours: torch.nn.Module, ref: torch.nn.Module, keymap) -> dict[str, str]:
    """Our module name -> the reference's, for every module of ours that owns parameters and whose parameters all
    load from one reference module (rules that split or fuse tensors, like a fused qkv, are left out)."""
    ref_modules = dict(ref.named_modules())
    pairs = {}
    for name, module in ours.named_modules():
        params = [p for p, _ in module.named_parameters(recurse=False)]
        targets = set()
        for p in params:
            try:
                rule, sources = keymap.rule_for(f"{name}.{p}" if name else p)
            except KeyError:
                break
            if rule.transform != "copy" or len(sources) != 1 or "." not in sources[0]:
                break
            target, param = sources[0].rsplit(".", 1)
            held = ref_modules.get(target)
            if held is None or param not in dict(held.named_parameters(recurse=False)):
                break
            targets.add(target)
        else:
            if len(targets) == 1:
                pairs[name] = targets.pop()
    return pairs


class _Stop(Exception):
    """Raised from a forward hook to end our network's run at the first differing module."""


def _tensor(output):
    while isinstance(output, (tuple, list)) and output:
        output = output[0]
    return output if isinstance(output, torch.Tensor) else None


def first_difference(ours: torch.nn.Module, ref: torch.nn.Module, run: Callable[[torch.nn.Module], object],
                     pairs: dict[str, str], *, tolerance: float, network: str, stage: str) -> DrillResult:
    """Run `run(ref)` with hooks recording every paired module's outputs, then `run(ours)` comparing each paired
    module's output, call by call, with the reference's; stop at the first one beyond `tolerance` (relative)."""
    result = DrillResult(network=network, stage=stage, matched=len(pairs))
    recorded: dict[str, list[torch.Tensor | None]] = {name: [] for name in set(pairs.values())}
    ref_modules, our_modules = dict(ref.named_modules()), dict(ours.named_modules())

    def record(name):
        def hook(module, inputs, output):
            t = _tensor(output)
            recorded[name].append(None if t is None else t.detach().clone())
        return hook

    handles = [ref_modules[name].register_forward_hook(record(name)) for name in recorded]
    try:
        with torch.no_grad():
            run(ref)
    finally:
        for h in handles:
            h.remove()

    calls = {name: 0 for name in pairs}

    def compare(our_name):
        def hook(module, inputs, output):
            ref_name = pairs[our_name]
            k = calls[our_name]
            calls[our_name] += 1
            theirs = recorded[ref_name][k] if k < len(recorded[ref_name]) else None
            t = _tensor(output)
            if t is None or theirs is None or t.shape != theirs.shape:
                return  # not comparable (the reference computes it differently, or fewer times)
            result.compared += 1
            max_abs, max_rel = differences(t, theirs)
            if max_rel > tolerance:
                result.module, result.our_module, result.shape = ref_name, our_name, tuple(t.shape)
                result.max_abs_diff, result.max_rel_diff = max_abs, max_rel
                raise _Stop
        return hook

    handles = [our_modules[name].register_forward_hook(compare(name)) for name in pairs]
    try:
        with torch.no_grad():
            run(ours)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if result.module is None and result.compared:
        result.note = "the difference comes from computation between the matched modules (attention, activations)"
    return result
