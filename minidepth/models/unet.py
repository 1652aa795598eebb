"""The depth-conditioned denoising UNet of Stable Diffusion 2 depth (diffusers' UNet2DConditionModel, SD2-depth config).

    eps = UNet(concat[noisy latents (4 ch), depth (1 ch)], t, text embeddings)        (Rombach et al. 2022, eq. 2)

Layout (SD2-depth sizes; latents are image/8, e.g. 64x64 for 512x512):

    conv_in 5 -> 320
    down_blocks  0: 2 x (ResnetBlock + SpatialTransformer), Downsample    320   5 heads    skips: 1 + 3 per block
                 1: same                                                   640   10 heads
                 2: same                                                   1280  20 heads
                 3: 2 x ResnetBlock (no attention, no downsample)          1280
    mid_block    ResnetBlock, SpatialTransformer, ResnetBlock              1280  20 heads
    up_blocks    mirror of the down path with 3 layers each; every ResnetBlock first concatenates one skip (U-Net,
                 Ronneberger et al. 2015); blocks 0-2 end with an Upsample to the next skip's size
    conv_norm_out, SiLU, conv_out 320 -> 4

Skip connections (channels x latent side at 512x512). The down path pushes every intermediate output on a stack;
each up block pops `layers + 1` = 3 of them, newest first, and concatenates each to its input channels:

    pushed by         skip  channels  side        popped by (newest first)
    conv_in           s0    320       64          up_blocks.3 (last)
    down_blocks.0     s1 s2 320       64          up_blocks.3
      Downsample      s3    320       32          up_blocks.2 (last)
    down_blocks.1     s4 s5 640       32          up_blocks.2
      Downsample      s6    640       16          up_blocks.1 (last)
    down_blocks.2     s7 s8 1280      16          up_blocks.1
      Downsample      s9    1280      8           up_blocks.0 (last)
    down_blocks.3     s10   1280      8           up_blocks.0
                      s11   1280      8           up_blocks.0 (first)

    up_blocks.0  8 -> 16   1280 ch  cat s11, s10, s9, Upsample
    up_blocks.1  16 -> 32  1280 ch  cat s8, s7, s6, Upsample
    up_blocks.2  32 -> 64  640 ch   cat s5, s4, s3, Upsample
    up_blocks.3  64        320 ch   cat s2, s1, s0

The time step enters every ResnetBlock through a sinusoidal embedding (Vaswani et al. 2017 sec. 3.5, as in DDPM)
followed by a two-layer MLP; the text enters every SpatialTransformer through cross-attention.

Shapes: B batch, C channels, H W latent height and width (any size, odd included), S text tokens (77), Dc text width.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import name_attention_layers
from .loadable import Loadable
from .blocks import Downsample, ResnetBlock, SpatialTransformer, Upsample


# ------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 5                  # 4 latent channels + 1 depth channel (depth is concatenated LAST)
    out_channels: int = 4                 # predicted noise, latent-shaped
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    attention_heads: tuple[int, ...] = (5, 10, 20, 20)  # NUMBER of heads per level (head size = channels // heads = 64)
    cross_attention: tuple[bool, ...] = (True, True, True, False)  # levels with spatial transformers (down order)
    layers_per_block: int = 2             # ResnetBlocks per down level; up levels have one more
    transformer_depth: int = 1            # TransformerBlocks per SpatialTransformer
    cross_attention_dim: int = 1024       # text embedding width (OpenCLIP ViT-H)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5                # ResnetBlocks and conv_norm_out (spatial transformers use 1e-6 / 1e-5)
    use_linear_projection: bool = True    # SD2: Linear proj_in/proj_out; SD1: 1x1 convs
    flip_sin_to_cos: bool = True          # timestep embedding order [cos, sin] (LDM), not DDPM's [sin, cos]
    freq_shift: float = 0.0               # frequencies exp(-ln(10000) * i / (half - freq_shift))
    sample_size: int = 32                 # metadata only (the config's nominal latent size); any size works

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.attention_heads) != n or len(self.cross_attention) != n:
            raise ValueError(f"UNetConfig: block_out_channels ({n} levels), attention_heads "
                             f"({len(self.attention_heads)}) and cross_attention ({len(self.cross_attention)}) "
                             "must have the same length")
        for ch, heads in zip(self.block_out_channels, self.attention_heads):
            if ch % self.norm_num_groups or ch % heads:
                raise ValueError(f"UNetConfig: channels {ch} must be divisible by norm_num_groups "
                                 f"({self.norm_num_groups}) and by its head count ({heads})")

    @classmethod
    def sd2_depth(cls) -> "UNetConfig":
        """stable-diffusion-2-depth's `unet/config.json`: the defaults above (865,913,604 parameters)."""
        return cls()

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]


