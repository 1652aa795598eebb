"""Building blocks shared by the UNet (and the VAE): ResNet block, up/down-sampling, spatial transformer.

Module and parameter names follow diffusers (`norm1`, `conv1`, `time_emb_proj`, `transformer_blocks.0.attn2`, ...) so
that weight files map onto them almost one to one.

Shapes: B batch, C channels, H W height and width, L = H*W image tokens, S context tokens, D token width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import Attention


class ResnetBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016, "identity mappings") with an optional time embedding:

        h = conv1(silu(norm1(x)));  h = h + time_emb_proj(silu(temb))  [per channel];  h = conv2(silu(norm2(h)))
        out = shortcut(x) + h          (shortcut = 1x1 conv `conv_shortcut` when in_ch != out_ch, else identity)

    x: (B, in_ch, H, W), temb: (B, temb_ch) -> (B, out_ch, H, W). `temb_ch=None`: no time embedding (the VAE's blocks).
    GroupNorm eps is 1e-6 by default (VAE); the SD2 UNet uses its config's norm_eps = 1e-5.
    """

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int | None, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch) if temb_ch is not None else None
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        # silu in place and `add_` below: the same numbers without allocating a new tensor (for the VAE at 512x512 a
        # 134-268 MB one, whose fresh pages cost more than the arithmetic); autograd handles both
        h = self.conv1(F.silu(self.norm1(x), inplace=True))  # (B, out_ch, H, W)
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("ResnetBlock was built with a time embedding (temb_ch set) but got temb=None")
            h = h + rearrange(self.time_emb_proj(F.silu(temb)), "B C -> B C 1 1")
        h = self.conv2(F.silu(self.norm2(h), inplace=True))  # dropout (training only) would sit before conv2
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h.add_(skip)  # = skip + h


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv, zero padding 1 on every side:
    (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2)). (The VAE pads asymmetrically instead; it has its own.)"""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling then a 3x3 conv: (B, C, H, W) -> (B, C, *size).

    `size=None` doubles H and W. The UNet passes the spatial size of the skip connection it is about to concatenate, so
    odd sizes round-trip (9 -> 5 -> 9). For an exact doubling both give identical results: nearest interpolation to
    size 2H picks source row floor(i * H / 2H) = floor(i / 2), the same rows as scale_factor=2 (diffusers passes the
    size only when a side is not a multiple of 2**num_upsamplers).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020, "GLU variants", eq. 6): one projection to 2*out, split into value and gate,
    value * gelu(gate). Exact (erf) gelu, like diffusers."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(value)  # = value * gelu(gate), in place like ResnetBlock's add_


class FeedForward(nn.Module):
    """GEGLU(D -> mult*D) then Linear(mult*D -> D). `net` keeps the checkpoint's layout [GEGLU, dropout, Linear]
    (index 1 is the training-time dropout, an Identity here), so the weights are `net.0.proj.*` and `net.2.*`."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block over image tokens (Rombach et al. 2022, "BasicTransformerBlock"):

        x = x + attn1(norm1(x))              self-attention among the H*W tokens
        x = x + attn2(norm2(x), context)     cross-attention to the text tokens
        x = x + ff(norm3(x))                 GEGLU feed-forward
    x: (B, L, D), context: (B, S, Dc) -> (B, L, D).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, cross_attention_kwargs: dict | None = None):
        x = x + self.attn1(self.norm1(x), cross_attention_kwargs=cross_attention_kwargs)
        x = x + self.attn2(self.norm2(x), context, cross_attention_kwargs=cross_attention_kwargs)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Attention over the pixels of a feature map, conditioned on text (diffusers' Transformer2DModel, continuous
    input):

        GroupNorm -> proj_in -> TransformerBlock x depth -> proj_out, plus the residual input.
    `linear_projection=True` (SD2): proj_in/out are Linear layers applied to tokens; False (SD1): 1x1 convs applied
    before flattening. x: (B, C, H, W), context: (B, S, Dc) -> (B, C, H, W). Inner width = heads * (C // heads).
    """

    def __init__(self, channels: int, heads: int, context_dim: int, depth: int = 1, groups: int = 32,
                 linear_projection: bool = True):
        super().__init__()
        if channels % heads:
            raise ValueError(f"SpatialTransformer: channels ({channels}) must be divisible by heads ({heads})")
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        if linear_projection:
            self.proj_in, self.proj_out = nn.Linear(channels, channels), nn.Linear(channels, channels)
        else:
            self.proj_in, self.proj_out = nn.Conv2d(channels, channels, 1), nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, heads, channels // heads, context_dim) for _ in range(depth)])

    def forward(self, x: torch.Tensor, context: torch.Tensor, cross_attention_kwargs: dict | None = None):
        height = x.shape[2]
        h = self.norm(x)
        if not self.linear_projection:
            h = self.proj_in(h)
        h = rearrange(h, "B C H W -> B (H W) C")  # (B, L, C)
        if self.linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, cross_attention_kwargs)
        if self.linear_projection:
            h = self.proj_out(h)
        h = rearrange(h, "B (H W) C -> B C H W", H=height)  # (B, C, H, W)
        if not self.linear_projection:
            h = self.proj_out(h)
        return x + h
