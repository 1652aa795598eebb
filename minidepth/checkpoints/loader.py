"""Strict weight loading: read a checkpoint file, rename its tensors through a `KeyMap`, and fill a model.

- safetensors files are memory-mapped; `.bin` / `.ckpt` / `.pt` pickles are only ever opened with
  `torch.load(weights_only=True)`, which refuses to run code hidden in the file.
- Loading is all-or-nothing: every parameter of the model must come from the file, every tensor of the file must be used
  (or listed in the map's `ignore`), and every shape must agree. Otherwise one `CheckpointError` lists what is wrong, by name.
- Models can be built on the "meta" device (no memory) and filled here with `assign=True`, straight in the requested
  dtype and device, so a 3.5 GB UNet is never held twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, TypeVar

import torch
from torch import nn

from .keymap import KeyMap

M = TypeVar("M", bound=nn.Module)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


class CheckpointError(ValueError):
    """A weight file that cannot be used: unreadable, or not matching the model tensor for tensor."""


# ------------------------------------------------------------------------------------------------ reading files
class TensorFile(Mapping):
    """Read-only `name -> tensor` view of one checkpoint file; tensors are read on access (safetensors: mmapped)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"weight file not found: {self.path}")
        suffix = self.path.suffix.lower()
        if suffix in SAFETENSORS_SUFFIXES:
            from safetensors import safe_open
            try:
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
                self._names = list(self._handle.keys())
            except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
                raise CheckpointError(f"{self.path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
            self._get = self._get_safetensors
        elif suffix in PICKLE_SUFFIXES:
            try:
                obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # old (non-zip) serialization cannot be mmapped
                obj = self._load_pickle(mmap=False)
            except Exception as e:
                raise self._pickle_error(e) from e
            if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
                obj = obj["state_dict"]  # LDM / Lightning .ckpt layout
            if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
                raise CheckpointError(f"{self.path}: expected a dict of tensors, found {type(obj).__name__}")
            self._tensors = obj
            self._names = list(obj)
            self._get = self._tensors.__getitem__
        else:
            raise CheckpointError(f"{self.path}: unsupported weight file type {suffix!r}; "
                                  f"expected one of {SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES}")

    def _load_pickle(self, mmap: bool):
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:
            raise self._pickle_error(e) from e

    def _pickle_error(self, e: Exception) -> CheckpointError:
        return CheckpointError(f"{self.path}: refused or failed to load pickle with torch.load(weights_only=True) "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                               "Files that need arbitrary code to unpickle are never loaded; prefer .safetensors.")

    def _get_safetensors(self, name: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {name!r} ({type(e).__name__}: {e})") from e

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._get(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        if hasattr(self, "_handle"):
            return tuple(self._handle.get_slice(name).get_shape())
        return tuple(self._tensors[name].shape)


def find_weights(folder: str | os.PathLike, stems: tuple[str, ...], variant: str | None = None) -> Path:
    """The weight file of a component folder: `<stem>[.<variant>].safetensors` first, then the `.bin` pickle."""
    folder = Path(folder)
    tried = []
    for suffix in (".safetensors", ".bin"):
        for stem in stems:
            name = f"{stem}.{variant}{suffix}" if variant else f"{stem}{suffix}"
            tried.append(name)
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(f"no weight file in {folder} (looked for {', '.join(tried)})")


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


# ------------------------------------------------------------------------------------------------ the strict load
def _listing(title: str, items: list[str], limit: int = 8) -> str:
    shown = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {len(items)} {title}:\n    {shown}{more}"


def mapped_state_dict(model: nn.Module, tensors: Mapping[str, torch.Tensor], keymap: KeyMap, *,
                      dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                      where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Our state dict built from checkpoint `tensors` through `keymap`; raises one CheckpointError on any mismatch."""
    expected = model.state_dict(keep_vars=True)
    out, missing, bad_shape, used = {}, [], [], set()
    for name, param in expected.items():
        rule, sources = keymap.rule_for(name)
        absent = [s for s in sources if s not in tensors]
        if absent:
            missing.extend(f"{s}  (for {name})" if s != name else s for s in absent)
            continue
        used.update(sources)
        value = rule.to_model([tensors[s] for s in sources])
        if tuple(value.shape) != tuple(param.shape):
            bad_shape.append(f"{'+'.join(sources)}: checkpoint {list(value.shape)} -> model {name} {list(param.shape)}")
            continue
        if value.is_floating_point():
            value = value.to(dtype=dtype if dtype is not None else param.dtype if not param.is_meta else value.dtype)
        out[name] = value.to(device) if device is not None else value
    unexpected = [n for n in tensors if n not in used and not keymap.is_ignored(n)]
    if missing or unexpected or bad_shape:
        parts = [f"{where} does not match {type(model).__name__} (key map {keymap.name!r}):"]
        if missing:
            parts.append(_listing("missing tensors", missing))
        if unexpected:
            parts.append(_listing("unexpected tensors", sorted(unexpected)))
        if bad_shape:
            parts.append(_listing("shape mismatches", bad_shape))
        raise CheckpointError("\n".join(parts))
    return out


def load_weights(model: M, files: str | os.PathLike | list, keymap: KeyMap, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> M:
    """Fill `model` (possibly on the meta device) from one or more weight files, strictly. Returns the model."""
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    opened = [TensorFile(f) for f in files]
    tensors = opened[0] if len(opened) == 1 else _merged(opened)
    state = mapped_state_dict(model, tensors, keymap, dtype=dtype, device=device,
                              where=", ".join(str(f) for f in files))
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _merged(files: list[TensorFile]) -> dict[str, torch.Tensor]:
    merged: dict = {}
    for f in files:
        for name in f:
            if name in merged:
                raise CheckpointError(f"tensor {name!r} appears in more than one file ({f.path})")
            merged[name] = f[name]
    return merged


def build_on_meta(factory: Callable[[], M]) -> M:
    """Construct a model without allocating its weights (they are assigned by `load_weights`)."""
    with torch.device("meta"):
        return factory()


def export_state_dict(model: nn.Module, keymap: KeyMap) -> dict[str, torch.Tensor]:
    """Our weights under the checkpoint's names (the inverse of loading), e.g. for `save_pretrained`."""
    out: dict[str, torch.Tensor] = {}
    chunks: dict[str, dict[int, torch.Tensor]] = {}
    for name, value in model.state_dict().items():
        rule, sources = keymap.rule_for(name)
        if rule.transform.startswith("chunk:"):
            k, n = map(int, rule.transform[len("chunk:"):].split("/"))
            chunks.setdefault(sources[0], {})[k] = value
            if len(chunks[sources[0]]) == n:
                out[sources[0]] = torch.cat([chunks[sources[0]][i] for i in range(n)], dim=0)
            continue
        for source, tensor in zip(sources, rule.to_checkpoint(value)):
            out[source] = tensor.contiguous()
    return out


def save_component(folder: str | os.PathLike, config: dict, model: nn.Module, keymap: KeyMap,
                   weights_name: str) -> Path:
    """Write `config.json` and `<weights_name>` (safetensors, under the checkpoint's names via `keymap`)."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(export_state_dict(model, keymap), str(folder / weights_name), metadata={"format": "pt"})
    return folder