# ------------------------------------------------------------------------------------------------ time embedding
def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017 sec. 3.5): (B,) -> (B, dim) float32.

    freq_i = exp(-ln(max_period) * i / (dim/2 - freq_shift)),  emb = [sin(t freq), cos(t freq)].
    Two conventions exist: DDPM's code and diffusers' default give [sin, cos]; LDM / Stable Diffusion give [cos, sin],
    which is `flip_sin_to_cos=True` (what the SD2 checkpoint was trained with). Always computed in float32, like
    diffusers, so fp16 models see the same embedding; the caller casts it to the model's dtype.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    angles = t[:, None].float() * torch.exp(exponent)[None, :]  # (B, half)
    sin, cos = torch.sin(angles), torch.cos(angles)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb  # (B, dim)


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: linear_1 -> SiLU -> linear_2. (B, C0) -> (B, 4*C0)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(in_dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


# ------------------------------------------------------------------------------------------------ levels
class DownBlock(nn.Module):
    """One level of the encoder path: `layers` x (ResnetBlock [+ SpatialTransformer]) [+ Downsample].
    Returns the output and every intermediate output, which become skip connections."""

    def __init__(self, cfg: UNetConfig, in_ch: int, out_ch: int, heads: int | None, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if j == 0 else out_ch, out_ch, cfg.time_embed_dim,
                                                  cfg.norm_num_groups, cfg.norm_eps)
                                      for j in range(cfg.layers_per_block)])
        self.attentions = nn.ModuleList([_transformer(cfg, out_ch, heads) for _ in range(cfg.layers_per_block)]
                                        if heads else [])
        self.downsample = Downsample(out_ch) if downsample else None

    def forward(self, x, temb, context, cross_attention_kwargs=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[j](x, context, cross_attention_kwargs)
            skips.append(x)
        if self.downsample is not None:
            x = self.downsample(x)  # (B, C, ceil(H/2), ceil(W/2))
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """ResnetBlock -> SpatialTransformer -> ResnetBlock at the lowest resolution."""

    def __init__(self, cfg: UNetConfig, ch: int, heads: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps)
                                      for _ in range(2)])
        self.attentions = nn.ModuleList([_transformer(cfg, ch, heads)])

    def forward(self, x, temb, context, cross_attention_kwargs=None):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context, cross_attention_kwargs)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    """One level of the decoder path: (layers+1) x (concat skip -> ResnetBlock [+ SpatialTransformer]) [+ Upsample].
    `skip_chs` are the channel counts of the skips it consumes, in the order it consumes them (newest first)."""

    def __init__(self, cfg: UNetConfig, in_ch: int, out_ch: int, skip_chs: list[int], heads: int | None,
                 upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock((in_ch if j == 0 else out_ch) + skip, out_ch, cfg.time_embed_dim,
                                                  cfg.norm_num_groups, cfg.norm_eps)
                                      for j, skip in enumerate(skip_chs)])
        self.attentions = nn.ModuleList([_transformer(cfg, out_ch, heads) for _ in skip_chs] if heads else [])
        self.upsample = Upsample(out_ch) if upsample else None

    def forward(self, x, skips: list[torch.Tensor], temb, context, cross_attention_kwargs=None, upsample_size=None):
        """`skips`: one per ResnetBlock, in the order they are concatenated (newest first)."""
        for j, (resnet, skip) in enumerate(zip(self.resnets, skips)):
            x = resnet(torch.cat([x, skip], dim=1), temb)  # (B, C + C_skip, H, W) -> (B, C_out, H, W)
            if self.attentions:
                x = self.attentions[j](x, context, cross_attention_kwargs)
        if self.upsample is not None:
            x = self.upsample(x, upsample_size)  # (B, C, H', W') = size of the next skip
        return x


def _transformer(cfg: UNetConfig, ch: int, heads: int) -> SpatialTransformer:
    return SpatialTransformer(ch, heads, cfg.cross_attention_dim, cfg.transformer_depth, cfg.norm_num_groups,
                              cfg.use_linear_projection)


