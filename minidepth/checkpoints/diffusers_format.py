"""diffusers component folders: the UNet's and the VAE's `config.json` and tensor names.

    unet/  config.json + diffusion_pytorch_model[.fp16].safetensors   (diffusers' UNet2DConditionModel)
    vae/   config.json + diffusion_pytorch_model[.fp16].safetensors   (diffusers' AutoencoderKL)

Each config function spells out the traps of diffusers' keys; each key map lists how our parameter names become the
file's (see keymap.py for the pattern syntax). `UNET` and `VAE` tie them together, keyed by model class in `FOLDER_FORMATS` (read by pretrained.py).
"""

from __future__ import annotations

import dataclasses

import torch

from ..models.autoencoder import AutoencoderKL, AutoencoderKLConfig
from ..models.unet import UNet, UNetConfig
from .keymap import IDENTITY, KeyMap, Rule
from .layouts import FolderFormat


# ------------------------------------------------------------------------------------------------ UNet config
# diffusers config keys that we do not implement: each must be absent or have the value given here
UNET_FIXED = {"act_fn": "silu", "center_input_sample": False, "dual_cross_attention": False,
              "only_cross_attention": False, "num_class_embeds": None, "class_embed_type": None,
              "addition_embed_type": None, "mid_block_scale_factor": 1, "downsample_padding": 1,
              "upcast_attention": False, "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
              "mid_block_type": "UNetMidBlock2DCrossAttn", "encoder_hid_dim": None, "conv_in_kernel": 3,
              "conv_out_kernel": 3, "time_cond_proj_dim": None, "attention_type": "default"}


def unet_config_from_dict(d: dict) -> UNetConfig:
    """From a diffusers `unet/config.json`. Traps spelled out:
    - `attention_head_dim` is, for SD 2 configs, the NUMBER OF HEADS per level ([5, 10, 20, 20] -> head size 64),
      a historical misnomer diffusers keeps; a newer `num_attention_heads` key, when set, takes precedence.
    - `in_channels` = 5: 4 latent channels + 1 depth channel.
    - `use_linear_projection` true: proj_in/proj_out are Linear layers (SD1 checkpoints use 1x1 convs).
    - `flip_sin_to_cos` true and `freq_shift` 0: the LDM timestep embedding ([cos, sin], no shift).
    - the up path must mirror the down path (CrossAttnUpBlock2D for every CrossAttnDownBlock2D, reversed).
    """
    for key, value in UNET_FIXED.items():
        if d.get(key, value) != value:
            raise ValueError(f"UNet config: {key}={d[key]!r} is not supported by minidepth (only {value!r})")
    down = list(d["down_block_types"])
    allowed = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    if any(t not in allowed for t in down):
        raise ValueError(f"UNet config: down_block_types {down} may only contain {sorted(allowed)}")
    mirror = ["CrossAttnUpBlock2D" if allowed[t] else "UpBlock2D" for t in reversed(down)]
    if list(d.get("up_block_types", mirror)) != mirror:
        raise ValueError(f"UNet config: up_block_types {d['up_block_types']} must mirror down_block_types "
                                f"(expected {mirror})")
    channels = tuple(d["block_out_channels"])
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)  # a head COUNT, see above
    heads = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * len(channels)
    depth = d.get("transformer_layers_per_block", 1)
    if not isinstance(depth, int):
        raise ValueError(f"UNet config: transformer_layers_per_block={depth!r}: only one int is supported")
    return UNetConfig(in_channels=d["in_channels"], out_channels=d["out_channels"], block_out_channels=channels,
                      attention_heads=heads, cross_attention=tuple(allowed[t] for t in down),
                      layers_per_block=d["layers_per_block"], transformer_depth=depth,
                      cross_attention_dim=d["cross_attention_dim"], norm_num_groups=d.get("norm_num_groups", 32),
                      norm_eps=d.get("norm_eps", 1e-5), use_linear_projection=d.get("use_linear_projection", False),
                      flip_sin_to_cos=d.get("flip_sin_to_cos", True), freq_shift=d.get("freq_shift", 0),
                      sample_size=d.get("sample_size") or 32)


