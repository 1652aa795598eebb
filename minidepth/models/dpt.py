"""DPT-Hybrid (MiDaS v3 "dpt_hybrid"): the monocular depth estimator that gives SD2-depth its depth channel.

Ranftl, Bochkovskiy, Koltun, "Vision Transformers for Dense Prediction" (ICCV 2021). Four stages, top to bottom:

    image (B, 3, H, W)
      backbone   R50+ViT-B/16 (Dosovitskiy et al. 2021): a BiT ResNet whose stride-16 map becomes the ViT's tokens.
                 Returns four features: BiT stage 1 (/4) and stage 2 (/8) maps, ViT blocks 8 and 11 tokens (/16)
      reassemble tokens -> maps: fold the CLS token in (the "project" readout), 1x1 conv, resize (/16, /32)
      fusion     3x3 convs to one width, then RefineNet-style fusion from coarse to fine, x2 upsampling each time
      head       conv, x2 upsampling, conv, ReLU, 1x1 conv, ReLU  ->  predicted_depth (B, H, W)

The output is relative inverse depth: larger = nearer, non-negative, arbitrary scale.

The BiT ResNet (weight-standardised convs, TF "SAME" padding, GroupNorm) is timm's `ResNetV2`, the same module the
original MiDaS code used; everything else is written out here. The backbone returns its intermediate features
explicitly (no forward hooks). Position embeddings are resized to the input's token grid with plain bilinear
interpolation (what transformers does), so any input whose sides are multiples of 16 works, e.g. 384 x 512.

Weights load from the hub layout (`TRANSFORMERS_KEYS`, transformers' DPTForDepthEstimation) or the original MiDaS names
(`MIDAS_KEYS`; inside the single-file SD2 checkpoint under `depth_model.model.`).

Shapes: B batch, C channels, H W pixels, h w token grid (H/16, W/16), L = 1 + h*w tokens (CLS first), D ViT width,
n heads, d head size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import GroupNormAct, StdConv2dSame
from timm.models.resnetv2 import ResNetV2
from torch import nn

from ..checkpoints import KeyMap, Rule, build_on_meta, find_weights, load_weights, prefixed, read_json, save_component


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
        """Intel/dpt-hybrid-midas, as shipped in stable-diffusion-2-depth/depth_estimator."""
        return cls()

    @classmethod
    def from_dict(cls, d: dict) -> DPTConfig:
        """From transformers' DPT `config.json` (hybrid only). Traps, spelled out:
        - `backbone_config.hidden_sizes` lists 4 widths but only the first `len(depths)` stages exist;
        - `backbone_out_indices` has 4 entries but the hybrid uses only the last two (ViT blocks); levels 0 and 1
          are always BiT stages 1 and 2;
        - `reassemble_factors[:2]` are ignored for the hybrid (those levels are already maps);
        - `layer_norm_eps` is 1e-12 (transformers' ViT default), not timm's 1e-6;
        - `use_auxiliary_head` only concerns DPTForSemanticSegmentation: the depth model has no such head;
        - `patch_size` 16 only sizes the position-embedding grid: the tokens are 1x1 projections of the ResNet map.
        """
        checks = {"is_hybrid": True, "readout_type": "project", "use_batch_norm_in_fusion_residual": False,
                  "add_projection": False, "head_in_index": -1, "hidden_act": "gelu", "qkv_bias": True,
                  "num_channels": 3, "neck_ignore_stages": [0, 1]}
        bb = d.get("backbone_config") or {}
        bb_checks = {"layer_type": "bottleneck", "global_padding": "SAME", "width_factor": 1, "hidden_act": "relu"}
        for where, src, want in (("", d, checks), ("backbone_config.", bb, bb_checks)):
            for key, value in want.items():
                if src.get(key, value) != value:
                    raise ValueError(f"DPT config: {where}{key}={src[key]!r} is not supported (only {value!r})")
        if d.get("use_bias_in_fusion_residual") is False:
            raise ValueError("DPT config: use_bias_in_fusion_residual=False is not supported")
        depths = tuple(bb["depths"])
        widths = tuple(bb["hidden_sizes"][:len(depths)])
        featmap = d.get("backbone_featmap_shape")
        if featmap is not None and featmap[1] != widths[-1]:
            raise ValueError(f"DPT config: backbone_featmap_shape {featmap} disagrees with the last BiT width "
                             f"{widths[-1]}")
        factors = d.get("reassemble_factors", [1, 1, 1, 0.5])
        return cls(stem_width=bb["embedding_size"], stage_widths=widths, stage_depths=depths,
                   num_groups=bb["num_groups"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
                   num_heads=d["num_attention_heads"], mlp_size=d["intermediate_size"],
                   layer_norm_eps=d.get("layer_norm_eps", 1e-12), image_size=d.get("image_size", 384),
                   patch_size=d.get("patch_size", 16), vit_out_indices=tuple(d["backbone_out_indices"][2:]),
                   neck_sizes=tuple(d["neck_hidden_sizes"]), reassemble_factors=tuple(float(f) for f in factors[2:]),
                   fusion_size=d["fusion_hidden_size"])

    def to_dict(self) -> dict:
        """transformers' DPT config.json for this model (what `from_dict` reads; transformers loads it too)."""
        return {"architectures": ["DPTForDepthEstimation"], "model_type": "dpt", "is_hybrid": True,
                "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads, "intermediate_size": self.mlp_size, "hidden_act": "gelu",
                "layer_norm_eps": self.layer_norm_eps, "image_size": self.image_size, "patch_size": self.patch_size,
                "num_channels": 3, "qkv_bias": True, "readout_type": "project",
                "backbone_out_indices": [2, 5, *self.vit_out_indices],  # the hybrid reads only the last two
                "neck_hidden_sizes": list(self.neck_sizes), "neck_ignore_stages": [0, 1],
                "reassemble_factors": [1, 1, *self.reassemble_factors], "fusion_hidden_size": self.fusion_size,
                "head_in_index": -1, "use_batch_norm_in_fusion_residual": False,
                "backbone_featmap_shape": [1, self.stage_widths[-1], self.image_size // self.patch_size,
                                           self.image_size // self.patch_size],
                "backbone_config": {"model_type": "bit", "layer_type": "bottleneck", "global_padding": "SAME",
                                    "embedding_dynamic_padding": True, "hidden_act": "relu",
                                    "embedding_size": self.stem_width, "num_groups": self.num_groups,
                                    "depths": list(self.stage_depths),
                                    "hidden_sizes": [*self.stage_widths, 2 * self.stage_widths[-1]],
                                    "out_features": [f"stage{i + 1}" for i in range(len(self.stage_depths))]}}


# ------------------------------------------------------------------------------------------------ backbone
class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm layout)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "B L (three n d) -> three B n L d", three=3, n=self.heads)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(x, "B n L d -> B L (n d)"))


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
        self.attn = Attention(cfg.hidden_size, cfg.num_heads)
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
        self.resnet = ResNetV2(layers=cfg.stage_depths, channels=cfg.stage_widths, stem_chs=cfg.stem_width,
                               num_classes=0, global_pool="", preact=False, stem_type="same",
                               conv_layer=partial(StdConv2dSame, eps=1e-8),
                               norm_layer=partial(GroupNormAct, num_groups=cfg.num_groups))
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
class DPTDepthModel(nn.Module):
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

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, variant: str | None = None) -> DPTDepthModel:
        """A hub `depth_estimator/` folder: config.json + model[.variant].safetensors (transformers names)."""
        folder = os.fspath(folder)
        cfg = DPTConfig.from_dict(read_json(os.path.join(folder, "config.json")))
        model = build_on_meta(lambda: cls(cfg))
        load_weights(model, find_weights(folder, ("model", "pytorch_model"), variant), TRANSFORMERS_KEYS, dtype=dtype,
                     device=device)
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write a transformers `depth_estimator/` folder (config.json + model.safetensors)."""
        save_component(folder, self.config.to_dict(), self, TRANSFORMERS_KEYS, "model.safetensors")


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ weight names
_QKV = ("query", "key", "value")

TRANSFORMERS_KEYS = KeyMap("transformers DPTForDepthEstimation (hybrid)", (
    Rule("backbone.cls_token", "dpt.embeddings.cls_token"),
    Rule("backbone.pos_embed", "dpt.embeddings.position_embeddings"),
    Rule("backbone.resnet.stem.conv.{rest}", "dpt.embeddings.backbone.bit.embedder.convolution.{rest}"),
    Rule("backbone.resnet.stem.norm.{rest}", "dpt.embeddings.backbone.bit.embedder.norm.{rest}"),
    Rule("backbone.resnet.stages.{i}.blocks.{j}.{rest}",
         "dpt.embeddings.backbone.bit.encoder.stages.{i}.layers.{j}.{rest}"),
    Rule("backbone.proj.{rest}", "dpt.embeddings.projection.{rest}"),
    Rule("backbone.blocks.{i}.norm1.{rest}", "dpt.encoder.layer.{i}.layernorm_before.{rest}"),
    Rule("backbone.blocks.{i}.attn.qkv.{rest}",
         tuple(f"dpt.encoder.layer.{{i}}.attention.attention.{n}.{{rest}}" for n in _QKV), "cat"),
    Rule("backbone.blocks.{i}.attn.proj.{rest}", "dpt.encoder.layer.{i}.attention.output.dense.{rest}"),
    Rule("backbone.blocks.{i}.norm2.{rest}", "dpt.encoder.layer.{i}.layernorm_after.{rest}"),
    Rule("backbone.blocks.{i}.mlp.fc1.{rest}", "dpt.encoder.layer.{i}.intermediate.dense.{rest}"),
    Rule("backbone.blocks.{i}.mlp.fc2.{rest}", "dpt.encoder.layer.{i}.output.dense.{rest}"),
    Rule("backbone.norm.{rest}", "dpt.layernorm.{rest}"),
    Rule("neck.reassemble.{i}.readout.{rest}", "neck.reassemble_stage.readout_projects.{i}.0.{rest}"),
    Rule("neck.reassemble.{i}.project.{rest}", "neck.reassemble_stage.layers.{i}.projection.{rest}"),
    Rule("neck.reassemble.{i}.resize.{rest}", "neck.reassemble_stage.layers.{i}.resize.{rest}"),
    Rule("neck.convs.{rest}", "neck.convs.{rest}"),
    Rule("neck.fusion.{i}.unit{j}.conv{k}.{rest}",
         "neck.fusion_stage.layers.{i}.residual_layer{j}.convolution{k}.{rest}"),
    Rule("neck.fusion.{i}.out_conv.{rest}", "neck.fusion_stage.layers.{i}.projection.{rest}"),
    Rule("head.{rest}", "head.head.{rest}"),
))
# DPTForDepthEstimation saves no pooler and no auxiliary head (those belong to DPTModel / DPTForSemanticSegmentation),
# so the hub file's 414 tensors map one to one.

MIDAS_RULES = (
    Rule("backbone.cls_token", "pretrained.model.cls_token"),
    Rule("backbone.pos_embed", "pretrained.model.pos_embed"),
    Rule("backbone.resnet.{rest}", "pretrained.model.patch_embed.backbone.{rest}"),
    Rule("backbone.proj.{rest}", "pretrained.model.patch_embed.proj.{rest}"),
    Rule("backbone.blocks.{rest}", "pretrained.model.blocks.{rest}"),
    Rule("backbone.norm.{rest}", "pretrained.model.norm.{rest}"),
    Rule("neck.reassemble.{i}.readout.{rest}", "pretrained.act_postprocess{i+1}.0.project.0.{rest}"),
    Rule("neck.reassemble.{i}.project.{rest}", "pretrained.act_postprocess{i+1}.3.{rest}"),
    Rule("neck.reassemble.{i}.resize.{rest}", "pretrained.act_postprocess{i+1}.4.{rest}"),
    Rule("neck.convs.{i}.{rest}", "scratch.layer{i+1}_rn.{rest}"),
    Rule("neck.fusion.{i}.unit{j}.{rest}", "scratch.refinenet{4-i}.resConfUnit{j}.{rest}"),
    Rule("neck.fusion.{i}.out_conv.{rest}", "scratch.refinenet{4-i}.out_conv.{rest}"),
    Rule("head.{rest}", "scratch.output_conv.{rest}"),
)
# The original MiDaS file `dpt_hybrid-midas-501f0c75.pt` (368 tensors) also keeps timm's ImageNet classifier of the ViT.
MIDAS_KEYS = KeyMap("MiDaS dpt_hybrid", MIDAS_RULES, ignore=("pretrained.model.head.*",))
# The same names inside the single-file SD2-depth checkpoint (512-depth-ema.safetensors); other components' tensors
# of that file are for their own loaders to take.
LDM_KEYS = KeyMap("LDM depth_model (MiDaS dpt_hybrid)", prefixed("depth_model.model.", MIDAS_RULES),
                  ignore=("depth_model.model.pretrained.model.head.*",))
