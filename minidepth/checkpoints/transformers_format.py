"""transformers component folders: the text encoder's and the depth model's `config.json` and tensor names.

    text_encoder/     config.json + model[.fp16].safetensors   (transformers' CLIPTextModel)
    depth_estimator/  config.json + model[.fp16].safetensors   (transformers' DPTForDepthEstimation, hybrid)

Each config function spells out the traps of transformers' keys; each key map lists how our parameter names become the
file's (see keymap.py for the pattern syntax). `CLIP_TEXT` and `DPT` tie them together, keyed by model class in `FOLDER_FORMATS` (read by pretrained.py).
"""

from __future__ import annotations

from ..models.clip_text import CLIPTextConfig, CLIPTextModel
from ..models.dpt import DPTConfig, DPTDepthModel
from .keymap import KeyMap, Rule
from .layouts import FolderFormat


# ------------------------------------------------------------------------------------------------ text encoder
def clip_text_config_from_dict(d: dict) -> CLIPTextConfig:
    """From transformers' `CLIPTextConfig` config.json. Traps:
    - `num_hidden_layers` (23 for SD2) already excludes the dropped OpenCLIP block; use it as is.
    - `projection_dim` belongs to `CLIPTextModelWithProjection`; this model has no projection, so it is unused.
    - `bos_token_id` 0, `eos_token_id` 2, `pad_token_id` 1 in SD2's file are stale defaults, not the tokenizer's
      ids (49406, 49407, 0); they only matter for pooled outputs, which SD does not use.
    - `dropout`, `attention_dropout`, `initializer_*` are training settings; ignored.
    """
    if "text_config" in d:
        raise ValueError("this is a full CLIPModel config; pass its 'text_config' dict")
    return CLIPTextConfig(vocab_size=d["vocab_size"], max_positions=d["max_position_embeddings"],
                          width=d["hidden_size"], num_layers=d["num_hidden_layers"],
                          num_heads=d["num_attention_heads"], mlp_width=d["intermediate_size"],
                          hidden_act=d.get("hidden_act", "quick_gelu"), eps=d.get("layer_norm_eps", 1e-5))


def clip_text_config_to_dict(cfg: CLIPTextConfig) -> dict:
    """transformers' config.json for this model (what `from_dict` reads)."""
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_positions, "hidden_size": cfg.width,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "intermediate_size": cfg.mlp_width, "hidden_act": cfg.hidden_act, "layer_norm_eps": cfg.eps,
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1}

def _clip_text_rules(prefix: str) -> tuple[Rule, ...]:
    layer = prefix + "encoder.layers.{i}."
    return (
        Rule("token_embedding.weight", prefix + "embeddings.token_embedding.weight"),
        Rule("position_embedding.weight", prefix + "embeddings.position_embedding.weight"),
        Rule("layers.{i}.norm1.{rest}", layer + "layer_norm1.{rest}"),
        Rule("layers.{i}.attn.to_q.{rest}", layer + "self_attn.q_proj.{rest}"),
        Rule("layers.{i}.attn.to_k.{rest}", layer + "self_attn.k_proj.{rest}"),
        Rule("layers.{i}.attn.to_v.{rest}", layer + "self_attn.v_proj.{rest}"),
        Rule("layers.{i}.attn.to_out.{rest}", layer + "self_attn.out_proj.{rest}"),
        Rule("layers.{i}.norm2.{rest}", layer + "layer_norm2.{rest}"),
        Rule("layers.{i}.mlp.{rest}", layer + "mlp.{rest}"),  # fc1, fc2 keep their names
        Rule("final_layer_norm.{rest}", prefix + "final_layer_norm.{rest}"),
    )


# The hub file (saved by transformers 4): every name under `text_model.`, plus the old `position_ids` buffer.
CLIP_TEXT_KEYS = KeyMap("transformers CLIPTextModel (text_model.*)", _clip_text_rules("text_model."),
                        ignore=("text_model.embeddings.position_ids",))
# transformers 5 saves the same tensors without the `text_model.` prefix.
CLIP_TEXT_V5_KEYS = KeyMap("transformers 5 CLIPTextModel", _clip_text_rules(""),
                           ignore=("embeddings.position_ids", "text_model.embeddings.position_ids"))


def clip_text_keymap_for(names) -> KeyMap:
    """CLIP_TEXT_KEYS if the file's names carry the `text_model.` prefix, else CLIP_TEXT_V5_KEYS."""
    prefixed = any(name.startswith("text_model.encoder.") for name in names)
    return CLIP_TEXT_KEYS if prefixed else CLIP_TEXT_V5_KEYS