def unet_config_to_dict(cfg: UNetConfig) -> dict:
    """diffusers' `unet/config.json` for this model (what `from_dict` reads back; diffusers loads it too)."""
    down = ["CrossAttnDownBlock2D" if x else "DownBlock2D" for x in cfg.cross_attention]
    up = ["CrossAttnUpBlock2D" if x else "UpBlock2D" for x in reversed(cfg.cross_attention)]
    return {"_class_name": "UNet2DConditionModel", **UNET_FIXED, "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels, "block_out_channels": list(cfg.block_out_channels),
            "attention_head_dim": list(cfg.attention_heads), "down_block_types": down, "up_block_types": up,
            "layers_per_block": cfg.layers_per_block, "transformer_layers_per_block": cfg.transformer_depth,
            "cross_attention_dim": cfg.cross_attention_dim, "norm_num_groups": cfg.norm_num_groups,
            "norm_eps": cfg.norm_eps, "use_linear_projection": cfg.use_linear_projection,
            "flip_sin_to_cos": cfg.flip_sin_to_cos, "freq_shift": cfg.freq_shift,
            "sample_size": cfg.sample_size}

# ------------------------------------------------------------------------------------------------ VAE config
# diffusers' AutoencoderKL.__init__ defaults: what a config.json without these keys means
VAE_DEFAULTS = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
                       "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1,
                       "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32,
                       "scaling_factor": 0.18215}


def vae_config_from_dict(d: dict) -> AutoencoderKLConfig:
    """From a diffusers `vae/config.json`. Traps:
    - keys the file leaves out take diffusers' `AutoencoderKL` defaults, not SD2's: SD2-depth's config has no
      `scaling_factor` (-> 0.18215); a config without `sample_size` tiles at 32 pixels;
    - only the SD layout is built: one "DownEncoderBlock2D" / "UpDecoderBlock2D" per entry of block_out_channels,
      act_fn "silu", quant convs and mid-block attention present, no latent shift/normalisation (SDXL/SD3/Flux);
    - `sample_size` may be a list in some configs: its first entry is the tile size;
    - `force_upcast` only matters to SDXL pipelines and is ignored; unknown keys are refused."""
    d = {**VAE_DEFAULTS, **{k: v for k, v in d.items() if not k.startswith("_")}}
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
    unknown = set(d) - {f.name for f in dataclasses.fields(AutoencoderKLConfig)}
    if unknown:
        raise ValueError(f"AutoencoderKLConfig.from_dict: unknown config keys {sorted(unknown)}")
    if isinstance(d.get("sample_size"), (list, tuple)):
        d["sample_size"] = d["sample_size"][0]
    return AutoencoderKLConfig(**{**d, "block_out_channels": tuple(d["block_out_channels"])})


