"""Checkpoint handling: declarative key maps (`keymap.py`), the strict loader (`loader.py`), and loading any network
class -- subclasses included -- from folders and single files (`pretrained.py`, which also gives the model classes
their `from_pretrained` / `from_single_file` / `save_pretrained`).

    unet = checkpoints.from_pretrained(MyUNet, "weights/sd2-depth/unet")      # = MyUNet.from_pretrained(...)
"""

from .keymap import IDENTITY, KeyMap, Rule, prefixed
from .loader import (CheckpointError, TensorFile, build_on_meta, export_state_dict, find_weights, load_weights,
                     mapped_state_dict, read_json, save_component)
from .pretrained import from_pretrained, from_single_file, save_pretrained

__all__ = ["IDENTITY", "KeyMap", "Rule", "prefixed", "CheckpointError", "TensorFile", "build_on_meta",
           "export_state_dict", "find_weights", "load_weights", "mapped_state_dict", "read_json", "save_component",
           "from_pretrained", "from_single_file", "save_pretrained"]
