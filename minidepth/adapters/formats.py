"""LoRA files in the formats people have, read into one canonical form: (component, OUR layer name) -> A, B, alpha.

    kohya / A1111 (sd-scripts, LyCORIS LoCon)   lora_unet_<layer>.lora_down.weight, .lora_up.weight, .alpha
                                                lora_te_<layer>...  where <layer> is the diffusers / transformers
                                                path with "." written "_" (or the original LDM UNet path, the same way;
                                                the text encoder's with or without transformers 4's `text_model` level)
    diffusers / PEFT                            unet.<layer>.lora_A.weight, .lora_B.weight; text_encoder.<layer>...;
                                                alphas, if any, in the safetensors metadata "lora_adapter_metadata"
                                                (peft's LoraConfig: lora_alpha, alpha_pattern, use_rslora: scale
                                                alpha / sqrt(r)); .lora_B.bias when B has a bias (lora_bias)
    diffusers' older attention-processor files  unet.<block>.attn1.processor.to_q_lora.down.weight, <layer>.lora.down.weight,
                                                text_encoder.<...>.self_attn.to_q_lora.down.weight,
                                                <...>.mlp.fc1.lora_linear_layer.down.weight

Without an alpha the scale is 1 (alpha = rank). Layer names are not listed here: the checkpoint key maps
(`checkpoints/diffusers_format.py`, `transformers_format.py`, `ldm_format.py`) already say which file name each of our
parameters has, and `LayerNames` asks them for every Linear / Conv2d. Everything is checked before a pipeline is touched:
`read_lora` raises one `LoRAFormatError` that lists every key it cannot place and every tensor whose shape is wrong.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import diffusers_format, ldm_format, transformers_format
from ..checkpoints.hub import hub_file, is_repo_id
from ..checkpoints.loader import CheckpointError, TensorFile
from .lora import LORA_TARGETS

logger = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder")
WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
METADATA_KEY = "lora_adapter_metadata"

# Formats we recognise but do not implement: a key fragment -> what it is.
UNSUPPORTED = {"hada_w": "LoHa (LyCORIS Hadamard product)", "lokr_w": "LoKr (LyCORIS Kronecker product)",
               "dora_scale": "DoRA (weight-decomposed LoRA)", "lora_magnitude_vector": "DoRA (weight-decomposed LoRA)",
               "lora_mid": "LoCon with CP/Tucker decomposition (LyCORIS lora_mid)", "oft_": "OFT / BOFT",
               ".diff": "full weight difference (LyCORIS 'full')", "lora_te2_": "SDXL (second text encoder)",
               "text_encoder_2.": "SDXL (second text encoder)",
               "lora_up.bias": "kohya LoRA with bias (diffusers reads lora_B.bias only)"}
KOHYA = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
DIFFUSERS_ROLES = {"lora_A.weight": "down", "lora_B.weight": "up", "lora_B.bias": "up_bias",  # peft's lora_bias=True
                   "lora.down.weight": "down", "lora.up.weight": "up",
                   "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up"}
# The older attention-processor format names the projection, not the layer: to_q_lora -> the layer to_q / q_proj.
OLD_PROCESSOR = re.compile(r"(?P<block>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)"
                           r"\.weight")
OLD_PROJECTIONS = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                   "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}


class LoRAFormatError(CheckpointError):
    """A LoRA file that cannot be applied to this pipeline; the message names every offending key or tensor."""


@dataclass
class LoRAEntry:
    """One layer's adapter, read from a file: A (down), B (up), alpha (None: scale 1)."""
    component: str                 # "unet" or "text_encoder"
    layer: str                     # our module name inside that component
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None
    keys: dict[str, str] = field(default_factory=dict)  # role -> the file's key, for messages
    up_bias: torch.Tensor | None = None  # peft's lora_bias=True: B has a bias (out,)
    rank_stabilised: bool = False        # rsLoRA (Kalajdzievski 2023): scale alpha / sqrt(r) instead of alpha / r


# ------------------------------------------------------------------------------------------------ reading files
def read_lora_file(source, weight_name: str | None = None, **hub) -> tuple[dict[str, torch.Tensor], dict | None, str]:
    """A state dict, a LoRA file, a folder holding `weight_name` (default pytorch_lora_weights.safetensors, then
    .bin), or a Hub repo id (`owner/name`, with `weight_name` and the `hub` options of checkpoints.hub.hub_file;
    cached like the checkpoints) -> (tensors, peft metadata or None, description). Pickles only with
    torch.load(weights_only=True)."""
    if isinstance(source, Mapping):
        bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise LoRAFormatError(f"the LoRA state dict holds non-tensor values under {bad[:5]}")
        return dict(source), None, "the LoRA state dict"
    if is_repo_id(source):
        source = hub_file(str(source), (weight_name,) if weight_name else WEIGHT_NAMES, what="LoRA", **hub)
    path = Path(os.fspath(source))
    if path.is_dir():
        names = [weight_name] if weight_name else list(WEIGHT_NAMES)
        found = [path / n for n in names if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"no LoRA file in {path} (looked for {', '.join(names)}; pass weight_name=...)")
        path = found[0]
    elif not path.is_file():
        raise FileNotFoundError(f"LoRA file or folder not found: {path}")
    file = TensorFile(path)
    tensors = {name: file[name] for name in file}
    metadata = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
        metadata = json.loads(raw) if raw else None
    return tensors, metadata, str(path)


