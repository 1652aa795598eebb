"""Depth Anything V2 (Small, Base, Large): a monocular relative-depth estimator on a DINOv2 ViT with a DPT head.

Yang, Kang, Huang, Zhao, Xu, Feng, Zhao, "Depth Anything V2" (NeurIPS 2024; arXiv 2406.09414). The network is the
V1 design (Yang et al., "Depth Anything", CVPR 2024): a DINOv2 encoder (Oquab et al., "DINOv2: Learning Robust Visual
Features without Supervision", TMLR 2024; arXiv 2304.07193) feeding the DPT neck and head of Ranftl, Bochkovskiy,
Koltun, "Vision Transformers for Dense Prediction" (ICCV 2021). V2 changes the training data and which ViT blocks feed
the neck (evenly spaced blocks instead of the last four). Three stages, top to bottom:

    image (B, 3, H, W), ImageNet-normalised, sides ideally multiples of 14 (518 x 518 at training time)
      backbone   DINOv2 ViT-S/B/L with patch 14: CLS token + patch tokens + position embeddings (resized bicubically to
                 the input's patch grid), pre-norm blocks with layer scale. The outputs of four blocks, each through
                 the backbone's final LayerNorm, go to the neck: (B, L, D) each
      neck       reassemble: drop the CLS token ("ignore" readout, DPT Sec. 3), tokens -> map, 1x1 conv, resize to
                 /3.5, /7, /14, /28 of the input (factors 4, 2, 1, 0.5 of the /14 grid); 3x3 convs to one width;
                 RefineNet-style fusion from coarse to fine, each block upsampling to the next level's size
      head       conv, bilinear resize to (14 h, 14 w), conv, ReLU, 1x1 conv, ReLU  ->  predicted_depth (B, 14h, 14w)

The output is relative inverse depth ("disparity"): larger = nearer, non-negative, arbitrary scale and shift, as
transformers' `DepthAnythingForDepthEstimation.predicted_depth`. (`depth_type="metric"` is the fine-tuned metric
variant of the same network: Sigmoid instead of the last ReLU, times `max_depth` metres; larger = farther.)

Inputs whose sides are not multiples of 14 work as in the reference: the patch convolution drops the last H % 14 rows
and W % 14 columns, and the depth map is (14 * (H // 14), 14 * (W // 14)).

Position embeddings follow transformers 5.24's Dinov2: bicubic, `size=(h, w)`, align_corners=False, no antialias, in
float32, skipped when the input is square and has the training grid. The original DINOv2 / Depth-Anything-V2 code
differs slightly: it passes `scale_factor=((w+0.1)/37, (h+0.1)/37)` (the 0.1 offset of DINO issue #8, with the axes
swapped), which moves the sampling positions by a fraction of a percent. Parity here is with transformers.

Shapes: B batch, C channels, H W pixels, h w token grid (H // 14, W // 14), L = 1 + h*w tokens (CLS first), D ViT width,
n heads, d head size (64 in all three published sizes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import dpt
from .attention import Attention, name_attention_layers
from .loadable import Loadable


# ------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class DepthAnythingConfig:
    # DINOv2 ViT (defaults: ViT-S/14, the Small model)
    hidden_size: int = 384
    num_layers: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4                   # MLP width = int(hidden_size * mlp_ratio)
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    image_size: int = 518                  # position embeddings are learned for (image_size / patch_size)^2 = 37^2
    patch_size: int = 14
    mask_token: bool = True                # DINOv2's masked-image-modelling token: stored in the files, unused here
    vit_out_indices: tuple[int, ...] = (2, 5, 8, 11)  # 0-based ViT blocks whose outputs feed the neck (levels 0..3)
    # DPT neck and head
    neck_sizes: tuple[int, ...] = (48, 96, 192, 384)
    reassemble_factors: tuple[float, ...] = (4, 2, 1, 0.5)  # resize of each level's /14 map: x4, x2, x1, /2
    fusion_size: int = 64
    head_size: int = 32                    # hidden width of the head's second 3x3 conv
    depth_type: str = "relative"           # "relative": ReLU output; "metric": Sigmoid * max_depth
    max_depth: float = 1.0                 # the output's multiplier (transformers multiplies relative depth too)

    def __post_init__(self):
        levels = (len(self.vit_out_indices), len(self.neck_sizes), len(self.reassemble_factors))
        if len(set(levels)) != 1:
            raise ValueError(f"vit_out_indices, neck_sizes and reassemble_factors must have one entry per neck level, "
                             f"got {self.vit_out_indices}, {self.neck_sizes}, {self.reassemble_factors}")
        if list(self.vit_out_indices) != sorted(set(self.vit_out_indices)) or not (
                0 <= min(self.vit_out_indices) and max(self.vit_out_indices) < self.num_layers):
            raise ValueError(f"vit_out_indices {self.vit_out_indices} must increase and lie in [0, {self.num_layers})")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        for f in self.reassemble_factors:
            if not (f > 1 and float(f).is_integer() or f == 1 or 0 < f < 1 and float(1 / f).is_integer()):
                raise ValueError(f"reassemble factor {f}: must be an integer > 1, 1, or 1/integer")
        if self.depth_type not in ("relative", "metric"):
            raise ValueError(f"depth_type must be 'relative' or 'metric', got {self.depth_type!r}")

    @property
    def mlp_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def grid(self) -> int:
        """Side of the token grid the position embeddings were learned on (37 for 518 / 14)."""
        return self.image_size // self.patch_size

    # The published checkpoints (depth-anything/Depth-Anything-V2-{Small,Base,Large}-hf). Values: the Small model's
    # config.json, and transformers' convert_depth_anything_to_hf.py (get_dpt_config, "v2" branches) on top of
    # facebook/dinov2-{small,base,large} for all three; copies in minidepth/data/depth-anything-v2/<size>/.
    @classmethod
    def small(cls) -> DepthAnythingConfig:
        """ViT-S/14: 384 wide, 12 blocks, 6 heads; neck from blocks 3, 6, 9, 12 (1-based). 24,785,089 parameters."""
        return cls()

    @classmethod
    def base(cls) -> DepthAnythingConfig:
        """ViT-B/14: 768 wide, 12 blocks, 12 heads; neck from blocks 3, 6, 9, 12. 97,470,785 parameters."""
        return cls(hidden_size=768, num_heads=12, neck_sizes=(96, 192, 384, 768), fusion_size=128)

    @classmethod
    def large(cls) -> DepthAnythingConfig:
        """ViT-L/14: 1024 wide, 24 blocks, 16 heads; neck from blocks 5, 12, 18, 24. 335,315,649 parameters."""
        return cls(hidden_size=1024, num_layers=24, num_heads=16, vit_out_indices=(4, 11, 17, 23),
                   neck_sizes=(256, 512, 1024, 1024), fusion_size=256)

    @classmethod
    def preset(cls, name: str) -> DepthAnythingConfig:
        presets = {"small": cls.small, "base": cls.base, "large": cls.large}
        if name not in presets:
            raise ValueError(f"unknown Depth Anything V2 size {name!r}; choose one of {sorted(presets)}")
        return presets[name]()


# ------------------------------------------------------------------------------------------------ backbone
class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (Touvron et al., CaiT, 2021; used by DINOv2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DINOv2Block(nn.Module):
    """Pre-norm transformer block with layer scale: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, cfg: DepthAnythingConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.hidden_size // cfg.num_heads, qkv_bias=cfg.qkv_bias)
        self.ls1 = LayerScale(cfg.hidden_size)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = dpt.MLP(cfg.hidden_size, cfg.mlp_size)           # fc1, exact (erf) GELU, fc2
        self.ls2 = LayerScale(cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ls1(self.attn(self.norm1(x))) + x
        return self.ls2(self.mlp(self.norm2(x))) + x


class DINOv2(nn.Module):
    """DINOv2 ViT/14: patch embedding -> [CLS] + position embeddings -> blocks; the chosen blocks' outputs, each through
    the final LayerNorm, are returned: ([(B, L, D)] * levels, (h, w)). The CLS token stays first."""

    def __init__(self, cfg: DepthAnythingConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        # Only used for masked-image-modelling pre-training; kept so the files load and save one to one.
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.hidden_size)) if cfg.mask_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid * cfg.grid, cfg.hidden_size))
        self.blocks = nn.ModuleList(DINOv2Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def position_embeddings(self, h: int, w: int, square_input: bool) -> torch.Tensor:
        """The learned (grid x grid) position embeddings resized to the token grid (h, w): (1, L, D). As transformers:
        bicubic, align_corners=False, no antialias, computed in float32; untouched when the input is square and has the
        training grid (the reference's test; bicubic to the same size would give the same numbers anyway)."""
        grid = self.cfg.grid
        if square_input and h * w == grid * grid:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        # (1, D, grid, grid) as a permuted view, like the reference: the interpolation sees the same memory layout
        patch_pos = rearrange(patch_pos, "1 (gh gw) D -> 1 D gh gw", gh=grid)
        patch_pos = F.interpolate(patch_pos.float(), size=(h, w), mode="bicubic", align_corners=False)
        patch_pos = rearrange(patch_pos.to(self.pos_embed.dtype), "1 D h w -> 1 (h w) D")
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, pixels: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype))  # (B, D, h, w), h = H // 14
        h, w = x.shape[-2:]
        x = rearrange(x, "B D h w -> B (h w) D")
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, L, D)
        x = x + self.position_embeddings(h, w, square_input=pixels.shape[-2] == pixels.shape[-1])
        features = []
        for i, block in enumerate(self.blocks[:self.cfg.vit_out_indices[-1] + 1]):
            x = block(x)
            if i in self.cfg.vit_out_indices:
                features.append(self.norm(x))                     # (B, L, D); the same norm for every level
        return features, (h, w)