# ------------------------------------------------------------------------------------------------ the UNet
class UNet(nn.Module, Loadable):
    """sample (B, in_channels, H, W), timestep, encoder_hidden_states (B, S, Dc)
    -> noise prediction (B, out_channels, H, W)."""

    def __init__(self, cfg: UNetConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or UNetConfig.sd2_depth()
        chs, n = cfg.block_out_channels, len(cfg.block_out_channels)
        heads = [h if cross else None for h, cross in zip(cfg.attention_heads, cfg.cross_attention)]
        self.time_embedding = TimestepEmbedding(chs[0], cfg.time_embed_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)

        self.down_blocks = nn.ModuleList()
        skip_chs = [chs[0]]  # channels of every skip, in the order they are produced
        for i in range(n):
            last = i == n - 1
            self.down_blocks.append(DownBlock(cfg, chs[i - 1] if i else chs[0], chs[i], heads[i], downsample=not last))
            skip_chs += [chs[i]] * (cfg.layers_per_block + (0 if last else 1))

        self.mid_block = MidBlock(cfg, chs[-1], cfg.attention_heads[-1])

        self.up_blocks = nn.ModuleList()
        for i in range(n):
            level = n - 1 - i  # the down level this up block mirrors
            consumed = [skip_chs.pop() for _ in range(cfg.layers_per_block + 1)]
            in_ch = chs[level + 1] if i else chs[-1]
            self.up_blocks.append(UpBlock(cfg, in_ch, chs[level], consumed, heads[level], upsample=level > 0))

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chs[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(chs[0], cfg.out_channels, 3, padding=1)
        name_attention_layers(self)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, encoder_hidden_states: torch.Tensor,
                cross_attention_kwargs: dict | None = None) -> torch.Tensor:
        """`timestep`: a number, a 0-d tensor, or a (1,) / (B,) tensor. `cross_attention_kwargs` goes to the attention
        processors (see minidepth.models.attention). Its "scale" key is diffusers' LoRA strength, which this network
        does not read: LoRA lives in minidepth/adapters, and `adapters.lora.lora_scale(model, s)` applies a strength
        (the pipeline does so for its call's cross_attention_kwargs["scale"])."""
        self._check_inputs(sample, encoder_hidden_states)
        cross_attention_kwargs = dict(cross_attention_kwargs or {})
        if cross_attention_kwargs.pop("scale", 1.0) != 1.0:
            warnings.warn("UNet: cross_attention_kwargs['scale'] (the LoRA strength) is applied by the pipeline; "
                          "calling the UNet directly, use `with minidepth.adapters.lora.lora_scale(unet, scale):`",
                          UserWarning, stacklevel=2)
        t = _timesteps(timestep, sample.shape[0], sample.device)
        t_emb = timestep_embedding(t, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
                                   self.config.freq_shift).to(sample.dtype)  # float32 -> model dtype, like diffusers
        temb = self.time_embedding(t_emb)  # (B, 4*C0)

        x = self.conv_in(sample)  # (B, C0, H, W)
        skips = [x]  # a stack: s0, s1, ... (see the module docstring's table)
        for block in self.down_blocks:
            x, pushed = block(x, temb, encoder_hidden_states, cross_attention_kwargs)
            skips.extend(pushed)
        x = self.mid_block(x, temb, encoder_hidden_states, cross_attention_kwargs)  # (B, C_last, H/8, W/8)
        for block in self.up_blocks:
            popped = [skips.pop() for _ in block.resnets]  # newest first, e.g. s11, s10, s9 for up_blocks.0
            size = skips[-1].shape[-2:] if skips else None  # upsample to the next skips' size (odd sizes round-trip)
            x = block(x, popped, temb, encoder_hidden_states, cross_attention_kwargs, upsample_size=size)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, out_channels, H, W)

    def _check_inputs(self, sample, context):
        cfg = self.config
        if not isinstance(sample, torch.Tensor) or sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            got = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
            raise ValueError(f"sample must be a (B, {cfg.in_channels}, H, W) tensor (SD2-depth: 4 latent channels "
                             f"+ 1 depth channel), got {got}")
        if not isinstance(context, torch.Tensor) or context.ndim != 3 or context.shape[-1] != cfg.cross_attention_dim:
            got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise ValueError(f"encoder_hidden_states must be a (B, S, {cfg.cross_attention_dim}) tensor, got {got}")
        if context.shape[0] != sample.shape[0]:
            raise ValueError(f"encoder_hidden_states batch ({context.shape[0]}) must equal sample batch "
                             f"({sample.shape[0]})")
        if sample.dtype != self.dtype or context.dtype != self.dtype:
            raise ValueError(f"sample ({sample.dtype}) and encoder_hidden_states ({context.dtype}) must have the "
                             f"UNet's dtype ({self.dtype})")

def _timesteps(timestep, batch: int, device: torch.device) -> torch.Tensor:
    """Any accepted timestep -> a (B,) tensor on `device` (ints as int64, floats as float64, like diffusers)."""
    if isinstance(timestep, torch.Tensor):
        if timestep.ndim > 1 or (timestep.ndim == 1 and timestep.shape[0] not in (1, batch)):
            raise ValueError(f"timestep tensor must be 0-d, (1,) or (B,)=({batch},), got shape {tuple(timestep.shape)}")
        t = timestep.reshape(-1).to(device)
    elif isinstance(timestep, numbers.Real) and not isinstance(timestep, bool):
        if not math.isfinite(timestep):
            raise ValueError(f"timestep must be finite, got {timestep!r}")
        dtype = torch.int64 if isinstance(timestep, numbers.Integral) else torch.float64
        if device.type == "mps" and dtype == torch.float64:
            dtype = torch.float32
        t = torch.tensor([timestep], dtype=dtype, device=device)
    else:
        raise TypeError(f"timestep must be a number or a tensor, got {type(timestep).__name__}")
    return t.expand(batch)
