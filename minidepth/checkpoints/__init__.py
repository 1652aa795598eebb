"""Checkpoint handling: declarative key maps (`keymap.py`) and the strict loader (`loader.py`)."""

from .keymap import IDENTITY, KeyMap, Rule, prefixed
from .loader import (CheckpointError, TensorFile, build_on_meta, export_state_dict, find_weights, load_weights,
                     mapped_state_dict, read_json, save_component)

__all__ = ["IDENTITY", "KeyMap", "Rule", "prefixed", "CheckpointError", "TensorFile", "build_on_meta",
           "export_state_dict", "find_weights", "load_weights", "mapped_state_dict", "read_json", "save_component"]
