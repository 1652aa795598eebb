"""One loading path for every network: `from_pretrained`, `save_pretrained`, `from_single_file`.

The model classes (`UNet`, `AutoencoderKL`, `CLIPTextModel`, `DPTDepthModel`) hold no loading code: they inherit
`models.loadable.Loadable`, whose methods call the functions here (this module registers itself there on import).
What differs between the networks is data, kept per source format and keyed by model class:

    diffusers_format.py     diffusers folders: the UNet's and the VAE's config.json and tensor names
    transformers_format.py  transformers folders: the text encoder's and the depth model's config.json and tensor names
    ldm_format.py           the original single file (`512-depth-ema.safetensors`) and the original MiDaS file

A class's format is found along its MRO (`format_of`), so a researcher's subclass that changes one block
(`class MyUNet(UNet)`) loads, saves and converts exactly like the class it extends.

Every load goes the same way: config.json -> config dataclass (a function that spells out the format's traps), build
the model on the meta device (no memory), read the weight file (safetensors first; pickles only with
`weights_only=True`), rename its tensors through a strict `KeyMap`, and assign them in the requested dtype and device.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from ..models.loadable import Loadable
from . import depth_anything_format, diffusers_format, ldm_format, transformers_format
from .keymap import KeyMap
from .layouts import FolderFormat, SingleFileLayout
from .loader import CheckpointError, TensorFile, build_on_meta, find_weights, mapped_state_dict, read_json, save_component

FOLDER_FORMATS: dict[type, FolderFormat] = {**diffusers_format.FOLDER_FORMATS, **transformers_format.FOLDER_FORMATS,
                                             **depth_anything_format.FOLDER_FORMATS}
SINGLE_FILE_LAYOUTS: dict[type, tuple[SingleFileLayout, ...]] = ldm_format.LAYOUTS


def format_of(cls: type, table: Mapping[type, object]):
    """The entry of `cls`, or of the nearest class it inherits from, in `table`."""
    for klass in cls.__mro__:
        if klass in table:
            return table[klass]
    known = ", ".join(k.__name__ for k in table)
    raise TypeError(f"{cls.__name__} is not one of the networks minidepth can load ({known}), nor a subclass of one")


def folder_format(cls: type) -> FolderFormat:
    return format_of(cls, FOLDER_FORMATS)


def single_file_layouts(cls: type) -> tuple[SingleFileLayout, ...]:
    return format_of(cls, SINGLE_FILE_LAYOUTS)


def fill(model, tensors: Mapping[str, torch.Tensor], keymap: KeyMap, *, dtype=None, device=None,
         where: str = "checkpoint"):
    """Fill `model` (built on the meta device) strictly from `tensors`, in `dtype` and on `device`; eval mode."""
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype (e.g. torch.float16), got {dtype!r}")
    state = mapped_state_dict(model, tensors, keymap, dtype=dtype, device=device, where=where)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def from_pretrained(cls: type, folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, variant: str | None = None):
    """Load a component folder into a `cls`: config.json + the weight file (`<stem>[.<variant>].safetensors`, else
    `.bin`). dtype=None keeps the file's dtype (the VAE: float32, as diffusers does)."""
    fmt = folder_format(cls)
    folder = Path(folder)
    config = fmt.config_from_dict(read_json(folder / "config.json"))
    path = find_weights(folder, fmt.weight_stems, variant)
    tensors = TensorFile(path)
    model = build_on_meta(lambda: cls(config))
    return fill(model, tensors, fmt.keymap_for(tensors), dtype=dtype or fmt.default_dtype, device=device,
                where=str(path))


def save_pretrained(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Write the component folder the reference library reads (config.json + one safetensors file)."""
    fmt = folder_format(type(model))
    save_component(folder, fmt.config_to_dict(model.config), model, fmt.save_keymap, fmt.save_name)


def from_single_file(cls: type, path: str | os.PathLike | TensorFile, config=None, *, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None):
    """Load a `cls` from its part of an original checkpoint (`512-depth-ema.safetensors` / `.ckpt`; for the depth
    model also MiDaS' own `dpt_hybrid-midas-501f0c75.pt`). The file's other parts are other networks' and are not
    read. `config` defaults to the SD2-depth preset. `path` may also be an already opened `TensorFile` (the pipeline
    opens the single file once for all four networks)."""
    file = path if isinstance(path, TensorFile) else TensorFile(path)
    path = file.path
    layouts = single_file_layouts(cls)
    for layout in layouts:
        if any(name.startswith(layout.marker) for name in file):
            break
    else:
        raise CheckpointError(f"{path}: no {cls.__name__} tensors found (looked for names starting with "
                              f"{' or '.join(repr(lay.marker) for lay in layouts)})")
    model = build_on_meta(lambda: cls(config))  # config None: the SD2-depth preset
    tensors = {name: file[name] for name in file if name.startswith(layout.take)}
    return fill(model, tensors, layout.keymap(model.config), dtype=dtype or folder_format(cls).default_dtype,
                device=device, where=str(path))


Loadable.checkpoint_side = sys.modules[__name__]  # `UNet.from_pretrained` (models/loadable.py) calls this module
