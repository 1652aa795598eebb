"""Depth Anything V2 in transformers' folder layout: `config.json` and tensor names of DepthAnythingForDepthEstimation.

    Depth-Anything-V2-{Small,Base,Large}-hf/   config.json + model.safetensors + preprocessor_config.json

`depth_anything_config_from_dict` spells out the traps of transformers' keys, `DEPTH_ANYTHING_KEYS` lists how our
parameter names become the file's (keymap.py explains the pattern syntax), `DEPTH_ANYTHING` ties them together and
`FOLDER_FORMATS` registers it by model class (merged into pretrained.py's table), so

    model = DepthAnythingV2.from_pretrained("Depth-Anything-V2-Small-hf")     # and model.save_pretrained(folder)

The published configs (no weights) ship in minidepth/data/depth-anything-v2/<small|base|large>/: `packaged_folder`,
`packaged_config` and `image_processor` read them. Provenance: Small's config.json and preprocessor_config.json are the
values of depth-anything/Depth-Anything-V2-Small-hf as published (June 2024: transformers 4.42 era, hence no
`depth_estimation_type` / `max_depth` keys: relative depth, multiplier 1). Base and Large were written from the same
recipe, transformers' `convert_depth_anything_to_hf.py` (get_dpt_config, "v2" branches: out_indices [3, 6, 9, 12] /
[5, 12, 18, 24], fusion 128 / 256, neck [96, 192, 384, 768] / [256, 512, 1024, 1024]) over facebook/dinov2-base
(768 wide, 12 heads, 12 layers) and facebook/dinov2-large (1024, 16, 24), with keys written out where the hub files
rely on Dinov2Config defaults. The preprocessor is the one that script saves: DPTImageProcessor, 518 x 518,
keep_aspect_ratio, ensure_multiple_of 14, bicubic (resample 3), ImageNet mean and std.
"""

from __future__ import annotations

from pathlib import Path

from ..dpt_processing import DPTImageProcessor
from ..models.depth_anything import DepthAnythingConfig, DepthAnythingV2
from .keymap import KeyMap, Rule
from .layouts import FolderFormat
from .loader import read_json

PACKAGED = Path(__file__).resolve().parents[1] / "data" / "depth-anything-v2"
SIZES = ("small", "base", "large")

# transformers' DepthAnythingConfig when `backbone_config` is absent (its `sub_configs_defaults`): a V1-Small layout
DEFAULT_BACKBONE = {"model_type": "dinov2", "image_size": 518, "hidden_size": 384, "num_attention_heads": 6,
                    "out_indices": [9, 10, 11, 12], "reshape_hidden_states": False}
# transformers' Dinov2Config defaults, which a partial `backbone_config` falls back to (NOT the DINOv2-S values)
DINOV2_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "mlp_ratio": 4,
                   "hidden_act": "gelu", "layer_norm_eps": 1e-6, "image_size": 224, "patch_size": 14,
                   "num_channels": 3, "qkv_bias": True, "use_swiglu_ffn": False, "apply_layernorm": True,
                   "reshape_hidden_states": True, "use_mask_token": True}


def _number(x):
    """4.0 -> 4 (transformers' strict config types want ints where the value is whole), 0.5 stays 0.5."""
    return int(x) if float(x).is_integer() else float(x)


def _out_stages(bb: dict, num_layers: int) -> list[int]:
    """The backbone's output stages as transformers counts them: stage 0 is the embeddings, stage i the output of
    block i (1-based). `out_indices` and `out_features` ("stage3") may both be given; negative indices count back."""
    stages = ["stem"] + [f"stage{i}" for i in range(1, num_layers + 1)]
    indices, features = bb.get("out_indices"), bb.get("out_features")
    if indices is not None:
        indices = [i % len(stages) for i in indices]
    if features is not None:
        unknown = [f for f in features if f not in stages]
        if unknown:
            raise ValueError(f"Depth Anything config: backbone_config.out_features {unknown} are not stages of a "
                             f"{num_layers}-block DINOv2")
        from_features = [stages.index(f) for f in features]
        if indices is not None and indices != from_features:
            raise ValueError(f"Depth Anything config: backbone_config.out_indices {bb['out_indices']} and "
                             f"out_features {features} disagree")
        indices = from_features
    return indices if indices is not None else [num_layers]  # Dinov2Config's default: the last stage only


