"""LoRA layers (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3):

    y = W x + scale · B(A x)        A ("down"): in -> r,   B ("up"): r -> out,   r much smaller than in and out
    scale = adapter weight (set_adapters) × call scale (cross_attention_kwargs["scale"]) × alpha / r

For a convolution (LyCORIS "LoCon") A is a convolution with the layer's own kernel, stride and padding and r output
channels, and B a 1×1 convolution; for a Linear layer both are plain matrices.

How an adapter attaches. There is no wrapper class: the model's own `nn.Linear` / `nn.Conv2d` stays the same object
with the same parameter names. Adding the first adapter to a layer gives it

    layer.lora       an `Adapters` (a ModuleDict name -> LoRA), registered, so `.to(device)` moves it too;
    a forward hook   `_add_updates`: after the layer computed W x + b, add scale · B(A x) for each active adapter,
                     one adapter after the other in activation order (peft's arithmetic: `result = result + B(A(x)) *
                     scaling`, so images match diffusers);
    a state-dict hook that drops the `lora.*` entries, so `save_pretrained` and the key maps see only the original
                     weights.

`remove_adapters(model)` takes all of that away again: the model is then exactly the one before (same modules, no
hooks, no extra attributes). Fusing (`fuse`) adds scale · B A into W itself (for a k×k convolution, B A is the
(out, r) × (r, in·k·k) product reshaped to the kernel), after which the hook adds nothing; `unfuse` puts the original W back.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

LORA_TARGETS = (nn.Linear, nn.Conv2d)


class LoRA(nn.Module):
    """One adapter of one layer: the update B(A x), and the numbers that make its scale."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, down: torch.Tensor, up: torch.Tensor, alpha: float | None,
                 up_bias: torch.Tensor | None = None, rank_stabilised: bool = False):
        super().__init__()
        weight = layer.weight
        # Trainable like peft's (requires_grad also picks torch's matmul path, so results equal peft's to the bit)
        self.down = nn.Parameter(down.to(device=weight.device, dtype=weight.dtype).clone())  # A: (r, in[, k, k])
        self.up = nn.Parameter(up.to(device=weight.device, dtype=weight.dtype).clone())  # B: (out, r[, 1, 1])
        # peft's lora_bias=True: B(A x) + b, the bias scaled with the rest
        self.up_bias = None if up_bias is None else nn.Parameter(up_bias.to(device=weight.device, dtype=weight.dtype))
        self.rank = down.shape[0]
        self.alpha = float(self.rank if alpha is None else alpha)  # no alpha in the file: scale 1 (alpha = rank)
        self.rank_stabilised = rank_stabilised  # rsLoRA (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor")
        self.adapter_weight = 1.0  # set_adapters' weight for this adapter
        self.conv = isinstance(layer, nn.Conv2d)
        self.stride, self.padding = (layer.stride, layer.padding) if self.conv else (None, None)

    def scaling(self, call_scale: float = 1.0) -> float:
        """adapter weight × alpha / r × call scale (rsLoRA: / sqrt(r)), multiplied in peft's order (a Python float)."""
        rank = math.sqrt(self.rank) if self.rank_stabilised else self.rank
        return self.adapter_weight * self.alpha / rank * call_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B(A x): (..., in) -> (..., out) for a Linear layer, (B, in, H, W) -> (B, out, H', W') for a convolution."""
        if self.conv:
            return F.conv2d(F.conv2d(x, self.down, stride=self.stride, padding=self.padding), self.up, self.up_bias)
        return F.linear(F.linear(x, self.down), self.up, self.up_bias)

    def delta_weight(self, scale: float) -> torch.Tensor:
        """scale · B A in the layer's weight shape: what fusing adds to W. Computed in float32."""
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)  # (out, r), (r, in[·k·k])
        return (up @ down).reshape(up.shape[0], *self.down.shape[1:]) * scale


class Adapters(nn.ModuleDict):
    """All adapters of one layer (`layer.lora`), by name, and the state that decides which of them run."""

    def __init__(self):
        super().__init__()
        self.active: list[str] = []          # adapter names, in the order their updates are added
        self.enabled = True                  # disable_lora() / enable_lora()
        self.call_scale = 1.0                # cross_attention_kwargs["scale"] during one forward (`lora_scale`)
        self.fused: dict[str, float] = {}    # adapters added into W by `fuse`, with the scale they were added with
        self.original: torch.Tensor | None = None  # W before fusing (on the CPU), put back by `unfuse`
        self.original_bias: torch.Tensor | None = None  # and the bias, when an adapter with a bias was fused
        self.handles: list = []              # the layer's hooks, removed by `remove_adapters`


