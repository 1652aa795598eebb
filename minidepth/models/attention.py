"""Multi-head attention: the one place where every attention product in minidepth is computed.

    Attention(x, context) = to_out( softmax(Q K^T / sqrt(d)) V ),   Q = to_q(x), K = to_k(context), V = to_v(context)

(Vaswani et al. 2017, eq. 1, with h heads of size d). Without `context` it is self-attention (context = x).
Every attention in minidepth is this module: the UNet's spatial transformers (self and cross), the VAE's mid-blocks,
the text encoder's causal self-attention (`causal=True`: token t sees tokens 0..t) and the DPT's ViT blocks.

How the product is computed is an explicit per-layer setting, never global state:

    "sdpa"     torch.nn.functional.scaled_dot_product_attention (default; what diffusers uses, AttnProcessor2_0)
    "math"     softmax(Q K^T / sqrt(d)) V written out; with `upcast=True` scores and softmax run in float32
               (diffusers' `upcast_attention`), useful for float16
    "sliced"   the "math" product over slices of the (batch * heads) axis, `slice_size` rows at a time, to save memory
               (diffusers' `enable_attention_slicing` / SlicedAttnProcessor). slice_size: an int, "auto" = heads // 2
               (at least 1) or "max" = 1
    "xformers" xformers.ops.memory_efficient_attention (only when xformers is installed)

Use `set_attention_backend(model, ...)` to switch every layer of a model at once.

Research hook. Each layer may hold a `processor`, a callable

    processor(attn: Attention, q, k, v, **cross_attention_kwargs) -> out    # q (B h L d), k v (B h S d) -> (B h L d)

that replaces the product (it can call `attn.attend(q, k, v)` for the configured backend, or `attn.probs(q, k)` to
see the weights, causal and padding masks applied). It receives the `cross_attention_kwargs` dict given to the UNet's
forward, and `key_mask` (B, S) when the caller passed one (the text encoder with an attention mask). Each layer knows
its dotted `name` inside the model and whether it `is_cross_attention`, so `set_attention_processor(model, fn,
filter=...)` can pick layers. `CaptureAttentionMaps` is a ready-made processor that records the attention probabilities.

Shapes: B batch, L query tokens, S context tokens, D model width, h heads, d head size.
"""

from __future__ import annotations

import fnmatch
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

BACKENDS = ("sdpa", "math", "sliced", "xformers")


# ------------------------------------------------------------------------------------------------ the products
def attention_probs(q: torch.Tensor, k: torch.Tensor, upcast: bool = False,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) over the context axis: (..., L, d), (..., S, d) -> (..., L, S), in q's dtype.
    `mask` (broadcastable to (..., L, S), True = may attend) sets the scores of hidden keys to -inf."""
    dtype = q.dtype
    if upcast:
        q, k = q.float(), k.float()
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (..., L, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1).to(dtype)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, upcast: bool = False,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """The attention product written out (Vaswani et al. 2017, eq. 1): (..., L, d) -> (..., L, d)."""
    return attention_probs(q, k, upcast, mask) @ v


def sliced_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slice_size: int,
                     upcast: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`math_attention` over slices of the flattened (batch * heads) axis: peak memory is one slice's score matrix."""
    batch, heads = q.shape[:2]
    q, k, v = (rearrange(t, "B h L d -> (B h) L d") for t in (q, k, v))
    if mask is not None:  # (B or 1, 1, L, S) -> ((B h), L, S)
        mask = rearrange(mask.expand(batch, heads, *mask.shape[-2:]), "B h L S -> (B h) L S")
    out = torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)
    for start in range(0, q.shape[0], slice_size):
        rows = slice(start, start + slice_size)
        out[rows] = math_attention(q[rows], k[rows], v[rows], upcast, None if mask is None else mask[rows])
    return rearrange(out, "(B h) L d -> B h L d", B=batch)


def _import_xformers():
    try:
        import xformers.ops
    except ImportError as e:
        raise ImportError("attention backend 'xformers' needs the xformers package, which is not installed. "
                          "Install a build matching your torch and CUDA (`pip install xformers`, see "
                          "https://github.com/facebookresearch/xformers), or use backend='sdpa'.") from e
    return xformers.ops


def xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    ops = _import_xformers()
    q, k, v = (rearrange(t, "B h L d -> B L h d") for t in (q, k, v))  # xformers' layout
    bias = ops.LowerTriangularMask() if causal else None
    return rearrange(ops.memory_efficient_attention(q, k, v, attn_bias=bias), "B L h d -> B h L d")


# ------------------------------------------------------------------------------------------------ the module
class Attention(nn.Module):
    """Multi-head (self- or cross-) attention.  x: (B, L, D), context: (B, S, Dc) -> (B, L, D).

    query_dim D, heads h, head_dim d (inner width h*d), context_dim Dc (None: self-attention, context = x).
    `to_q/to_k/to_v` have a bias only when `qkv_bias` (the UNet's have none; the VAE's, CLIP's and the DPT's have one);
    `to_out` always has one. `causal=True`: query t attends to keys 0..t only (the text encoder).
    """

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None,
                 qkv_bias: bool = False, causal: bool = False):
        super().__init__()
        for arg, value in (("query_dim", query_dim), ("heads", heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Attention: {arg} must be a positive int, got {value!r}")
        self.heads, self.head_dim = heads, head_dim
        self.is_cross_attention = context_dim is not None
        self.causal = causal
        inner = heads * head_dim
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, query_dim)
        self.name = ""  # dotted name inside the model, filled by `name_attention_layers`
        self.backend, self.slice_size, self.upcast = "sdpa", None, False
        self.processor: Callable | None = None

    def set_backend(self, backend: str = "sdpa", slice_size: int | str | None = None, upcast: bool = False) -> None:
        """Choose how the attention product is computed (see the module docstring)."""
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        if backend != "sliced" and slice_size is not None:
            raise ValueError(f"slice_size is only used by backend='sliced', got slice_size={slice_size!r} "
                             f"with backend={backend!r}")
        if upcast and backend not in ("math", "sliced"):
            raise ValueError(f"upcast=True is only implemented by the 'math' and 'sliced' backends, got {backend!r}")
        if backend == "xformers":
            _import_xformers()
        if backend == "sliced":
            slice_size = "auto" if slice_size is None else slice_size
            if slice_size == "auto":  # diffusers: heads // 2, which is 0 (a crash) for one head; we use at least 1
                slice_size = max(1, self.heads // 2)
            elif slice_size == "max":
                slice_size = 1
            elif isinstance(slice_size, bool) or not isinstance(slice_size, int) or slice_size < 1:
                raise ValueError(f"slice_size must be a positive int, 'auto' or 'max', got {slice_size!r}")
        self.backend, self.slice_size, self.upcast = backend, slice_size, bool(upcast)

    def mask(self, q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """Which keys each query may see, True = visible: (1 or B, 1, L, S), or None when all are.
        The causal mask (L, S lower triangle) and/or a padding mask `key_mask` (B, S) over the keys."""
        mask = None
        if self.causal:
            mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()[None, None]
        if key_mask is not None:
            keys = key_mask.to(device=q.device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, S)
            mask = keys if mask is None else mask & keys
        return mask

    def probs(self, q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None = None,
              upcast: bool | None = None) -> torch.Tensor:
        """This layer's attention weights softmax(Q K^T / sqrt(d)), masks applied: (B h L S)."""
        return attention_probs(q, k, self.upcast if upcast is None else upcast, self.mask(q, k, key_mask))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The attention product with this layer's backend: (B h L d), (B h S d), (B h S d) -> (B h L d)."""
        if self.backend == "sdpa":
            if key_mask is None:  # a causal layer lets SDPA build its own mask (what transformers' CLIP does)
                return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(q, k, key_mask))
        if self.backend == "math":
            return math_attention(q, k, v, self.upcast, self.mask(q, k, key_mask))
        if self.backend == "sliced":
            return sliced_attention(q, k, v, self.slice_size, self.upcast, self.mask(q, k, key_mask))
        if key_mask is not None:
            raise ValueError("the 'xformers' attention backend takes no padding mask; use backend='sdpa'")
        return xformers_attention(q, k, v, self.causal)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                cross_attention_kwargs: dict | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D), context (B, S, Dc) or None, key_mask (B, S) bool or None (True = a real token) -> (B, L, D)."""
        context = x if context is None else context
        q = rearrange(self.to_q(x), "B L (h d) -> B h L d", h=self.heads)
        k = rearrange(self.to_k(context), "B S (h d) -> B h S d", h=self.heads)
        v = rearrange(self.to_v(context), "B S (h d) -> B h S d", h=self.heads)
        kwargs = cross_attention_kwargs or {}
        if self.processor is not None:
            out = self.processor(self, q, k, v, **kwargs, **({} if key_mask is None else {"key_mask": key_mask}))
        else:
            if kwargs:  # like diffusers: keys nobody reads are ignored with a warning (Python shows it once)
                warnings.warn(f"cross_attention_kwargs {sorted(kwargs)} are ignored: no attention processor is set "
                              "(see minidepth.models.attention.set_attention_processor)", UserWarning)
            out = self.attend(q, k, v, key_mask)
        return self.to_out(rearrange(out, "B h L d -> B L (h d)"))

    def extra_repr(self) -> str:
        kind = "cross" if self.is_cross_attention else "causal self" if self.causal else "self"
        return f"{kind}, heads={self.heads}, head_dim={self.head_dim}, backend={self.backend!r}"


# ------------------------------------------------------------------------------------------------ model-wide switches
def name_attention_layers(model: nn.Module) -> list[Attention]:
    """Record each Attention's dotted name inside `model` (e.g. "down_blocks.0.attentions.1.transformer_blocks.0.attn2")
    and return the layers in module order."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            module.name = name
            layers.append(module)
    return layers


def set_attention_backend(model: nn.Module, backend: str = "sdpa", slice_size: int | str | None = None,
                          upcast: bool = False) -> nn.Module:
    """Set the attention backend of every Attention inside `model` (see the module docstring). Returns `model`."""
    layers = name_attention_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} contains no minidepth Attention layers")
    for layer in layers:
        layer.set_backend(backend, slice_size, upcast)
    return model


