"""The original single-file checkpoint (`512-depth-ema.safetensors` / `.ckpt`, Stability AI's LDM code) and MiDaS' own
`dpt_hybrid-midas-501f0c75.pt`: tensor names of all four networks (`shared/reference/keys/` lists them).

    model.diffusion_model.*   the UNet (openaimodel.UNetModel)
    first_stage_model.*       the VAE (AutoencoderKL with LDM's module names)
    cond_stage_model.model.*  the OpenCLIP ViT-H text tower (all 24 blocks; SD2 uses 23)
    depth_model.model.*       the MiDaS DPT-Hybrid (the same names as MiDaS' own file, which has no prefix)

LDM numbers its blocks differently from diffusers; the maps below are built by plain loops, so each rule reads as one
pair of concrete names, e.g. `down_blocks.1.resnets.0` <- `input_blocks.4.0`.
"""

from __future__ import annotations

from ..models.autoencoder import AutoencoderKL, AutoencoderKLConfig
from ..models.clip_text import CLIPTextModel
from ..models.dpt import DPTDepthModel
from ..models.unet import UNet, UNetConfig
from .diffusers_format import TRANSFORMER_RENAMES, both_coders, inner_rules
from .keymap import IDENTITY, KeyMap, Rule, prefixed
from .layouts import SingleFileLayout

# ------------------------------------------------------------------------------------------------ UNet
# LDM's ResBlock names: ours (= diffusers') -> theirs
RESNET_RENAMES = (("norm1.{rest}", "in_layers.0.{rest}"), ("conv1.{rest}", "in_layers.2.{rest}"),
                  ("time_emb_proj.{rest}", "emb_layers.1.{rest}"), ("norm2.{rest}", "out_layers.0.{rest}"),
                  ("conv2.{rest}", "out_layers.3.{rest}"), ("conv_shortcut.{rest}", "skip_connection.{rest}"))


def unet_keymap(cfg: UNetConfig, prefix: str = "model.diffusion_model.") -> KeyMap:
    """Our names -> the original LDM/SGM `openaimodel.UNetModel` names (`keys/map_unet_ldm_to_diffusers.tsv`).

    LDM numbers all encoder stages in one list `input_blocks` (0 = conv_in; then per level `layers` blocks of
    [ResBlock, SpatialTransformer] and one [Downsample `op`]) and all decoder stages in `output_blocks` (per level
    `layers + 1` blocks [ResBlock, SpatialTransformer?, Upsample?]); `middle_block` = [ResBlock, transformer, ResBlock].
    For SD2-depth (2 layers per level): input_blocks 1, 2 | 3 (down) | 4, 5 | 6 | 7, 8 | 9 | 10, 11, and
    output_blocks 0, 1, 2 | 3, 4, 5 | 6, 7, 8 | 9, 10, 11, an upsampler in the last block of each level but the last.
    """
    p, levels, layers = prefix, len(cfg.block_out_channels), cfg.layers_per_block
    rules = [Rule("time_embedding.linear_1.{rest}", p + "time_embed.0.{rest}"),
             Rule("time_embedding.linear_2.{rest}", p + "time_embed.2.{rest}"),
             Rule("conv_in.{rest}", p + "input_blocks.0.0.{rest}"),
             Rule("conv_norm_out.{rest}", p + "out.0.{rest}"),
             Rule("conv_out.{rest}", p + "out.2.{rest}")]
    block = 1  # input_blocks.0 is conv_in
    for i in range(levels):
        for j in range(layers):
            rules += inner_rules(f"down_blocks.{i}.resnets.{j}", f"{p}input_blocks.{block}.0", RESNET_RENAMES)
            if cfg.cross_attention[i]:
                rules += inner_rules(f"down_blocks.{i}.attentions.{j}", f"{p}input_blocks.{block}.1",
                                     TRANSFORMER_RENAMES)
            block += 1
        if i < levels - 1:
            rules.append(Rule(f"down_blocks.{i}.downsample.conv.{{rest}}", f"{p}input_blocks.{block}.0.op.{{rest}}"))
            block += 1

    rules += inner_rules("mid_block.resnets.0", p + "middle_block.0", RESNET_RENAMES)
    rules += inner_rules("mid_block.attentions.0", p + "middle_block.1", TRANSFORMER_RENAMES)
    rules += inner_rules("mid_block.resnets.1", p + "middle_block.2", RESNET_RENAMES)

    block = 0
    for i in range(levels):
        cross = cfg.cross_attention[levels - 1 - i]  # up block i mirrors down level levels-1-i
        for j in range(layers + 1):
            rules += inner_rules(f"up_blocks.{i}.resnets.{j}", f"{p}output_blocks.{block}.0", RESNET_RENAMES)
            if cross:
                rules += inner_rules(f"up_blocks.{i}.attentions.{j}", f"{p}output_blocks.{block}.1",
                                     TRANSFORMER_RENAMES)
            block += 1
        if i < levels - 1:  # the upsampler sits after [ResBlock, SpatialTransformer] or after [ResBlock]
            slot = 2 if cross else 1
            rules.append(Rule(f"up_blocks.{i}.upsample.conv.{{rest}}",
                              f"{p}output_blocks.{block - 1}.{slot}.conv.{{rest}}"))
    return KeyMap(f"LDM UNetModel (layers_per_block={layers})", tuple(rules))


