"""DPT-Hybrid (MiDaS v3 "dpt_hybrid"): the monocular depth estimator that gives SD2-depth its depth channel.

Ranftl, Bochkovskiy, Koltun, "Vision Transformers for Dense Prediction" (ICCV 2021). Four stages, top to bottom:

    image (B, 3, H, W)
      backbone   R50+ViT-B/16 (Dosovitskiy et al. 2021): a BiT ResNet whose stride-16 map becomes the ViT's tokens.
                 Returns four features: BiT stage 1 (/4) and stage 2 (/8) maps, ViT blocks 8 and 11 tokens (/16)
      reassemble tokens -> maps: fold the CLS token in (the "project" readout), 1x1 conv, resize (/16, /32)
      fusion     3x3 convs to one width, then RefineNet-style fusion from coarse to fine, x2 upsampling each time
      head       conv, x2 upsampling, conv, ReLU, 1x1 conv, ReLU  ->  predicted_depth (B, H, W)

The output is relative inverse depth: larger = nearer, non-negative, arbitrary scale.

The BiT ResNet (weight-standardised convs, TF "SAME" padding, GroupNorm) is in `bit_resnet.py`, with the names and
numbers of timm's `ResNetV2`, the module the original MiDaS code used; everything else is written out here. The backbone returns its intermediate features
explicitly (no forward hooks). Position embeddings are resized to the input's token grid with plain bilinear
interpolation (what transformers does), so any input whose sides are multiples of 16 works, e.g. 384 x 512.

Weights load from the hub layout (transformers' DPTForDepthEstimation, `checkpoints/transformers_format.py`) or the
original MiDaS names (inside the single-file SD2 checkpoint under `depth_model.model.`; `checkpoints/ldm_format.py`).

Shapes: B batch, C channels, H W pixels, h w token grid (H/16, W/16), L = 1 + h*w tokens (CLS first), D ViT width,
n heads, d head size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import Attention, name_attention_layers
from .loadable import Loadable
from .bit_resnet import BiTResNet


# ------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class DPTConfig:
    # BiT ResNet ("R50" without its last stage): a 7x7 stem, then bottleneck stages at strides 4, 8, 16
    stem_width: int = 64
    stage_widths: tuple[int, ...] = (256, 512, 1024)
    stage_depths: tuple[int, ...] = (3, 4, 9)
    num_groups: int = 32                   # GroupNorm groups
    # ViT-B/16 on the ResNet's stride-16 map (the "patches" are 1x1 projections of that map)
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_size: int = 3072
    layer_norm_eps: float = 1e-12          # transformers' config; timm (and the original MiDaS) use 1e-6
    image_size: int = 384                  # position embeddings are learned for (image_size / patch_size)^2 tokens
    patch_size: int = 16
    vit_out_indices: tuple[int, int] = (8, 11)  # ViT blocks whose outputs feed the neck (levels 2 and 3)
    # neck and head; levels 0, 1 are the BiT stage 1, 2 maps, levels 2, 3 the reassembled ViT tokens
    neck_sizes: tuple[int, int, int, int] = (256, 512, 768, 768)
    reassemble_factors: tuple[float, float] = (1.0, 0.5)  # resize of levels 2, 3: 1 keeps /16, 0.5 gives /32
    fusion_size: int = 256
    head_size: int = 32                    # hidden width of the head's last 3x3 conv (fixed in the original code)

    def __post_init__(self):
        if (len(self.neck_sizes), len(self.vit_out_indices), len(self.reassemble_factors)) != (4, 2, 2):
            raise ValueError(f"DPT-Hybrid has 4 levels (2 BiT maps, 2 ViT outputs): got neck_sizes {self.neck_sizes}, "
                             f"vit_out_indices {self.vit_out_indices}, reassemble_factors {self.reassemble_factors}")
        if tuple(self.neck_sizes[:2]) != tuple(self.stage_widths[:2]):
            raise ValueError(f"neck_sizes[:2] {self.neck_sizes[:2]} must equal the BiT stage widths "
                             f"{self.stage_widths[:2]}: levels 0 and 1 are those stages' maps, unchanged")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if max(self.vit_out_indices) >= self.num_layers:
            raise ValueError(f"vit_out_indices {self.vit_out_indices} must be < num_layers {self.num_layers}")

    @classmethod
    def sd2_depth(cls) -> DPTConfig:
        """Intel/dpt-hybrid-midas, as shipped in stable-diffusion-2-depth/depth_estimator: the defaults above
        (122,377,985 parameters)."""
        return cls()


# ------------------------------------------------------------------------------------------------ backbone
class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: DPTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.hidden_size // cfg.num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.mlp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class HybridViT(nn.Module):
    """R50+ViT-B/16: BiT ResNet stages -> 1x1 projection to tokens -> [CLS] + position embeddings -> ViT blocks.

    forward(pixels) returns ([stage-1 map, stage-2 map, block tokens, block tokens], (h, w)); token tensors keep the CLS
    token first: (B, L, D). Parameter names follow timm's `vit_base_r50_s16_384` (the original MiDaS layout).
    """

    def __init__(self, cfg: DPTConfig):
        super().__init__()
        self.cfg = cfg
        self.resnet = BiTResNet(cfg.stage_depths, cfg.stage_widths, cfg.stem_width, cfg.num_groups)
        self.proj = nn.Conv2d(cfg.stage_widths[-1], cfg.hidden_size, kernel_size=1)
        grid = cfg.image_size // cfg.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, cfg.hidden_size))
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.num_layers))
        # The ViT's final LayerNorm: stored in every checkpoint, not used for depth (the neck reads blocks 8 and 11).
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def position_embeddings(self, h: int, w: int) -> torch.Tensor:
        """The learned (grid x grid) position embeddings resized to (h, w): bilinear, align_corners=False, no
        antialias, as transformers and the original DPT code do (timm's own resize, bicubic + antialias, differs)."""
        grid = self.cfg.image_size // self.cfg.patch_size
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = rearrange(patch_pos, "1 (gh gw) D -> 1 D gh gw", gh=grid)
        patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bilinear", align_corners=False)
        return torch.cat([cls_pos, rearrange(patch_pos, "1 D h w -> 1 (h w) D")], dim=1)  # (1, L, D)

    def forward(self, pixels: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        x = self.resnet.stem(pixels)                              # (B, stem, H/4, W/4)
        maps = []
        for stage in self.resnet.stages:
            x = stage(x)
            maps.append(x)                                        # (B, C_i, H/4, W/4), (B, C_i, H/8, W/8), ... /16
        x = self.proj(maps[-1])                                   # (B, D, h, w), h = H/16
        h, w = x.shape[-2:]
        x = rearrange(x, "B D h w -> B (h w) D")
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, L, D)
        x = x + self.position_embeddings(h, w)
        tokens = []
        for i, block in enumerate(self.blocks[:max(self.cfg.vit_out_indices) + 1]):
            x = block(x)
            if i in self.cfg.vit_out_indices:
                tokens.append(x)
        return [maps[0], maps[1], *tokens], (h, w)


# ------------------------------------------------------------------------------------------------ neck
class Reassemble(nn.Module):
    """ViT tokens -> feature map: readout "project" (DPT Sec. 3: concat the CLS token to every token, Linear, GELU),
    unflatten to (h, w), 1x1 conv to the level's width, then resize (transposed conv up, strided conv down)."""

    def __init__(self, dim: int, channels: int, factor: float):
        super().__init__()
        self.readout = nn.Linear(2 * dim, dim)
        self.project = nn.Conv2d(dim, channels, kernel_size=1)
        if factor > 1:
            self.resize = nn.ConvTranspose2d(channels, channels, kernel_size=int(factor), stride=int(factor))
        elif factor < 1:
            self.resize = nn.Conv2d(channels, channels, kernel_size=3, stride=int(1 / factor), padding=1)
        else:
            self.resize = nn.Identity()

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        cls, x = x[:, :1], x[:, 1:]                               # (B, 1, D), (B, h*w, D)
        x = F.gelu(self.readout(torch.cat([x, cls.expand_as(x)], dim=-1)))
        # transpose + reshape (not einops): the same strides as transformers, so the convs pick the same kernels and
        # round the same way (a channels-last view for B > 1, a contiguous-looking one for B = 1)
        x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)      # (B, D, h, w)
        return self.resize(self.project(x))                       # (B, C, h*factor, w*factor)


