"""The KL autoencoder ("VAE") of Stable Diffusion: images <-> latents 8x smaller per side.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (sec. 3, app. G): the encoder maps
an image x in [-1, 1] to the mean and log-variance of a diagonal Gaussian q(z|x); diffusion runs on
z * scaling_factor (0.18215, sec. 4.3.2 / app. D.1: unit variance for the latents); the decoder maps z back.

    Encoder   conv_in -> DownBlock x 4 (ResnetBlocks, then a stride-2 conv except in the last) ->
              MidBlock (ResnetBlock, self-attention over all positions, ResnetBlock) -> GroupNorm, SiLU, conv_out
    quant_conv (1x1) -> DiagonalGaussian(mean, logvar)
    post_quant_conv (1x1) -> Decoder: conv_in -> MidBlock -> UpBlock x 4 (ResnetBlocks, then nearest 2x upsampling and
              a conv except in the last) -> GroupNorm, SiLU, conv_out

Parameter names follow diffusers' `AutoencoderKL`, except where a plainer name reads better (`mid_block.resnet_1`,
`mid_block.attention`, `down_blocks.i.downsample`, `norm_out`); the key maps in `minidepth/checkpoints/` spell out
every difference. Memory switches: `enable_slicing()` (one sample at a time) and `enable_tiling()`
(`autoencoder_tiling.py`).

Shapes: images `B C H W` (C = 3), moments `B 2c h w`, latents `B c h w` (c = 4), h = H / 8 for H a multiple of 8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..noise import randn_tensor
from .attention import Attention
from .loadable import Loadable
from .autoencoder_tiling import tiled_decode, tiled_encode
from .blocks import ResnetBlock, Upsample


@dataclass(frozen=True)
class AutoencoderKLConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # one entry per resolution level
    layers_per_block: int = 2  # ResnetBlocks per encoder level (the decoder has one more)
    norm_num_groups: int = 32
    sample_size: int = 256  # tile size in pixels for tiled encode/decode (a 32-pixel latent tile)
    scaling_factor: float = 0.18215  # latents for the UNet = z * scaling_factor

    @classmethod
    def sd2_depth(cls) -> "AutoencoderKLConfig":
        """stable-diffusion-2-depth's `vae/config.json`: the defaults above (83,653,863 parameters)."""
        return cls()


# ------------------------------------------------------------------------------------------------ posterior
class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(var)), from encoder moments (B, 2c, h, w) = [mean; logvar] on channels."""

    def __init__(self, moments: torch.Tensor):
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, c, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)  # as LDM and diffusers: keeps exp() finite

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator=None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I) (the reparameterisation trick, Kingma & Welling 2014, eq. 10),
        eps drawn in the moments' dtype and device by `randn_tensor` (a generator or one per sample)."""
        eps = randn_tensor(self.mean.shape, generator, device=self.moments.device, dtype=self.moments.dtype)
        return self.mean + self.std * eps


# ------------------------------------------------------------------------------------------------ building blocks
class SpatialSelfAttention(Attention):
    """GroupNorm, then single-head self-attention among all H*W positions (tokens = pixels, D = channels), then the
    residual: x + to_out(softmax(QK^T / sqrt(C)) V). LDM's `AttnBlock`; diffusers' VAE `Attention` with
    residual_connection=True. The product's backend is the shared `Attention`'s (see attention.py)."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-6):
        super().__init__(channels, heads=1, head_dim=channels, qkv_bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x: torch.Tensor, context=None, cross_attention_kwargs=None) -> torch.Tensor:
        B, C, H, W = x.shape
        # The reshapes follow diffusers' order exactly (flatten, GroupNorm on (B, C, H*W), transpose; back with
        # transpose then reshape, `out` first in the sum). Equal values in another memory layout (einops, or a 4-D
        # GroupNorm) make later kernels round differently, ~1e-7 per layer, e.g. for the channels-last images that
        # the pipeline's numpy -> tensor conversion produces.
        tokens = self.group_norm(x.reshape(B, C, H * W)).transpose(1, 2)  # (B, H*W, C)
        out = super().forward(tokens, cross_attention_kwargs=cross_attention_kwargs)  # (B, H*W, C)
        return out.transpose(1, 2).reshape(B, C, H, W) + x


class MidBlock(nn.Module):
    """ResnetBlock -> SpatialSelfAttention -> ResnetBlock, at the lowest resolution. Shape-preserving."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnet_1 = ResnetBlock(channels, channels, temb_ch=None, groups=groups)
        self.attention = SpatialSelfAttention(channels, groups)
        self.resnet_2 = ResnetBlock(channels, channels, temb_ch=None, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnet_2(self.attention(self.resnet_1(x)))


class DownBlock(nn.Module):
    """ResnetBlocks, then (optionally) a 3x3 stride-2 conv. (B, C_in, H, W) -> (B, C_out, H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels, out_channels, temb_ch=None,
                                                 groups=groups) for i in range(num_layers))
        self.downsample = nn.Conv2d(out_channels, out_channels, 3, stride=2) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsample is not None:
            # LDM pads one zero row/column on the bottom/right only (not both sides), then convolves unpadded
            x = self.downsample(F.pad(x, (0, 1, 0, 1)))  # (B, C, ceil(H/2), ceil(W/2))
        return x


class UpBlock(nn.Module):
    """ResnetBlocks, then (optionally) nearest-neighbour 2x upsampling and a 3x3 conv.
    (B, C_in, h, w) -> (B, C_out, 2h, 2w)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels, out_channels, temb_ch=None,
                                                 groups=groups) for i in range(num_layers))
        self.upsample = Upsample(out_channels) if upsample else None  # nearest 2x, then a 3x3 conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsample is not None:
            x = self.upsample(x)  # (B, C, 2h, 2w)
        return x