# ------------------------------------------------------------------------------------------------ neck
class Reassemble(nn.Module):
    """ViT tokens -> feature map: readout "ignore" (drop the CLS token), unflatten to (h, w), 1x1 conv to the level's
    width, then resize (transposed conv up, strided 3x3 conv down)."""

    def __init__(self, dim: int, channels: int, factor: float):
        super().__init__()
        self.project = nn.Conv2d(dim, channels, kernel_size=1)
        if factor > 1:
            self.resize = nn.ConvTranspose2d(channels, channels, kernel_size=int(factor), stride=int(factor))
        elif factor < 1:
            self.resize = nn.Conv2d(channels, channels, kernel_size=3, stride=round(1 / factor), padding=1)
        else:
            self.resize = nn.Identity()

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = rearrange(x[:, 1:], "B (h w) D -> B D h w", h=h, w=w).contiguous()  # contiguous NCHW, as the reference
        return self.resize(self.project(x))                      # (B, C, h*factor, w*factor); /2 rounds up


class FusionBlock(dpt.FusionBlock):
    """DPT's fusion block (x + unit1(skip), unit2, bilinear upsampling with align_corners=True, 1x1 conv), but the
    upsampling goes to an explicit `size` (the next level's map) when given, x2 otherwise (the last block)."""

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        if skip is not None:
            if skip.shape != x.shape:  # never for the published configs: `size` already matched them
                skip = F.interpolate(skip, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = x + self.unit1(skip)
        resize = {"scale_factor": 2} if size is None else {"size": tuple(size)}
        x = F.interpolate(self.unit2(x), **resize, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DepthAnythingNeck(nn.Module):
    """Levels of tokens -> one fused map at /1.75 of the input (8 h x 8 w). `fusion[0]` starts at the coarsest level."""

    def __init__(self, cfg: DepthAnythingConfig):
        super().__init__()
        self.reassemble = nn.ModuleList(Reassemble(cfg.hidden_size, c, f)
                                        for c, f in zip(cfg.neck_sizes, cfg.reassemble_factors))
        self.convs = nn.ModuleList(nn.Conv2d(c, cfg.fusion_size, kernel_size=3, padding=1, bias=False)
                                   for c in cfg.neck_sizes)
        self.fusion = nn.ModuleList(FusionBlock(cfg.fusion_size) for _ in cfg.neck_sizes)

    def forward(self, features: list[torch.Tensor], h: int, w: int) -> torch.Tensor:
        maps = [conv(reassemble(x, h, w)) for reassemble, conv, x in zip(self.reassemble, self.convs, features)]
        maps = maps[::-1]                                         # coarsest first: (B, F, h/2), (h), (2h), (4h) ...
        x = None
        for i, block in enumerate(self.fusion):
            size = maps[i + 1].shape[-2:] if i + 1 < len(maps) else None
            x = block(maps[i], size=size) if x is None else block(x, maps[i], size=size)
        return x                                                  # (B, F, 8h, 8w) for factors 4, 2, 1, 0.5


class DepthHead(nn.Module):
    """conv (F -> F/2), bilinear resize to (14 h, 14 w) with align_corners=True, conv (-> head_size), ReLU, 1x1 conv
    (-> 1), then ReLU (relative) or Sigmoid (metric), times max_depth."""

    def __init__(self, cfg: DepthAnythingConfig):
        super().__init__()
        f = cfg.fusion_size
        self.conv1 = nn.Conv2d(f, f // 2, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(f // 2, cfg.head_size, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(cfg.head_size, 1, kernel_size=1)
        self.output = nn.ReLU() if cfg.depth_type == "relative" else nn.Sigmoid()
        self.max_depth = cfg.max_depth

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = F.interpolate(self.conv1(x), size=size, mode="bilinear", align_corners=True)
        x = self.conv3(F.relu(self.conv2(x)))
        return (self.output(x) * self.max_depth).squeeze(1)      # (B, 14h, 14w)


# ------------------------------------------------------------------------------------------------ the model
class DepthAnythingV2(nn.Module, Loadable):
    """Depth Anything V2: pixels (B, 3, H, W), ImageNet-normalised -> predicted_depth (B, 14h, 14w), relative inverse
    depth (brighter = nearer)."""

    def __init__(self, cfg: DepthAnythingConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or DepthAnythingConfig.small()
        self.backbone = DINOv2(cfg)
        self.neck = DepthAnythingNeck(cfg)
        self.head = DepthHead(cfg)
        name_attention_layers(self)

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.pos_embed.dtype

    @property
    def device(self) -> torch.device:
        return self.backbone.pos_embed.device

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got shape {tuple(pixel_values.shape)}")
        p = self.config.patch_size
        if min(pixel_values.shape[-2:]) < p:
            raise ValueError(f"pixel_values height and width must be at least the patch size {p}, "
                             f"got {tuple(pixel_values.shape[-2:])}")
        features, (h, w) = self.backbone(pixel_values)
        return self.head(self.neck(features, h, w), (h * p, w * p))