UNET_KEYS = unet_keymap(UNetConfig.sd2_depth())


# ------------------------------------------------------------------------------------------------ VAE
def vae_keymap(cfg: AutoencoderKLConfig, prefix: str = "first_stage_model.") -> KeyMap:
    """`first_stage_model.*` (`keys/map_vae_ldm_to_diffusers.tsv`). LDM numbers the decoder's levels from the output
    end: our up_blocks.i (the i-th applied) is LDM's up.(levels-1-i). Its attention projections are 1x1 convolutions,
    squeezed to linear weights."""
    levels = len(cfg.block_out_channels)
    rules = []
    for i in range(levels):
        rules += [Rule(f"encoder.down_blocks.{i}.resnets.{{j}}.conv_shortcut.{{rest}}",
                       f"encoder.down.{i}.block.{{j}}.nin_shortcut.{{rest}}"),
                  Rule(f"encoder.down_blocks.{i}.resnets.{{j}}.{{rest}}", f"encoder.down.{i}.block.{{j}}.{{rest}}"),
                  Rule(f"encoder.down_blocks.{i}.downsample.{{rest}}", f"encoder.down.{i}.downsample.conv.{{rest}}")]
    for i in range(levels):
        ldm = levels - 1 - i
        rules += [Rule(f"decoder.up_blocks.{i}.resnets.{{j}}.conv_shortcut.{{rest}}",
                       f"decoder.up.{ldm}.block.{{j}}.nin_shortcut.{{rest}}"),
                  Rule(f"decoder.up_blocks.{i}.resnets.{{j}}.{{rest}}", f"decoder.up.{ldm}.block.{{j}}.{{rest}}"),
                  Rule(f"decoder.up_blocks.{i}.upsample.{{rest}}", f"decoder.up.{ldm}.upsample.{{rest}}")]
    rules += [
        *both_coders("CODER.mid_block.resnet_1.{rest}", "CODER.mid.block_1.{rest}"),
        *both_coders("CODER.mid_block.resnet_2.{rest}", "CODER.mid.block_2.{rest}"),
        *both_coders("CODER.mid_block.attention.group_norm.{rest}", "CODER.mid.attn_1.norm.{rest}"),
        *both_coders("CODER.mid_block.attention.to_q.{rest}", "CODER.mid.attn_1.q.{rest}", "squeeze"),
        *both_coders("CODER.mid_block.attention.to_k.{rest}", "CODER.mid.attn_1.k.{rest}", "squeeze"),
        *both_coders("CODER.mid_block.attention.to_v.{rest}", "CODER.mid.attn_1.v.{rest}", "squeeze"),
        *both_coders("CODER.mid_block.attention.to_out.{rest}", "CODER.mid.attn_1.proj_out.{rest}", "squeeze"),
        *IDENTITY,  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv
    ]
    return KeyMap("LDM first_stage_model", prefixed(prefix, tuple(rules)))


VAE_KEYS = vae_keymap(AutoencoderKLConfig.sd2_depth())


# ------------------------------------------------------------------------------------------------ text encoder
def openclip_keymap(num_layers: int = 23, prefix: str = "cond_stage_model.model.") -> KeyMap:
    """OpenCLIP text-tower names (the original LDM single file puts them under `cond_stage_model.model.`).

    OpenCLIP keeps q, k, v fused in `attn.in_proj_weight` [3D, D] (rows q, then k, then v). The file holds one block
    more than SD2 uses (`resblocks.{num_layers}`, the last of ViT-H's 24) plus the contrastive head
    (`text_projection`, `logit_scale`); those are skipped. A pipeline loading the whole single file passes only the
    tensors under `prefix` (the UNet, VAE and depth model are other components)."""
    block = prefix + "transformer.resblocks.{i}."
    rules = [
        Rule("token_embedding.weight", prefix + "token_embedding.weight"),
        Rule("position_embedding.weight", prefix + "positional_embedding"),  # a bare [77, D] parameter there
        Rule("layers.{i}.norm1.{rest}", block + "ln_1.{rest}"),
        Rule("layers.{i}.norm2.{rest}", block + "ln_2.{rest}"),
        Rule("layers.{i}.attn.to_out.{rest}", block + "attn.out_proj.{rest}"),
        Rule("layers.{i}.mlp.fc1.{rest}", block + "mlp.c_fc.{rest}"),
        Rule("layers.{i}.mlp.fc2.{rest}", block + "mlp.c_proj.{rest}"),
        Rule("final_layer_norm.{rest}", prefix + "ln_final.{rest}"),
    ]
    for k, name in enumerate(("to_q", "to_k", "to_v")):
        rules += [Rule(f"layers.{{i}}.attn.{name}.weight", block + "attn.in_proj_weight", f"chunk:{k}/3"),
                  Rule(f"layers.{{i}}.attn.{name}.bias", block + "attn.in_proj_bias", f"chunk:{k}/3")]
    ignore = (f"{prefix}transformer.resblocks.{num_layers}.*", prefix + "text_projection", prefix + "logit_scale")
    return KeyMap(f"OpenCLIP text tower ({prefix}*)", tuple(rules), ignore=ignore)