class Encoder(nn.Module):
    """Images (B, 3, H, W) -> moments (B, 2c, H/8, W/8) (before quant_conv)."""

    def __init__(self, cfg: AutoencoderKLConfig):
        super().__init__()
        ch, groups, last = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups,
                                                   downsample=i < last) for i in range(len(ch)))
        self.mid_block = MidBlock(ch[-1], groups)
        self.norm_out = nn.GroupNorm(groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)  # (B, ch[0], H, W)
        for block in self.down_blocks:
            x = block(x)  # (B, ch[-1], H/8, W/8) after the last
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True))  # (B, 2c, H/8, W/8)


class Decoder(nn.Module):
    """Latents (B, c, h, w) (after post_quant_conv) -> images (B, 3, 8h, 8w)."""

    def __init__(self, cfg: AutoencoderKLConfig):
        super().__init__()
        ch, groups = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups  # widest first
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], groups)
        self.up_blocks = nn.ModuleList(UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, groups,
                                               upsample=i < len(ch) - 1) for i in range(len(ch)))
        self.norm_out = nn.GroupNorm(groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))  # (B, ch[0], h, w)
        for block in self.up_blocks:
            x = block(x)  # (B, block_out_channels[0], 8h, 8w) after the last
        return self.conv_out(F.silu(self.norm_out(x), inplace=True))  # (B, 3, 8h, 8w)


# ------------------------------------------------------------------------------------------------ the autoencoder
class AutoencoderKL(nn.Module, Loadable):
    """encode: images (B, 3, H, W) in [-1, 1] -> DiagonalGaussian over latents (B, 4, H/8, W/8);
    decode: latents (B, 4, h, w) (unscaled: divide the UNet's latents by `config.scaling_factor`) -> (B, 3, 8h, 8w)."""

    def __init__(self, config: AutoencoderKLConfig | None = None):
        super().__init__()
        self.config = config = config or AutoencoderKLConfig.sd2_depth()
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.decoder = Decoder(config)
        self.use_slicing = False
        self.use_tiling = False
        self.tile_sample_size = config.sample_size  # pixels; diffusers' tile_sample_min_size
        self.tile_overlap_factor = 0.25

    @property
    def tile_latent_size(self) -> int:  # diffusers' tile_latent_min_size
        return int(self.tile_sample_size / 2 ** (len(self.config.block_out_channels) - 1))

    # -- memory switches (diffusers' names and behaviour)
    def enable_slicing(self) -> None:
        """Encode/decode a batch one sample at a time (same numbers, less memory)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, tile_sample_size: int | None = None, overlap_factor: float = 0.25) -> None:
        """Encode/decode inputs larger than one tile (default: `config.sample_size` pixels) in overlapping tiles."""
        size = self.config.sample_size if tile_sample_size is None else tile_sample_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"tile_sample_size must be a positive int, got {size!r}")
        if not 0 <= overlap_factor < 1:
            raise ValueError(f"overlap_factor must be in [0, 1), got {overlap_factor!r}")
        latent = int(size / 2 ** (len(self.config.block_out_channels) - 1))
        if int(latent * (1 - overlap_factor)) < 1:
            raise ValueError(f"tile_sample_size={size} with overlap_factor={overlap_factor} leaves latent tiles of "
                             f"{latent} with no step between them; use a larger tile or a smaller overlap")
        self.use_tiling, self.tile_sample_size, self.tile_overlap_factor = True, size, overlap_factor

    def disable_tiling(self) -> None:
        self.use_tiling = False

    # -- encode / decode
    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        _check_batch(x, "x", self.config.in_channels, "images (B, C, H, W) in [-1, 1]")
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode(sample) for sample in x.split(1)])
        else:
            moments = self._encode(x)
        return DiagonalGaussian(moments)  # (B, 2c, h, w) inside

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        run = lambda tile: self.quant_conv(self.encoder(tile))  # noqa: E731
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_size:
            return tiled_encode(x, run, self.tile_sample_size, self.tile_latent_size, self.tile_overlap_factor)
        return run(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        _check_batch(z, "z", self.config.latent_channels, "latents (B, c, h, w)")
        if self.use_slicing and z.shape[0] > 1:
            return torch.cat([self._decode(sample) for sample in z.split(1)])
        return self._decode(z)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        run = lambda tile: self.decoder(self.post_quant_conv(tile))  # noqa: E731
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_size:
            return tiled_decode(z, run, self.tile_sample_size, self.tile_latent_size, self.tile_overlap_factor)
        return run(z)

    def forward(self, x: torch.Tensor, sample_posterior: bool = False, generator=None) -> torch.Tensor:
        """Reconstruction: decode(encode(x)) through the posterior's mode (or a sample)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator) if sample_posterior else posterior.mode())

def _check_batch(t, name: str, channels: int, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of {what}, got {type(t).__name__}")
    if t.ndim != 4 or t.shape[1] != channels:
        raise ValueError(f"{name} must be {what} with {channels} channels, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