def depth_anything_config_from_dict(d: dict) -> DepthAnythingConfig:
    """From transformers' DepthAnythingConfig `config.json`. Traps, spelled out:
    - the ViT lives in `backbone_config` (a Dinov2Config); keys it leaves out take Dinov2Config's defaults, which are
      ViT-B's (768 wide, 12 heads) with `image_size` 224 and `reshape_hidden_states` true -- not the Small model's.
      Only a missing `backbone_config` altogether gets DepthAnythingConfig's own default (V1-Small, 518, stages
      9-12). A `backbone` name (timm / hub backbone) instead of a config is not supported;
    - `out_indices` / `out_features` count stages, where stage 0 is the embeddings and stage i the output of block
      i (1-based): V2-Small's [3, 6, 9, 12] are our 0-based `vit_out_indices` (2, 5, 8, 11). Stage 0 is refused;
    - `reshape_hidden_states` must be false: the neck expects token sequences with the CLS token first (true makes
      transformers' own neck fail); `apply_layernorm` must be true (each level goes through the final LayerNorm);
    - `reassemble_hidden_size` is the reassemble convs' input width: it must equal the ViT width;
    - `patch_size` appears twice (top level: the head's output size; backbone: the patch conv): they must agree;
    - `max_depth` multiplies the output in transformers 5 even for relative depth (default 1; files from before the
      metric models, like the published V2 ones, have no such key). A null `max_depth` with relative depth is read as
      1 (transformers would fail on it); metric depth needs a number;
    - `mlp_ratio` sets the MLP width (int(hidden_size * mlp_ratio)): DINOv2 configs have no `intermediate_size`;
    - `layerscale_value`, `initializer_range`, `drop_path_rate`, the dropouts, `use_pretrained_backbone` concern
      initialisation and training only; ignored.
    """
    if d.get("backbone_config") is None and d.get("backbone"):
        raise ValueError(f"Depth Anything config: backbone={d['backbone']!r} (a named timm/hub backbone) is not "
                         "supported; only an inline DINOv2 backbone_config")
    bb = {**DINOV2_DEFAULTS, **(d.get("backbone_config") or DEFAULT_BACKBONE)}
    if bb.get("model_type", "dinov2") != "dinov2":
        raise ValueError(f"Depth Anything config: backbone_config.model_type={bb['model_type']!r} is not supported "
                         "(only 'dinov2')")
    want = {"hidden_act": "gelu", "num_channels": 3, "use_swiglu_ffn": False, "apply_layernorm": True,
            "reshape_hidden_states": False}
    for key, value in want.items():
        if bb[key] != value:
            raise ValueError(f"Depth Anything config: backbone_config.{key}={bb[key]!r} is not supported "
                             f"(only {value!r})")
    for key, value in {"head_in_index": -1}.items():
        if d.get(key, value) != value:
            raise ValueError(f"Depth Anything config: {key}={d[key]!r} is not supported (only {value!r})")
    sizes = {}
    for where, value in (("image_size", bb["image_size"]), ("patch_size", bb["patch_size"]),
                         ("top-level patch_size", d.get("patch_size", 14))):
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise ValueError(f"Depth Anything config: {where}={value} is not square; only square grids are "
                                 "supported (the position embeddings are a square grid)")
            value = value[0]
        sizes[where] = int(value)
    if sizes["patch_size"] != sizes["top-level patch_size"]:
        raise ValueError(f"Depth Anything config: patch_size {sizes['top-level patch_size']} (top level) and "
                         f"backbone_config.patch_size {sizes['patch_size']} differ")
    hidden, layers = bb["hidden_size"], bb["num_hidden_layers"]
    if d.get("reassemble_hidden_size", 384) != hidden:
        raise ValueError(f"Depth Anything config: reassemble_hidden_size {d.get('reassemble_hidden_size', 384)} "
                         f"must equal the backbone width {hidden}")
    stages = _out_stages(bb, layers)
    if 0 in stages:
        raise ValueError("Depth Anything config: output stage 0 (the embeddings, before any block) is not supported")
    depth_type = d.get("depth_estimation_type", "relative")
    max_depth = d.get("max_depth", 1)
    if max_depth is None:
        if depth_type == "metric":
            raise ValueError("Depth Anything config: metric depth needs a max_depth (20 indoor, 80 outdoor)")
        max_depth = 1
    return DepthAnythingConfig(
        hidden_size=hidden, num_layers=layers, num_heads=bb["num_attention_heads"], mlp_ratio=bb["mlp_ratio"],
        qkv_bias=bb["qkv_bias"], layer_norm_eps=bb["layer_norm_eps"], image_size=sizes["image_size"],
        patch_size=sizes["patch_size"], mask_token=bb["use_mask_token"],
        vit_out_indices=tuple(s - 1 for s in stages),
        neck_sizes=tuple(d.get("neck_hidden_sizes", (48, 96, 192, 384))),
        reassemble_factors=tuple(_number(f) for f in d.get("reassemble_factors", (4, 2, 1, 0.5))),
        fusion_size=d.get("fusion_hidden_size", 64), head_size=d.get("head_hidden_size", 32),
        depth_type=depth_type, max_depth=float(max_depth))