# ------------------------------------------------------------------------------------------------ depth model
def dpt_config_from_dict(d: dict) -> DPTConfig:
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
    return DPTConfig(stem_width=bb["embedding_size"], stage_widths=widths, stage_depths=depths,
                     num_groups=bb["num_groups"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
                     num_heads=d["num_attention_heads"], mlp_size=d["intermediate_size"],
                     layer_norm_eps=d.get("layer_norm_eps", 1e-12), image_size=d.get("image_size", 384),
                     patch_size=d.get("patch_size", 16), vit_out_indices=tuple(d["backbone_out_indices"][2:]),
                     neck_sizes=tuple(d["neck_hidden_sizes"]), reassemble_factors=tuple(float(f) for f in factors[2:]),
                     fusion_size=d["fusion_hidden_size"])


def dpt_config_to_dict(cfg: DPTConfig) -> dict:
    """transformers' DPT config.json for this model (what `from_dict` reads; transformers loads it too)."""
    return {"architectures": ["DPTForDepthEstimation"], "model_type": "dpt", "is_hybrid": True,
            "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.mlp_size, "hidden_act": "gelu",
            "layer_norm_eps": cfg.layer_norm_eps, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
            "num_channels": 3, "qkv_bias": True, "readout_type": "project",
            "backbone_out_indices": [2, 5, *cfg.vit_out_indices],  # the hybrid reads only the last two
            "neck_hidden_sizes": list(cfg.neck_sizes), "neck_ignore_stages": [0, 1],
            "reassemble_factors": [1, 1, *cfg.reassemble_factors], "fusion_hidden_size": cfg.fusion_size,
            "head_in_index": -1, "use_batch_norm_in_fusion_residual": False,
            "backbone_featmap_shape": [1, cfg.stage_widths[-1], cfg.image_size // cfg.patch_size,
                                       cfg.image_size // cfg.patch_size],
            "backbone_config": {"model_type": "bit", "layer_type": "bottleneck", "global_padding": "SAME",
                                "embedding_dynamic_padding": True, "hidden_act": "relu",
                                "embedding_size": cfg.stem_width, "num_groups": cfg.num_groups,
                                "depths": list(cfg.stage_depths),
                                "hidden_sizes": [*cfg.stage_widths, 2 * cfg.stage_widths[-1]],
                                "out_features": [f"stage{i + 1}" for i in range(len(cfg.stage_depths))]}}


DPT_KEYS = KeyMap("transformers DPTForDepthEstimation (hybrid)", (
    Rule("backbone.cls_token", "dpt.embeddings.cls_token"),
    Rule("backbone.pos_embed", "dpt.embeddings.position_embeddings"),
    Rule("backbone.resnet.stem.conv.{rest}", "dpt.embeddings.backbone.bit.embedder.convolution.{rest}"),
    Rule("backbone.resnet.stem.norm.{rest}", "dpt.embeddings.backbone.bit.embedder.norm.{rest}"),
    Rule("backbone.resnet.stages.{i}.blocks.{j}.{rest}",
         "dpt.embeddings.backbone.bit.encoder.stages.{i}.layers.{j}.{rest}"),
    Rule("backbone.proj.{rest}", "dpt.embeddings.projection.{rest}"),
    Rule("backbone.blocks.{i}.norm1.{rest}", "dpt.encoder.layer.{i}.layernorm_before.{rest}"),
    Rule("backbone.blocks.{i}.attn.to_q.{rest}", "dpt.encoder.layer.{i}.attention.attention.query.{rest}"),
    Rule("backbone.blocks.{i}.attn.to_k.{rest}", "dpt.encoder.layer.{i}.attention.attention.key.{rest}"),
    Rule("backbone.blocks.{i}.attn.to_v.{rest}", "dpt.encoder.layer.{i}.attention.attention.value.{rest}"),
    Rule("backbone.blocks.{i}.attn.to_out.{rest}", "dpt.encoder.layer.{i}.attention.output.dense.{rest}"),
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


# ------------------------------------------------------------------------------------------------ the formats
CLIP_TEXT = FolderFormat(clip_text_config_from_dict, clip_text_config_to_dict, ("model", "pytorch_model"),
                         clip_text_keymap_for, CLIP_TEXT_KEYS, "model.safetensors")
DPT = FolderFormat(dpt_config_from_dict, dpt_config_to_dict, ("model", "pytorch_model"), lambda names: DPT_KEYS,
                   DPT_KEYS, "model.safetensors")

FOLDER_FORMATS = {CLIPTextModel: CLIP_TEXT, DPTDepthModel: DPT}