def vae_config_to_dict(cfg: AutoencoderKLConfig) -> dict:
    """diffusers' `vae/config.json` for this model (what `from_dict` reads back; diffusers loads it too)."""
    n = len(cfg.block_out_channels)
    return {"_class_name": "AutoencoderKL", **dataclasses.asdict(cfg), "act_fn": "silu",
            "block_out_channels": list(cfg.block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}

# ------------------------------------------------------------------------------------------------ UNet names
# Inside a spatial transformer: ours -> checkpoint suffix. diffusers and LDM both call the attention output
# projection `to_out.0` (a ModuleList with dropout), ours is a plain Linear `to_out`.
TRANSFORMER_RENAMES = (("{rest}.to_out.weight", "{rest}.to_out.0.weight"),
                       ("{rest}.to_out.bias", "{rest}.to_out.0.bias"),
                       ("{rest}", "{rest}"))


def inner_rules(ours: str, theirs: str, inner) -> list[Rule]:
    """One rule per (our suffix, their suffix) pair of `inner`, under the prefixes `ours` and `theirs`."""
    return [Rule(f"{ours}.{a}", f"{theirs}.{b}") for a, b in inner]


UNET_KEYS = KeyMap("diffusers UNet2DConditionModel", tuple(
    inner_rules("down_blocks.{i}.attentions.{j}", "down_blocks.{i}.attentions.{j}", TRANSFORMER_RENAMES)
    + inner_rules("mid_block.attentions.{j}", "mid_block.attentions.{j}", TRANSFORMER_RENAMES)
    + inner_rules("up_blocks.{i}.attentions.{j}", "up_blocks.{i}.attentions.{j}", TRANSFORMER_RENAMES)
    + [Rule("down_blocks.{i}.downsample.conv.{rest}", "down_blocks.{i}.downsamplers.0.conv.{rest}"),
       Rule("up_blocks.{i}.upsample.conv.{rest}", "up_blocks.{i}.upsamplers.0.conv.{rest}"),
       Rule("{rest}", "{rest}")]))

# ------------------------------------------------------------------------------------------------ VAE names
def both_coders(target: str, source: str, transform: str = "copy") -> tuple[Rule, ...]:
    """The same rule for the encoder and the decoder: "CODER" stands for either."""
    return tuple(Rule(target.replace("CODER", c), source.replace("CODER", c), transform)
                 for c in ("encoder", "decoder"))


def _diffusers_rules(q: str, k: str, v: str, out: str) -> tuple[Rule, ...]:
    return (
        Rule("encoder.down_blocks.{i}.downsample.{rest}", "encoder.down_blocks.{i}.downsamplers.0.conv.{rest}"),
        Rule("decoder.up_blocks.{i}.upsample.{rest}", "decoder.up_blocks.{i}.upsamplers.0.{rest}"),
        *both_coders("CODER.mid_block.resnet_1.{rest}", "CODER.mid_block.resnets.0.{rest}"),
        *both_coders("CODER.mid_block.resnet_2.{rest}", "CODER.mid_block.resnets.1.{rest}"),
        *both_coders("CODER.mid_block.attention.to_q.{rest}", f"CODER.mid_block.attentions.0.{q}.{{rest}}"),
        *both_coders("CODER.mid_block.attention.to_k.{rest}", f"CODER.mid_block.attentions.0.{k}.{{rest}}"),
        *both_coders("CODER.mid_block.attention.to_v.{rest}", f"CODER.mid_block.attentions.0.{v}.{{rest}}"),
        *both_coders("CODER.mid_block.attention.to_out.{rest}", f"CODER.mid_block.attentions.0.{out}.{{rest}}"),
        *both_coders("CODER.mid_block.attention.group_norm.{rest}", "CODER.mid_block.attentions.0.group_norm.{rest}"),
        *both_coders("CODER.norm_out.{rest}", "CODER.conv_norm_out.{rest}"),
        *IDENTITY,  # conv_in, conv_out, the blocks' resnets, quant_conv, post_quant_conv
    )


# diffusers >= 0.14 names (what `AutoencoderKL.save_pretrained` writes today)
VAE_KEYS = KeyMap("diffusers AutoencoderKL", _diffusers_rules("to_q", "to_k", "to_v", "to_out.0"))
# the names in the hub's SD2 files (saved before diffusers renamed its attention layers)
VAE_LEGACY_KEYS = KeyMap("diffusers AutoencoderKL (legacy attention names)",
                          _diffusers_rules("query", "key", "value", "proj_attn"))


def vae_keymap_for(names) -> KeyMap:
    """The hub's SD2 file still uses the legacy attention names; files saved by diffusers today use the current ones."""
    return VAE_LEGACY_KEYS if any(".attentions.0.query." in n for n in names) else VAE_KEYS


# ------------------------------------------------------------------------------------------------ the formats
UNET = FolderFormat(unet_config_from_dict, unet_config_to_dict, ("diffusion_pytorch_model",), lambda names: UNET_KEYS,
                    UNET_KEYS, "diffusion_pytorch_model.safetensors")
# dtype=None gives float32 for the VAE, as diffusers does (an fp16 variant is upcast)
VAE = FolderFormat(vae_config_from_dict, vae_config_to_dict, ("diffusion_pytorch_model",), vae_keymap_for, VAE_KEYS,
                   "diffusion_pytorch_model.safetensors", default_dtype=torch.float32)

FOLDER_FORMATS = {UNet: UNET, AutoencoderKL: VAE}