OPENCLIP_KEYS = openclip_keymap(num_layers=23)


# ------------------------------------------------------------------------------------------------ depth model
def _midas_rules() -> tuple[Rule, ...]:
    """MiDaS' names: timm's ViT under `pretrained.model`, its readout/reassemble stages `pretrained.act_postprocess1..4`
    (1-based; levels 0, 1 are BiT maps and have none), the neck `scratch.layer1..4_rn`, and the fusion blocks
    `scratch.refinenet4..1` (numbered from the fine end: our fusion.0, the coarsest, is refinenet4)."""
    rules = [Rule("backbone.cls_token", "pretrained.model.cls_token"),
             Rule("backbone.pos_embed", "pretrained.model.pos_embed"),
             Rule("backbone.resnet.{rest}", "pretrained.model.patch_embed.backbone.{rest}"),
             Rule("backbone.proj.{rest}", "pretrained.model.patch_embed.proj.{rest}")]
    for k, name in enumerate(("to_q", "to_k", "to_v")):  # timm fuses q, k, v in one `qkv` Linear
        rules.append(Rule(f"backbone.blocks.{{i}}.attn.{name}.{{rest}}", "pretrained.model.blocks.{i}.attn.qkv.{rest}",
                          f"chunk:{k}/3"))
    rules += [Rule("backbone.blocks.{i}.attn.to_out.{rest}", "pretrained.model.blocks.{i}.attn.proj.{rest}"),
              Rule("backbone.blocks.{rest}", "pretrained.model.blocks.{rest}"),  # norm1, norm2, mlp.fc1, mlp.fc2
              Rule("backbone.norm.{rest}", "pretrained.model.norm.{rest}")]
    for level in (2, 3):
        post = f"pretrained.act_postprocess{level + 1}"
        rules += [Rule(f"neck.reassemble.{level}.readout.{{rest}}", f"{post}.0.project.0.{{rest}}"),
                  Rule(f"neck.reassemble.{level}.project.{{rest}}", f"{post}.3.{{rest}}"),
                  Rule(f"neck.reassemble.{level}.resize.{{rest}}", f"{post}.4.{{rest}}")]
    for level in range(4):
        rules.append(Rule(f"neck.convs.{level}.{{rest}}", f"scratch.layer{level + 1}_rn.{{rest}}"))
    for i in range(4):
        refinenet = f"scratch.refinenet{4 - i}"
        rules += [Rule(f"neck.fusion.{i}.unit{{j}}.{{rest}}", f"{refinenet}.resConfUnit{{j}}.{{rest}}"),
                  Rule(f"neck.fusion.{i}.out_conv.{{rest}}", f"{refinenet}.out_conv.{{rest}}")]
    rules.append(Rule("head.{rest}", "scratch.output_conv.{rest}"))
    return tuple(rules)


MIDAS_RULES = _midas_rules()
# The original MiDaS file `dpt_hybrid-midas-501f0c75.pt` (368 tensors) also keeps timm's ImageNet classifier of the ViT.
MIDAS_KEYS = KeyMap("MiDaS dpt_hybrid", MIDAS_RULES, ignore=("pretrained.model.head.*",))
# The same names inside the single-file SD2-depth checkpoint (512-depth-ema.safetensors); other components' tensors
# of that file are for their own loaders to take.
DEPTH_MODEL_KEYS = KeyMap("LDM depth_model (MiDaS dpt_hybrid)", prefixed("depth_model.model.", MIDAS_RULES),
                          ignore=("depth_model.model.pretrained.model.head.*",))


# ------------------------------------------------------------------------------------------------ where each network is
LAYOUTS = {
    UNet: (SingleFileLayout("model.diffusion_model.", "model.diffusion_model.", unet_keymap),),
    AutoencoderKL: (SingleFileLayout("first_stage_model.", "first_stage_model.", vae_keymap),),
    CLIPTextModel: (SingleFileLayout("cond_stage_model.model.", "cond_stage_model.",
                                       lambda cfg: openclip_keymap(cfg.num_layers)),),
    DPTDepthModel: (SingleFileLayout("depth_model.model.", "depth_model.", lambda cfg: DEPTH_MODEL_KEYS),
                      SingleFileLayout("pretrained.model.", "", lambda cfg: MIDAS_KEYS)),  # MiDaS' own file
}