# ------------------------------------------------------------------------------------------------ layer names
class LayerNames:
    """Every name a LoRA file may use for one of our Linear / Conv2d layers, from the checkpoint key maps:
    `dotted[component][file path] = ours` (diffusers / transformers paths) and `kohya[lora name] = (component, ours)`
    (those paths, and the LDM UNet's, with "." written "_")."""

    def __init__(self, unet: nn.Module | None, text_encoder: nn.Module | None):
        self.dotted: dict[str, dict[str, str]] = {c: {} for c in COMPONENTS}
        self.kohya: dict[str, tuple[str, str]] = {}
        self.to_file: dict[str, dict[str, str]] = {c: {} for c in COMPONENTS}  # ours -> the diffusers-format path
        if unet is not None:
            ldm = ldm_format.unet_keymap(unet.config, prefix="")
            self._add("unet", unet, [diffusers_format.UNET_KEYS], [diffusers_format.UNET_KEYS, ldm], "lora_unet_")
        if text_encoder is not None:
            clip = transformers_format.CLIP_TEXT_KEYS  # text_model.encoder.layers.0.self_attn.q_proj
            v5 = transformers_format.CLIP_TEXT_V5_KEYS  # encoder.layers.0.self_attn.q_proj (transformers 5's CLIP)
            self._add("text_encoder", text_encoder, [clip, v5], [clip, v5], "lora_te_")  # both kohya spellings

    def _add(self, component, model, dotted_maps, kohya_maps, kohya_prefix):
        for ours, module in model.named_modules():
            if not isinstance(module, LORA_TARGETS):
                continue
            for i, keymap in enumerate(dotted_maps):
                path = _file_path(keymap, ours)
                if path:
                    self.dotted[component][path] = ours
                    if i == 0:
                        self.to_file[component][ours] = path
            for keymap in kohya_maps:
                path = _file_path(keymap, ours)
                if path:
                    self.kohya[kohya_prefix + path.replace(".", "_")] = (component, ours)


def _file_path(keymap, ours: str) -> str | None:
    """The file's module path for our layer `ours` (its weight's name minus ".weight"), or None if the map splits it."""
    rule, sources = keymap.rule_for(f"{ours}.weight")
    if rule.transform != "copy" or not sources[0].endswith(".weight"):
        return None
    return sources[0][:-len(".weight")]


# ------------------------------------------------------------------------------------------------ parsing
def _parse_key(key: str) -> tuple[str, str, str, str] | None:
    """A file key -> (format, component, the file's layer name, role "down" / "up" / "alpha"), or None."""
    for prefix, component in KOHYA.items():
        if key.startswith(prefix):
            name, _, suffix = key.partition(".")
            name = name.replace("lora_te1_", "lora_te_", 1)  # SDXL-style name of the (only) text encoder
            role = KOHYA_ROLES.get(suffix)
            return ("kohya", component, name, role) if role else None
    component = next((c for c in COMPONENTS if key.startswith(c + ".")), "unet")  # bare keys: old UNet files
    rest = key[len(component) + 1:] if key.startswith(component + ".") else key
    old = OLD_PROCESSOR.fullmatch(rest)
    if old:
        return "diffusers", component, f"{old['block']}.{OLD_PROJECTIONS[component][old['proj']]}", old["role"]
    for suffix, role in DIFFUSERS_ROLES.items():
        if rest.endswith("." + suffix):
            return "diffusers", component, rest[:-len(suffix) - 1], role
    return None


def _metadata(metadata: dict | None, component: str) -> dict:
    """The peft LoraConfig fields of one component from the file's metadata ({} when it has none)."""
    config = {k[len(component) + 1:]: v for k, v in (metadata or {}).items() if k.startswith(component + ".")}
    if config.get("use_dora"):
        raise LoRAFormatError(f"DoRA (weight-decomposed LoRA) is not supported (the file's metadata says "
                              f"{component}.use_dora=true)")
    return config


def _metadata_alpha(metadata: dict | None, component: str, file_layer: str) -> float | None:
    """peft's rule: the first `alpha_pattern` key matching the layer path (as a regex on a dotted suffix), else
    `lora_alpha`. None when the file has no metadata."""
    config = _metadata(metadata, component)
    if not config:
        return None
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", file_layer):
            return float(alpha)
    return float(config["lora_alpha"]) if "lora_alpha" in config else None