def _add_updates(layer: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: `output` is the layer's own W x + b; add scale · B(A x) for each active adapter, in order.
    Nothing when disabled, or when adapters are fused (the updates are then inside W; peft does the same)."""
    adapters: Adapters = layer.lora
    if not adapters.enabled or adapters.fused:
        return output
    x = inputs[0]
    for name in adapters.active:
        if name in adapters:
            lora = adapters[name]
            output = output + lora(x) * lora.scaling(adapters.call_scale)
    return output


def _drop_lora_entries(layer: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict hook: the adapters are not part of the model's weights (save_pretrained, key maps)."""
    for key in [k for k in state_dict if k.startswith(prefix + "lora.")]:
        del state_dict[key]


def _ignore_missing_lora(layer: nn.Module, incompatible_keys) -> None:
    """Load-state-dict hook: loading the model's own weights into a layer with adapters is not an error."""
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if ".lora." not in k]


# ------------------------------------------------------------------------------------------------ one layer
def add_adapter(layer: nn.Module, name: str, down: torch.Tensor, up: torch.Tensor, alpha: float | None,
                up_bias: torch.Tensor | None = None, rank_stabilised: bool = False) -> LoRA:
    """Attach adapter `name` (A = down, B = up [+ B's bias]) to a Linear or Conv2d layer; the first one installs the
    hooks."""
    if not isinstance(layer, LORA_TARGETS):
        raise TypeError(f"LoRA attaches to nn.Linear or nn.Conv2d layers, not {type(layer).__name__}")
    if not isinstance(getattr(layer, "lora", None), Adapters):
        layer.lora = Adapters()
        layer.lora.handles = [layer.register_forward_hook(_add_updates),
                              layer.register_state_dict_post_hook(_drop_lora_entries),
                              layer.register_load_state_dict_post_hook(_ignore_missing_lora)]
    layer.lora[name] = LoRA(layer, down, up, alpha, up_bias, rank_stabilised)
    return layer.lora[name]


def fuse(layer: nn.Module, names: list[str], call_scale: float = 1.0) -> None:
    """W <- W + scale · B A for each named adapter of this layer (scale includes `call_scale`, fuse_lora's lora_scale).
    A copy of W is kept on the CPU so that `unfuse` gives back W exactly (peft subtracts, which rounds)."""
    adapters: Adapters = layer.lora
    for name in names:
        if name in adapters and name not in adapters.fused:
            if adapters.original is None:
                adapters.original = layer.weight.detach().to("cpu", copy=True)
            scale = adapters[name].scaling(call_scale)
            with torch.no_grad():  # in place on the parameter itself: its version changes, which kept transforms see
                layer.weight += adapters[name].delta_weight(scale).to(layer.weight.dtype)
            if adapters[name].up_bias is not None:  # peft: bias += B's bias × scale
                if adapters.original_bias is None:
                    adapters.original_bias = layer.bias.detach().to("cpu", copy=True)
                with torch.no_grad():
                    layer.bias += adapters[name].up_bias.detach() * scale
            adapters.fused[name] = scale


def unfuse(layer: nn.Module) -> None:
    """Undo `fuse`: W is the original again, exactly (the copy taken before fusing)."""
    adapters: Adapters = layer.lora
    with torch.no_grad():
        if adapters.original is not None:
            layer.weight.copy_(adapters.original)
        if adapters.original_bias is not None:
            layer.bias.copy_(adapters.original_bias)
    adapters.fused.clear()
    adapters.original = adapters.original_bias = None


def remove_adapter(layer: nn.Module, name: str | None = None) -> None:
    """Remove adapter `name` (None: all) from a layer. The last one takes the hooks and `layer.lora` with it. Fused
    weights stay fused (as in diffusers: fuse_lora then unload_lora_weights keeps the fused model)."""
    adapters: Adapters = layer.lora
    for n in list(adapters) if name is None else [name]:
        if n in adapters:
            del adapters[n]
            if adapters.fused.pop(n, None) is not None and not adapters.fused:
                adapters.original = adapters.original_bias = None  # unloading keeps the fused weights (as diffusers)
            if n in adapters.active:
                adapters.active.remove(n)
    if len(adapters) == 0:
        for handle in adapters.handles:
            handle.remove()
        del layer.lora


# ------------------------------------------------------------------------------------------------ a whole model
def lora_layers(model: nn.Module | None) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) for every layer of `model` that has adapters."""
    if model is None:
        return
    for name, module in model.named_modules():
        if isinstance(getattr(module, "lora", None), Adapters) and isinstance(module, LORA_TARGETS):
            yield name, module


def remove_adapters(model: nn.Module | None, name: str | None = None) -> None:
    for _, layer in list(lora_layers(model)):
        remove_adapter(layer, name)


@contextlib.contextmanager
def lora_scale(model: nn.Module | None, scale: float | None):
    """Within the block, every adapter of `model` adds its update times `scale` (diffusers' `scale_lora_layers`).
    scale None or 1: nothing to do. The one way a LoRA strength reaches a network: the pipeline runs its text encoder
    and UNet inside it with the call's cross_attention_kwargs["scale"]; a direct call does the same:

        with lora_scale(unet, 0.5):
            noise = unet(x, t, text)
    """
    layers = [layer.lora for _, layer in lora_layers(model)] if scale not in (None, 1.0) else []
    for adapters in layers:
        adapters.call_scale = float(scale)
    try:
        yield
    finally:
        for adapters in layers:
            adapters.call_scale = 1.0
