"""LoRA and embedding files for the adapter tests, written with independent code (no minidepth import).

The reference models (diffusers' UNet2DConditionModel, transformers' CLIPTextModel) name the layers; each writer
spells those names in one file format, with random weights:

    kohya_lora        lora_unet_<path with _>.lora_down.weight / lora_up.weight / alpha, LyCORIS LoCon convolutions
                      (full-kernel down, 1x1 up) on ResNet convs, conv_shortcut and the samplers; text encoder
                      attention and MLP (lora_te_text_model_...)
    to_ldm_names      the same file with the original LDM UNet's block names (input_blocks_4_0_in_layers_2, ...)
    peft_lora_folder  peft injected into the reference models, saved by diffusers' own save_lora_weights
    old_format        diffusers' older attention-processor names (to_q_lora.down.weight, ...)
"""

from __future__ import annotations

import torch
from torch import nn

CONV_LAYERS = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")


def _rand(g, *shape, std):
    return torch.randn(*shape, generator=g) * std


def kohya_lora(unet, text_encoder, seed=0, rank=4, conv_rank=2, alpha=2.0, conv_alpha=3.0, te_rank=4, te_alpha=1.0,
               strength=0.3, unet_only=False):
    """A kohya / LyCORIS LoCon state dict for the reference `unet` and `text_encoder`."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def add(name, down, up, a):
        sd[f"{name}.lora_down.weight"] = down
        sd[f"{name}.lora_up.weight"] = up
        sd[f"{name}.alpha"] = torch.tensor(a)

    for path, m in unet.named_modules():
        name = "lora_unet_" + path.replace(".", "_")
        if isinstance(m, nn.Linear):
            add(name, _rand(g, rank, m.in_features, std=m.in_features ** -0.5),
                _rand(g, m.out_features, rank, std=strength * rank ** -0.5), alpha)
        elif isinstance(m, nn.Conv2d) and path.endswith(CONV_LAYERS):
            k = m.kernel_size
            fan_in = m.in_channels * k[0] * k[1]
            add(name, _rand(g, conv_rank, m.in_channels, *k, std=fan_in ** -0.5),
                _rand(g, m.out_channels, conv_rank, 1, 1, std=strength * conv_rank ** -0.5), conv_alpha)
    if not unet_only:
        for path, m in text_encoder.named_modules():
            if isinstance(m, nn.Linear) and (".self_attn." in path or ".mlp." in path):
                path = path if path.startswith("text_model.") else "text_model." + path
                add("lora_te_" + path.replace(".", "_"), _rand(g, te_rank, m.in_features, std=m.in_features ** -0.5),
                    _rand(g, m.out_features, te_rank, std=strength * te_rank ** -0.5), te_alpha)
    return sd


def ldm_unet_names(layers_per_block: int, levels: int, cross: tuple[bool, ...]) -> dict[str, str]:
    """diffusers UNet module prefix -> LDM `openaimodel` prefix, spelled out for the test configs."""
    out = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "conv_out": "out.2",
           "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
           "mid_block.resnets.1": "middle_block.2"}
    block = 1
    for i in range(levels):
        for j in range(layers_per_block):
            out[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{block}.0"
            if cross[i]:
                out[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{block}.1"
            block += 1
        if i < levels - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{block}.0.op"
            block += 1
    block = 0
    for i in range(levels):
        up_cross = cross[levels - 1 - i]
        for j in range(layers_per_block + 1):
            out[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{block}.0"
            if up_cross:
                out[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{block}.1"
            block += 1
        if i < levels - 1:
            out[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{block - 1}.{2 if up_cross else 1}.conv"
    return out


RESNET_LDM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}


def to_ldm_names(sd: dict, unet_config) -> dict:
    """Rename the UNet part of a kohya file from diffusers paths to LDM paths (what A1111-era tools write)."""
    n = len(unet_config["block_out_channels"])
    cross = tuple(t.startswith("CrossAttn") for t in unet_config["down_block_types"])
    table = {k.replace(".", "_"): v.replace(".", "_")
             for k, v in ldm_unet_names(unet_config["layers_per_block"], n, cross).items()}
    for a, b in RESNET_LDM.items():
        table.update({f"{k}_{a.replace('.', '_')}": f"{v}_{b.replace('.', '_')}" for k, v in list(table.items())
                      if "resnets" in k})
    out = {}
    for key, value in sd.items():
        name, _, suffix = key.partition(".")
        if name.startswith("lora_unet_"):
            path = name[len("lora_unet_"):]
            best = max((k for k in table if path == k or path.startswith(k + "_")), key=len)
            path = table[best] + path[len(best):]
            name = "lora_unet_" + path
        out[f"{name}.{suffix}"] = value
    return out


def old_format(peft_sd: dict) -> dict:
    """diffusers' older attention-processor names for a PEFT-format state dict (unet.*/text_encoder.* lora_A/B)."""
    out = {}
    for key, value in peft_sd.items():
        role = "down" if ".lora_A." in key else "up"
        module = key.split(".lora_")[0]
        comp, _, path = module.partition(".")
        parent, _, leaf = path.rpartition(".")
        if comp == "unet" and leaf in ("to_q", "to_k", "to_v"):
            new = f"{comp}.{parent}.processor.{leaf}_lora.{role}.weight"
        elif comp == "unet" and path.endswith("to_out.0"):
            new = f"{comp}.{path[:-len('.to_out.0')]}.processor.to_out_lora.{role}.weight"
        elif comp == "text_encoder" and leaf in ("q_proj", "k_proj", "v_proj", "out_proj"):
            new = f"{comp}.{parent}.to_{leaf[0] if leaf != 'out_proj' else 'out'}_lora.{role}.weight"
        elif comp == "text_encoder":
            new = f"{comp}.{path}.lora_linear_layer.{role}.weight"
        else:
            new = f"{comp}.{path}.lora.{role}.weight"
        out[new] = value
    return out