def read_lora(source, models: Mapping[str, nn.Module | None], weight_name: str | None = None,
              **hub) -> list[LoRAEntry]:
    """Read a LoRA file (any format above) and check it against `models` ({"unet": ..., "text_encoder": ...}).
    Returns one entry per layer; raises LoRAFormatError / FileNotFoundError before anything is changed."""
    tensors, metadata, where = read_lora_file(source, weight_name, **hub)
    if not tensors:
        raise LoRAFormatError(f"{where} holds no tensors")
    for fragment, what in UNSUPPORTED.items():
        hits = [k for k in tensors if fragment in k]
        if hits:
            raise LoRAFormatError(f"{where}: {what} files are not supported, only LoRA / LoCon "
                                  f"(found e.g. {hits[0]!r})")
    names = LayerNames(models.get("unet"), models.get("text_encoder"))
    groups: dict[tuple[str, str], dict[str, str]] = {}  # (component, ours) -> role -> key
    unknown, unplaced = [], []
    for key in tensors:
        parsed = _parse_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        fmt, component, file_layer, role = parsed
        target = names.kohya.get(file_layer) if fmt == "kohya" else (
            (component, names.dotted[component][file_layer]) if file_layer in names.dotted[component] else None)
        if target is None or models.get(target[0]) is None:
            unplaced.append(key)
            continue
        group = groups.setdefault(target, {"file_layer": file_layer, "format": fmt})
        if role in group:
            raise LoRAFormatError(f"{where}: {group[role]!r} and {key!r} are both the {role} weight of layer "
                                  f"{target[0]}.{target[1]}")
        group[role] = key
    problems = []
    if unknown:
        problems.append(_listing("keys in no LoRA format minidepth reads (kohya lora_down/lora_up/alpha, diffusers/PEFT "
                                 "lora_A/lora_B, old to_q_lora.down)", unknown))
    if unplaced:
        problems.append(_listing("keys that match no layer of the UNet or the text encoder", unplaced))
    entries = []
    for (component, ours), group in groups.items():
        missing = [r for r in ("down", "up") if r not in group]
        if missing:
            some = group.get("down") or group.get("up") or group.get("alpha")
            problems.append(f"  {some}: the {' and '.join(missing)} weight of this layer is missing")
            continue
        alpha = (float(tensors[group["alpha"]]) if "alpha" in group
                 else _metadata_alpha(metadata, component, group["file_layer"]))
        config = _metadata(metadata, component)
        # diffusers: with metadata, LoraConfig(**metadata) decides lora_bias (biases of a file that says false are
        # ignored, with a warning); without, any lora_B.bias turns it on
        bias_key = group.get("up_bias") if not config or config.get("lora_bias") else None
        if group.get("up_bias") and bias_key is None:
            logger.warning("%s: %s ignored (the file's metadata says lora_bias=false, as diffusers does)", where,
                           group["up_bias"])
        entry = LoRAEntry(component, ours, tensors[group["down"]], tensors[group["up"]], alpha,
                          {r: group[r] for r in ("down", "up", "alpha", "up_bias") if r in group},
                          up_bias=tensors[bias_key] if bias_key else None,
                          rank_stabilised=bool(config.get("use_rslora")))
        problem = _check_shapes(entry, models[component].get_submodule(ours))
        if problem:
            problems.append(problem)
        entries.append(entry)
    if problems:
        raise LoRAFormatError(f"{where} does not fit this pipeline:\n" + "\n".join(problems))
    return entries


def _check_shapes(entry: LoRAEntry, layer: nn.Module) -> str | None:
    """A (r, in[, k, k]) and B (out, r[, 1, 1]) must fit the layer; a 1x1-conv A/B on a Linear layer is squeezed."""
    down, up = entry.down, entry.up
    if isinstance(layer, nn.Linear) and down.ndim == 4 and down.shape[2:] == (1, 1) and up.ndim == 4:
        down, up = down.flatten(1), up.flatten(1)
        entry.down, entry.up = down, up
    rank = down.shape[0] if down.ndim else 0
    if isinstance(layer, nn.Linear):
        want_down, want_up = (rank, layer.in_features), (layer.out_features, rank)
    else:
        want_down, want_up = (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
    name = f"{entry.component}.{entry.layer}"
    if tuple(up.shape[1:2]) != (rank,):
        return (f"  rank mismatch for {name}: {entry.keys['down']} has rank {rank} but {entry.keys['up']} has shape "
                f"{list(up.shape)}")
    for role, tensor, want in (("down", down, want_down), ("up", up, want_up)):
        if tuple(tensor.shape) != want:
            return (f"  {entry.keys[role]}: shape {list(tensor.shape)} does not fit {name} "
                    f"({type(layer).__name__}, expects {list(want)})")
    if entry.up_bias is not None and tuple(entry.up_bias.shape) != (want_up[0],):
        return f"  {entry.keys['up_bias']}: shape {list(entry.up_bias.shape)}, expects [{want_up[0]}]"
    return None


def _listing(title: str, items: list[str], limit: int = 8) -> str:
    shown = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {len(items)} {title}:\n    {shown}{more}"