def depth_anything_config_to_dict(cfg: DepthAnythingConfig) -> dict:
    """transformers' config.json for this model (what `from_dict` reads; transformers loads it too). Every backbone
    key is written out, so nothing depends on Dinov2Config's defaults."""
    stages = [i + 1 for i in cfg.vit_out_indices]
    return {"architectures": ["DepthAnythingForDepthEstimation"], "model_type": "depth_anything",
            "backbone_config": {
                "model_type": "dinov2", "architectures": ["Dinov2Model"], "hidden_size": cfg.hidden_size,
                "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
                "mlp_ratio": _number(cfg.mlp_ratio), "hidden_act": "gelu", "layer_norm_eps": cfg.layer_norm_eps,
                "image_size": cfg.image_size, "patch_size": cfg.patch_size, "num_channels": 3,
                "qkv_bias": cfg.qkv_bias, "layerscale_value": 1.0, "use_swiglu_ffn": False,
                "use_mask_token": cfg.mask_token, "apply_layernorm": True, "reshape_hidden_states": False,
                "out_features": [f"stage{s}" for s in stages], "out_indices": stages},
            "patch_size": cfg.patch_size, "reassemble_hidden_size": cfg.hidden_size,
            "reassemble_factors": [_number(f) for f in cfg.reassemble_factors],
            "neck_hidden_sizes": list(cfg.neck_sizes), "fusion_hidden_size": cfg.fusion_size,
            "head_in_index": -1, "head_hidden_size": cfg.head_size, "depth_estimation_type": cfg.depth_type,
            "max_depth": _number(cfg.max_depth)}


# ------------------------------------------------------------------------------------------------ tensor names
def _rules(attention: dict[str, str]) -> tuple[Rule, ...]:
    layer = "backbone.encoder.layer.{i}."
    return (
        Rule("backbone.patch_embed.{rest}", "backbone.embeddings.patch_embeddings.projection.{rest}"),
        Rule("backbone.cls_token", "backbone.embeddings.cls_token"),
        Rule("backbone.mask_token", "backbone.embeddings.mask_token"),
        Rule("backbone.pos_embed", "backbone.embeddings.position_embeddings"),
        Rule("backbone.blocks.{i}.norm1.{rest}", layer + "norm1.{rest}"),
        *(Rule(f"backbone.blocks.{{i}}.attn.{ours}.{{rest}}", layer + theirs + ".{rest}")
          for ours, theirs in attention.items()),
        Rule("backbone.blocks.{i}.ls1.gamma", layer + "layer_scale1.lambda1"),
        Rule("backbone.blocks.{i}.norm2.{rest}", layer + "norm2.{rest}"),
        Rule("backbone.blocks.{i}.mlp.{rest}", layer + "mlp.{rest}"),  # fc1, fc2 keep their names
        Rule("backbone.blocks.{i}.ls2.gamma", layer + "layer_scale2.lambda1"),
        Rule("backbone.norm.{rest}", "backbone.layernorm.{rest}"),
        Rule("neck.reassemble.{i}.project.{rest}", "neck.reassemble_stage.layers.{i}.projection.{rest}"),
        Rule("neck.reassemble.{i}.resize.{rest}", "neck.reassemble_stage.layers.{i}.resize.{rest}"),
        Rule("neck.convs.{rest}", "neck.convs.{rest}"),
        Rule("neck.fusion.{i}.unit{j}.conv{k}.{rest}",
             "neck.fusion_stage.layers.{i}.residual_layer{j}.convolution{k}.{rest}"),
        Rule("neck.fusion.{i}.out_conv.{rest}", "neck.fusion_stage.layers.{i}.projection.{rest}"),
        Rule("head.conv{i}.{rest}", "head.conv{i}.{rest}"),
    )


