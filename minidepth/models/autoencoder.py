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
`mid_block.attention`, `down_blocks.i.downsample`, `norm_out`); the key maps at the end of this file spell out every
difference. Memory switches: `enable_slicing()` (one sample at a time) and `enable_tiling()` (`autoencoder_tiling.py`).

Shapes: images `B C H W` (C = 3), moments `B 2c h w`, latents `B c h w` (c = 4), h = H / 8 for H a multiple of 8.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import (IDENTITY, KeyMap, Rule, TensorFile, build_on_meta, find_weights, mapped_state_dict,
                           prefixed, read_json)
from ..checkpoints.loader import save_component
from ..noise import randn_tensor
from .attention import Attention
from .autoencoder_tiling import tiled_decode, tiled_encode
from .blocks import ResnetBlock, Upsample


# diffusers' AutoencoderKL.__init__ defaults: what a config.json without these keys means
_DIFFUSERS_DEFAULTS = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
                       "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1,
                       "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32,
                       "scaling_factor": 0.18215}


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
        return cls()

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderKLConfig":
        """From a diffusers `vae/config.json`. Traps:
        - keys the file leaves out take diffusers' `AutoencoderKL` defaults, not SD2's: SD2-depth's config has no
          `scaling_factor` (-> 0.18215); a config without `sample_size` tiles at 32 pixels;
        - only the SD layout is built: one "DownEncoderBlock2D" / "UpDecoderBlock2D" per entry of block_out_channels,
          act_fn "silu", quant convs and mid-block attention present, no latent shift/normalisation (SDXL/SD3/Flux);
        - `sample_size` may be a list in some configs: its first entry is the tile size;
        - `force_upcast` only matters to SDXL pipelines and is ignored; unknown keys are refused."""
        d = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in d.items() if not k.startswith("_")}}
        n = len(d["block_out_channels"])
        required = {"down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
                    "act_fn": ("silu", "swish"), "use_quant_conv": (True,), "use_post_quant_conv": (True,),
                    "mid_block_add_attention": (True,), "shift_factor": (None,), "latents_mean": (None,),
                    "latents_std": (None,), "force_upcast": (True, False)}
        for key, accepted in required.items():
            if key not in d:
                continue
            value = d.pop(key)
            ok = list(value) == accepted if key.endswith("block_types") else value in accepted
            if not ok:
                raise ValueError(f"AutoencoderKLConfig.from_dict: {key}={value!r} is not supported "
                                 f"(accepted: {accepted!r})")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"AutoencoderKLConfig.from_dict: unknown config keys {sorted(unknown)}")
        if isinstance(d.get("sample_size"), (list, tuple)):
            d["sample_size"] = d["sample_size"][0]
        return cls(**{**d, "block_out_channels": tuple(d["block_out_channels"])})

    def to_dict(self) -> dict:
        """diffusers' `vae/config.json` for this model (what `from_dict` reads back; diffusers loads it too)."""
        n = len(self.block_out_channels)
        return {"_class_name": "AutoencoderKL", **dataclasses.asdict(self), "act_fn": "silu",
                "block_out_channels": list(self.block_out_channels),
                "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}


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
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, 2c, H/8, W/8)


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
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, 3, 8h, 8w)


# ------------------------------------------------------------------------------------------------ the autoencoder
class AutoencoderKL(nn.Module):
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

    # -- loading and saving
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, variant: str | None = None) -> "AutoencoderKL":
        """From a diffusers `vae/` folder (config.json + diffusion_pytorch_model[.variant].safetensors/.bin). Both
        attention namings load (legacy query/key/value/proj_attn as on the hub, or to_q/to_k/to_v/to_out.0).
        dtype=None gives float32, as diffusers does (an fp16 variant is upcast)."""
        folder = Path(folder)
        config = AutoencoderKLConfig.from_dict(read_json(folder / "config.json"))
        path = find_weights(folder, stems=("diffusion_pytorch_model",), variant=variant)
        tensors = TensorFile(path)
        keymap = DIFFUSERS_LEGACY_KEYS if any(".attentions.0.query." in n for n in tensors) else DIFFUSERS_KEYS
        return cls._filled(config, tensors, keymap, dtype, device, str(path))

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, config: AutoencoderKLConfig | None = None, *,
                         dtype: torch.dtype | None = None, device=None) -> "AutoencoderKL":
        """From the original LDM checkpoint (e.g. `512-depth-ema.safetensors`): its `first_stage_model.*` tensors."""
        config = config or AutoencoderKLConfig.sd2_depth()
        if len(config.block_out_channels) != 4:
            raise ValueError(f"LDM_KEYS describe 4 resolution levels, config has {len(config.block_out_channels)}")
        file = TensorFile(path)
        tensors = {n: file[n] for n in file if n.startswith("first_stage_model.")}
        return cls._filled(config, tensors, LDM_KEYS, dtype, device, str(path))

    @classmethod
    def _filled(cls, config, tensors, keymap, dtype, device, where) -> "AutoencoderKL":
        dtype = torch.float32 if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype (e.g. torch.float16), got {dtype!r}")
        model = build_on_meta(lambda: cls(config))
        state = mapped_state_dict(model, tensors, keymap, dtype=dtype, device=device, where=where)
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write a diffusers `vae/` folder (current attention names); diffusers' AutoencoderKL loads it."""
        save_component(folder, self.config.to_dict(), self, DIFFUSERS_KEYS, "diffusion_pytorch_model.safetensors")


