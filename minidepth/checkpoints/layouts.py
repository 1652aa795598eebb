"""How a network is stored: in a diffusers / transformers component folder (`FolderFormat`) and inside an original
single file (`SingleFileLayout`). The format modules (diffusers_format.py, transformers_format.py, ldm_format.py)
fill these in per network class; pretrained.py looks them up along a class's MRO."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .keymap import KeyMap


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