# The hub files (and what transformers 5 writes: it saves the legacy names) call the attention projections
# `attention.attention.{query,key,value}` and `attention.output.dense`. No CLS readout exists (readout "ignore"), the
# identity resize of level 2 has no weights, and `neck.fusion_stage.layers.0.residual_layer1` (the coarsest block has
# no skip input) is stored though unused: the map is one to one.
DEPTH_ANYTHING_KEYS = KeyMap("transformers DepthAnythingForDepthEstimation", _rules(
    {"to_q": "attention.attention.query", "to_k": "attention.attention.key", "to_v": "attention.attention.value",
     "to_out": "attention.output.dense"}))
# transformers 5's in-memory names (Dinov2Attention.q_proj ...), in case a file was written with them.
DEPTH_ANYTHING_V5_KEYS = KeyMap("transformers 5 DepthAnythingForDepthEstimation (q_proj names)", _rules(
    {"to_q": "attention.q_proj", "to_k": "attention.k_proj", "to_v": "attention.v_proj", "to_out": "attention.o_proj"}))


def depth_anything_keymap_for(names) -> KeyMap:
    """DEPTH_ANYTHING_V5_KEYS if the file names the attention `q_proj`, else DEPTH_ANYTHING_KEYS (the hub's)."""
    return DEPTH_ANYTHING_V5_KEYS if any(".attention.q_proj." in n for n in names) else DEPTH_ANYTHING_KEYS


DEPTH_ANYTHING = FolderFormat(depth_anything_config_from_dict, depth_anything_config_to_dict, ("model", "pytorch_model"),
                              depth_anything_keymap_for, DEPTH_ANYTHING_KEYS, "model.safetensors")

FOLDER_FORMATS = {DepthAnythingV2: DEPTH_ANYTHING}


# ------------------------------------------------------------------------------------------------ packaged configs
def packaged_folder(size: str = "small") -> Path:
    """minidepth/data/depth-anything-v2/<size>/: the published config.json + preprocessor_config.json, no weights."""
    if size not in SIZES:
        raise ValueError(f"unknown Depth Anything V2 size {size!r}; choose one of {SIZES}")
    return PACKAGED / size


def packaged_config(size: str = "small") -> DepthAnythingConfig:
    """The published checkpoint's config.json, read through `depth_anything_config_from_dict`."""
    return depth_anything_config_from_dict(read_json(packaged_folder(size) / "config.json"))


def image_processor(size: str = "small", **kwargs) -> DPTImageProcessor:
    """The published preprocessing (same for all three sizes), as transformers runs it: keep the aspect ratio, scale
    by whichever of 518/H, 518/W is closer to 1, round both sides to multiples of 14, bicubic + antialias, ImageNet
    mean and std. A 480 x 640 photo becomes 518 x 686. Trap: this is not the original code's "lower bound" resize
    (shorter side 518) for images that are large on one side only or small on both: 1000 x 300 -> 518 x 154
    (original: 1736 x 518), 100 x 150 -> 350 x 518 (original: 518 x 784). `kwargs` go to DPTImageProcessor
    (e.g. backend="pil")."""
    return DPTImageProcessor.from_pretrained(packaged_folder(size), **kwargs)