def _check_batch(t, name: str, channels: int, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of {what}, got {type(t).__name__}")
    if t.ndim != 4 or t.shape[1] != channels:
        raise ValueError(f"{name} must be {what} with {channels} channels, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


# ------------------------------------------------------------------------------------------------ key maps (data)
def _both(target: str, source: str, transform: str = "copy") -> tuple[Rule, ...]:
    """The same rule for the encoder and the decoder: "CODER" stands for either."""
    return tuple(Rule(target.replace("CODER", c), source.replace("CODER", c), transform)
                 for c in ("encoder", "decoder"))


def _diffusers_rules(q: str, k: str, v: str, out: str) -> tuple[Rule, ...]:
    return (
        Rule("encoder.down_blocks.{i}.downsample.{rest}", "encoder.down_blocks.{i}.downsamplers.0.conv.{rest}"),
        Rule("decoder.up_blocks.{i}.upsample.{rest}", "decoder.up_blocks.{i}.upsamplers.0.{rest}"),
        *_both("CODER.mid_block.resnet_1.{rest}", "CODER.mid_block.resnets.0.{rest}"),
        *_both("CODER.mid_block.resnet_2.{rest}", "CODER.mid_block.resnets.1.{rest}"),
        *_both("CODER.mid_block.attention.to_q.{rest}", f"CODER.mid_block.attentions.0.{q}.{{rest}}"),
        *_both("CODER.mid_block.attention.to_k.{rest}", f"CODER.mid_block.attentions.0.{k}.{{rest}}"),
        *_both("CODER.mid_block.attention.to_v.{rest}", f"CODER.mid_block.attentions.0.{v}.{{rest}}"),
        *_both("CODER.mid_block.attention.to_out.{rest}", f"CODER.mid_block.attentions.0.{out}.{{rest}}"),
        *_both("CODER.mid_block.attention.group_norm.{rest}", "CODER.mid_block.attentions.0.group_norm.{rest}"),
        *_both("CODER.norm_out.{rest}", "CODER.conv_norm_out.{rest}"),
        *IDENTITY,  # conv_in, conv_out, the blocks' resnets, quant_conv, post_quant_conv
    )


# diffusers >= 0.14 names (what `AutoencoderKL.save_pretrained` writes today)
DIFFUSERS_KEYS = KeyMap("diffusers AutoencoderKL", _diffusers_rules("to_q", "to_k", "to_v", "to_out.0"))
# the names in the hub's SD2 files (saved before diffusers renamed its attention layers)
DIFFUSERS_LEGACY_KEYS = KeyMap("diffusers AutoencoderKL (legacy attention names)",
                               _diffusers_rules("query", "key", "value", "proj_attn"))

# The original LDM single file, `first_stage_model.*` (shared/reference/keys/map_vae_ldm_to_diffusers.tsv). LDM numbers
# the decoder's levels from the output end: our up_blocks.i (i-th applied) is LDM's up.(3-i). Its attention
# projections are 1x1 convolutions, squeezed to linear weights.
LDM_KEYS = KeyMap("LDM first_stage_model", prefixed("first_stage_model.", (
    Rule("encoder.down_blocks.{i}.resnets.{j}.conv_shortcut.{rest}", "encoder.down.{i}.block.{j}.nin_shortcut.{rest}"),
    Rule("encoder.down_blocks.{i}.resnets.{j}.{rest}", "encoder.down.{i}.block.{j}.{rest}"),
    Rule("encoder.down_blocks.{i}.downsample.{rest}", "encoder.down.{i}.downsample.conv.{rest}"),
    Rule("decoder.up_blocks.{i}.resnets.{j}.conv_shortcut.{rest}", "decoder.up.{3-i}.block.{j}.nin_shortcut.{rest}"),
    Rule("decoder.up_blocks.{i}.resnets.{j}.{rest}", "decoder.up.{3-i}.block.{j}.{rest}"),
    Rule("decoder.up_blocks.{i}.upsample.{rest}", "decoder.up.{3-i}.upsample.{rest}"),
    *_both("CODER.mid_block.resnet_1.{rest}", "CODER.mid.block_1.{rest}"),
    *_both("CODER.mid_block.resnet_2.{rest}", "CODER.mid.block_2.{rest}"),
    *_both("CODER.mid_block.attention.group_norm.{rest}", "CODER.mid.attn_1.norm.{rest}"),
    *_both("CODER.mid_block.attention.to_q.{rest}", "CODER.mid.attn_1.q.{rest}", "squeeze"),
    *_both("CODER.mid_block.attention.to_k.{rest}", "CODER.mid.attn_1.k.{rest}", "squeeze"),
    *_both("CODER.mid_block.attention.to_v.{rest}", "CODER.mid.attn_1.v.{rest}", "squeeze"),
    *_both("CODER.mid_block.attention.to_out.{rest}", "CODER.mid.attn_1.proj_out.{rest}", "squeeze"),
    *IDENTITY,  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv
)))