class ResidualUnit(nn.Module):
    """Pre-activation residual conv unit: x + conv(relu(conv(relu(x))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """RefineNet-style fusion: x + unit1(skip), unit2, x2 bilinear upsampling (align_corners=True), 1x1 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.unit1 = ResidualUnit(channels)  # unused in the first (coarsest) block, which has no skip input
        self.unit2 = ResidualUnit(channels)
        self.out_conv = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            if skip.shape != x.shape:  # only for sides that are not multiples of 32 (transformers does the same)
                skip = F.interpolate(skip, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = x + self.unit1(skip)
        x = F.interpolate(self.unit2(x), scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)                                   # (B, C, 2h, 2w)


class DPTNeck(nn.Module):
    """Four features -> one fused map at /2 of the input. `fusion[0]` starts at the coarsest level (level 3)."""

    def __init__(self, cfg: DPTConfig):
        super().__init__()
        # levels 0, 1 (BiT maps) need no reassembling: Identity keeps the indices aligned with the levels
        self.reassemble = nn.ModuleList([nn.Identity(), nn.Identity()] + [
            Reassemble(cfg.hidden_size, cfg.neck_sizes[2 + i], f) for i, f in enumerate(cfg.reassemble_factors)])
        self.convs = nn.ModuleList(nn.Conv2d(c, cfg.fusion_size, kernel_size=3, padding=1, bias=False)
                                   for c in cfg.neck_sizes)
        self.fusion = nn.ModuleList(FusionBlock(cfg.fusion_size) for _ in cfg.neck_sizes)

    def forward(self, features: list[torch.Tensor], h: int, w: int) -> torch.Tensor:
        maps = features[:2] + [self.reassemble[i](features[i], h, w) for i in (2, 3)]  # /4, /8, /16, /32
        maps = [conv(m) for conv, m in zip(self.convs, maps)]    # all (B, fusion_size, ., .)
        x = self.fusion[0](maps[3])                               # /16
        for block, skip in zip(self.fusion[1:], reversed(maps[:3])):
            x = block(x, skip)                                    # /8, /4, /2
        return x


# ------------------------------------------------------------------------------------------------ the model
class DPTDepthModel(nn.Module, Loadable):
    """DPT-Hybrid: pixels (B, 3, H, W) normalised to [-1, 1] -> predicted_depth (B, H, W), relative inverse depth."""

    def __init__(self, cfg: DPTConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or DPTConfig.sd2_depth()
        self.backbone = HybridViT(cfg)
        self.neck = DPTNeck(cfg)
        f = cfg.fusion_size
        self.head = nn.Sequential(
            nn.Conv2d(f, f // 2, kernel_size=3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),  # /2 -> full resolution
            nn.Conv2d(f // 2, cfg.head_size, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(cfg.head_size, 1, kernel_size=1),
            nn.ReLU(),                                            # depth is non-negative
        )
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
        if pixel_values.shape[-2] % 16 or pixel_values.shape[-1] % 16:
            raise ValueError(f"pixel_values height and width must be multiples of 16 (the token grid is /16), "
                             f"got {tuple(pixel_values.shape[-2:])}")
        features, (h, w) = self.backbone(pixel_values)
        return self.head(self.neck(features, h, w)).squeeze(1)  # (B, H, W)