def set_attention_processor(model: nn.Module, processor: Callable | None,
                            filter: str | Callable[[Attention], bool] | None = None) -> list[str]:
    """Give `processor` (None: remove it) to the Attention layers of `model` selected by `filter`:
    None = all layers, a glob on the dotted name (e.g. "*attn2", "up_blocks.*"), or a predicate, e.g.
    `lambda attn: attn.is_cross_attention`. Returns the names of the layers that were set."""
    if processor is not None and not callable(processor):
        raise TypeError(f"processor must be callable or None, got {type(processor).__name__}")
    if filter is None:
        chosen = lambda attn: True  # noqa: E731
    elif isinstance(filter, str):
        chosen = lambda attn: fnmatch.fnmatchcase(attn.name, filter)  # noqa: E731
    elif callable(filter):
        chosen = filter
    else:
        raise TypeError(f"filter must be None, a glob string or a callable, got {type(filter).__name__}")
    names = []
    for layer in name_attention_layers(model):
        if chosen(layer):
            layer.processor = processor
            names.append(layer.name)
    return names


class CaptureAttentionMaps:
    """A processor that records softmax(Q K^T / sqrt(d)) of every layer it is attached to, then computes the usual
    output from those probabilities (so the result equals the "math" backend).

        capture = CaptureAttentionMaps()
        set_attention_processor(unet, capture, filter=lambda a: a.is_cross_attention)
        unet(sample, t, text_embeddings)
        capture.maps["up_blocks.1.attentions.0.transformer_blocks.0.attn2"]   # list, one (B, h, L, S) tensor per call

    `mean_over_heads=True` stores (B, L, S) instead; `.clear()` empties the record.
    """

    def __init__(self, mean_over_heads: bool = False, upcast: bool = False):
        self.mean_over_heads, self.upcast = mean_over_heads, upcast
        self.maps: dict[str, list[torch.Tensor]] = {}

    def __call__(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 key_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        probs = attn.probs(q, k, key_mask, self.upcast)  # (B h L S), causal / padding masks applied
        self.maps.setdefault(attn.name, []).append((probs.mean(dim=1) if self.mean_over_heads else probs).detach())
        return probs @ v

    def clear(self) -> None:
        self.maps.clear()
