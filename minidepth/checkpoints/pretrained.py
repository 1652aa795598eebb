"""One loading path for every network: `from_pretrained`, `save_pretrained`, `from_single_file`, `num_parameters`.

The model classes (`UNet`, `AutoencoderKL`, `CLIPTextModel`, `DPTDepthModel`) inherit these methods from `Pretrained`
and hold no loading code themselves. What differs between them is data, kept per source format:

    diffusers_format.py     diffusers folders: the UNet's and the VAE's config.json and tensor names
    transformers_format.py  transformers folders: the text encoder's and the depth model's config.json and tensor names
    ldm_format.py           the original single file (`512-depth-ema.safetensors`) and the original MiDaS file

Every load goes the same way: config.json -> config dataclass (a function that spells out the format's traps), build
the model on the meta device (no memory), read the weight file (safetensors first; pickles only with
`weights_only=True`), rename its tensors through a strict `KeyMap`, and assign them in the requested dtype and device.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .keymap import KeyMap
from .loader import (CheckpointError, TensorFile, build_on_meta, find_weights, mapped_state_dict, read_json,
                     save_component)


@dataclass(frozen=True)
class FolderFormat:
    """How one network is stored in a diffusers / transformers component folder (`unet/`, `text_encoder/`, ...)."""
    config_from_dict: Callable[[dict], Any]       # config.json -> our config dataclass
    config_to_dict: Callable[[Any], dict]         # our config -> config.json the reference library reads
    weight_stems: tuple[str, ...]                 # weight file names without suffix, in order of preference
    keymap_for: Callable[[Mapping], KeyMap]       # the file's tensor names -> the key map of its naming
    save_keymap: KeyMap                           # the naming we write
    save_name: str                                # the weight file we write
    default_dtype: torch.dtype | None = None      # dtype=None loads the file's dtype, or this one when set


@dataclass(frozen=True)
class SingleFileLayout:
    """Where one network sits inside a single checkpoint file, recognised by a tensor-name prefix."""
    marker: str                                   # a name prefix that only this layout has
    take: str                                     # the tensors handed to the key map (all names under this prefix)
    keymap: Callable[[Any], KeyMap]               # our config -> the key map


def folder_format(cls: type) -> FolderFormat:
    from . import diffusers_format, transformers_format
    formats = {"UNet": diffusers_format.UNET, "AutoencoderKL": diffusers_format.VAE,
               "CLIPTextModel": transformers_format.CLIP_TEXT, "DPTDepthModel": transformers_format.DPT}
    return formats[cls.__name__]


def single_file_layouts(cls: type) -> tuple[SingleFileLayout, ...]:
    from . import ldm_format
    return ldm_format.LAYOUTS[cls.__name__]


def fill(model, tensors: Mapping[str, torch.Tensor], keymap: KeyMap, *, dtype=None, device=None,
         where: str = "checkpoint"):
    """Fill `model` (built on the meta device) strictly from `tensors`, in `dtype` and on `device`; eval mode."""
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype (e.g. torch.float16), got {dtype!r}")
    state = mapped_state_dict(model, tensors, keymap, dtype=dtype, device=device, where=where)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


class Pretrained:
    """Mixed into each network class: loading, saving and counting its weights (see the module docstring)."""

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, variant: str | None = None):
        """Load a component folder: config.json + the weight file (`<stem>[.<variant>].safetensors`, else `.bin`).
        dtype=None keeps the file's dtype (the VAE: float32, as diffusers does)."""
        fmt = folder_format(cls)
        folder = Path(folder)
        config = fmt.config_from_dict(read_json(folder / "config.json"))
        path = find_weights(folder, fmt.weight_stems, variant)
        tensors = TensorFile(path)
        model = build_on_meta(lambda: cls(config))
        return fill(model, tensors, fmt.keymap_for(tensors), dtype=dtype or fmt.default_dtype, device=device,
                    where=str(path))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the component folder the reference library reads (config.json + one safetensors file)."""
        fmt = folder_format(type(self))
        save_component(folder, fmt.config_to_dict(self.config), self, fmt.save_keymap, fmt.save_name)

    @classmethod
    def from_single_file(cls, path: str | os.PathLike | TensorFile, config=None, *, dtype: torch.dtype | None = None,
                         device: torch.device | str | None = None):
        """Load this network's part of an original checkpoint (`512-depth-ema.safetensors` / `.ckpt`; for the depth
        model also MiDaS' own `dpt_hybrid-midas-501f0c75.pt`). The file's other parts are other networks' and are
        not read. `config` defaults to the SD2-depth preset. `path` may also be an already opened `TensorFile`
        (the pipeline opens the single file once for all four networks)."""
        file = path if isinstance(path, TensorFile) else TensorFile(path)
        path = file.path
        for layout in single_file_layouts(cls):
            if any(name.startswith(layout.marker) for name in file):
                break
        else:
            raise CheckpointError(f"{path}: no {cls.__name__} tensors found (looked for names starting with "
                                  f"{' or '.join(repr(lay.marker) for lay in single_file_layouts(cls))})")
        model = build_on_meta(lambda: cls(config))  # config None: the SD2-depth preset
        tensors = {name: file[name] for name in file if name.startswith(layout.take)}
        return fill(model, tensors, layout.keymap(model.config), dtype=dtype or folder_format(cls).default_dtype,
                    device=device, where=str(path))

    def num_parameters(self) -> int:
        """The number of weights (parameters; buffers excluded)."""
        return sum(p.numel() for p in self.parameters())
