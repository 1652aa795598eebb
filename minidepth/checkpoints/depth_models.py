"""Depth models by name, for the pipeline's depth slot (minidepth/depth.py states the protocol any model follows).

    name                       model                                        files
    dpt-hybrid                 MiDaS DPT-Hybrid, 122 M parameters: what     the checkpoint's depth_estimator/ and
                               SD2-depth was trained on (the default)       feature_extractor/
    depth-anything-v2-small    Depth Anything V2 Small, 24.8 M              depth-anything/Depth-Anything-V2-Small-hf
    depth-anything-v2-base     Depth Anything V2 Base, 97.5 M               depth-anything/Depth-Anything-V2-Base-hf
    depth-anything-v2-large    Depth Anything V2 Large, 335.3 M             depth-anything/Depth-Anything-V2-Large-hf
    a folder                   config.json (model_type "depth_anything" -> DepthAnythingV2, "dpt" -> DPTDepthModel),
                               the weights, preprocessor_config.json (-> DPTImageProcessor)
    a Hub repo id (owner/name) the same files, downloaded into the Hub cache as the checkpoints are (hub.py)

Two steps, so that a wrong name or folder fails before anything big loads:

    source = resolve_depth_model("depth-anything-v2-small")      # names, folders, config files (Hub: configs only)
    model, processor = load_depth_model(source, device="cpu")      # the weights (Hub: downloaded now)

`check_depth_model_name` is the offline check of a name alone (the command line runs it before anything loads),
`depth_model_key` names a model in caches (train-lora's depth cache), and `DepthModels` switches a pipeline's depth
model by name, loading each one once (batch jobs and the web page).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .hub import is_repo_id, resolve_checkpoint

DEFAULT = "dpt-hybrid"
HUB_REPOS = {f"depth-anything-v2-{size}": f"depth-anything/Depth-Anything-V2-{size.capitalize()}-hf"
             for size in ("small", "base", "large")}
NAMES = (DEFAULT, *HUB_REPOS)
KINDS = {"depth_anything": "DepthAnythingV2", "dpt": "DPTDepthModel"}  # config.json model_type -> our class
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class DepthModelSource:
    """A depth model found and checked, weights not read: what `load_depth_model` loads."""
    name: str                        # for records: a name of NAMES, a repo id, or the folder's full path
    kind: str                        # "depth_anything" or "dpt" (config.json's model_type)
    folder: Path                     # config.json (and the weights, except for a Hub repo not downloaded yet)
    processor_folder: Path           # preprocessor_config.json
    config: object                   # our config dataclass, read from config.json
    repo_id: str | None = None       # the weights are still to be downloaded from this repo
    own: bool = False                # the checkpoint's own DPT (its `variant` applies)
    hub: tuple = ()                  # (revision, cache_dir, local_files_only) for the download


# ------------------------------------------------------------------------------------------------ finding
def _unknown(text: str) -> ValueError:
    close = difflib.get_close_matches(text, NAMES, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ValueError(f"unknown depth model {text!r}{hint}: give one of {', '.join(NAMES)}, a folder with "
                      "config.json (model_type depth_anything or dpt), the weights and preprocessor_config.json, "
                      "or a Hub repo id (owner/name)")


def _read_config(path: Path, name: str) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"depth model {name}: {path} is not readable JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"depth model {name}: {path} does not hold a JSON object")
    return config


def _folder_kind(folder: Path, name: str, processor_folder: Path | None = None,
                 weights: bool = True) -> tuple[str, dict, Path]:
    """(kind, config.json, folder of preprocessor_config.json) of a depth-model folder, checked from its files alone:
    ValueError saying what the folder lacks or is instead."""
    if (folder / "model_index.json").is_file():
        raise ValueError(f"depth model {name}: {folder} is a pipeline checkpoint (model_index.json), not a depth "
                         f"model; its own depth model is {DEFAULT!r} (or pass {folder / 'depth_estimator'})")
    if not (folder / "config.json").is_file():
        raise ValueError(f"depth model {name}: {folder} has no config.json, so it is not a depth-model folder "
                         "(config.json with model_type depth_anything or dpt, the weights, preprocessor_config.json)")
    config = _read_config(folder / "config.json", name)
    kind = config.get("model_type")
    if kind not in KINDS:
        what = f"model_type {kind!r}" if kind else \
            f"no model_type (a {config.get('_class_name', 'non-transformers')} config?)"
        raise ValueError(f"depth model {name}: {folder / 'config.json'} has {what}; minidepth runs depth models of "
                         f"model_type {' or '.join(map(repr, KINDS))}")
    if processor_folder is None:  # a checkpoint's depth_estimator/ folder: its preprocessor is in ../feature_extractor
        sibling = folder.parent / "feature_extractor"
        processor_folder = folder if (folder / "preprocessor_config.json").is_file() or not \
            (sibling / "preprocessor_config.json").is_file() else sibling
    if not (processor_folder / "preprocessor_config.json").is_file():
        raise ValueError(f"depth model {name}: {processor_folder} has no preprocessor_config.json (the image "
                         "preprocessing the model was trained with)")
    if weights and not any((folder / f).is_file() or any(folder.glob(f"{Path(f).stem}.*{Path(f).suffix}"))
                           for f in WEIGHT_FILES):
        raise ValueError(f"depth model {name}: {folder} holds no weights ({' or '.join(WEIGHT_FILES)})")
    return kind, config, processor_folder


def check_depth_model_name(name) -> str:
    """The offline check of a name alone (no download, no weights read): a name of NAMES, a Hub repo id, or a
    depth-model folder. Returns the name for records (folders: the full path); ValueError otherwise."""
    text = str(name).strip()
    if text in NAMES:
        return text
    path = Path(text).expanduser()
    if path.is_dir():
        _folder_kind(path, text)
        return str(path.resolve())
    if path.exists():
        raise ValueError(f"depth model {text}: a file, not a folder (a depth model is a folder with config.json, "
                         "the weights and preprocessor_config.json)")
    if is_repo_id(text):
        return text
    if text.startswith((".", "/", "~")) or os.sep in text:
        raise ValueError(f"depth model {text}: folder not found")
    raise _unknown(text)


def _config_from_dict(kind: str):
    if kind == "depth_anything":
        from .depth_anything_format import depth_anything_config_from_dict
        return depth_anything_config_from_dict
    from .transformers_format import dpt_config_from_dict
    return dpt_config_from_dict


def _source(folder: Path, name: str, processor_folder: Path | None = None, **extra) -> DepthModelSource:
    kind, config, processor_folder = _folder_kind(folder, name, processor_folder, weights=extra.get("repo_id") is None)
    try:
        parsed = _config_from_dict(kind)(config)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"depth model {name}: {folder / 'config.json'}: {e}") from e
    if getattr(parsed, "depth_type", "relative") != "relative":
        raise ValueError(f"depth model {name}: a metric-depth model (metres, larger = farther); the depth slot takes "
                         "relative inverse depth (larger = nearer), as the -hf relative-depth checkpoints give")
    return DepthModelSource(name, kind, folder, processor_folder, parsed, **extra)


def _download(repo_id: str, patterns: list[str], hub: tuple) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    revision, cache_dir, local_files_only = hub
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, revision=revision, cache_dir=cache_dir,
                                      local_files_only=local_files_only))
    except LocalEntryNotFoundError as e:
        from huggingface_hub import constants
        if local_files_only or constants.HF_HUB_OFFLINE:
            raise FileNotFoundError(f"depth model {repo_id!r} is not in the local Hub cache and downloading is off "
                                    "(local_files_only=True or HF_HUB_OFFLINE=1)") from e
        raise FileNotFoundError(f"depth model {repo_id!r} is not in the local Hub cache and the Hub could not be "
                                "reached; check the connection, or download the repo where the Hub is reachable and "
                                "pass its folder") from e


def resolve_depth_model(name, *, checkpoint=None, revision: str | None = None, cache_dir=None,
                        local_files_only: bool = False) -> DepthModelSource:
    """Find and check a depth model without reading its weights (a Hub repo: only its two config files are fetched).
    `checkpoint` (folder or repo id) is needed for "dpt-hybrid", the checkpoint's own DPT. ValueError for an unknown
    name or a folder that is not a depth model, with what to give instead."""
    if isinstance(name, DepthModelSource):
        return name
    text = str(name).strip()
    if text == DEFAULT:
        if checkpoint is None:
            raise ValueError(f"depth model {DEFAULT!r} is a checkpoint's own DPT: pass checkpoint= (its folder or "
                             "repo id)")
        root = resolve_checkpoint(checkpoint, cache_dir=cache_dir, local_files_only=local_files_only)
        return _source(root / "depth_estimator", DEFAULT, root / "feature_extractor", own=True)
    check_depth_model_name(text)  # unknown names and missing folders: before any network
    path = Path(text).expanduser()
    if path.is_dir():
        return _source(path, str(path.resolve()))
    repo_id, hub = HUB_REPOS.get(text, text), (revision, cache_dir, local_files_only)
    folder = _download(repo_id, ["config.json", "preprocessor_config.json"], hub)
    return _source(folder, text, repo_id=repo_id, hub=hub)


# ------------------------------------------------------------------------------------------------ loading
def depth_model_class(kind: str):
    from ..models.depth_anything import DepthAnythingV2
    from ..models.dpt import DPTDepthModel
    return {"depth_anything": DepthAnythingV2, "dpt": DPTDepthModel}[kind]


def load_depth_model(name, *, checkpoint=None, dtype=None, device=None, variant: str | None = None,
                     revision: str | None = None, cache_dir=None, local_files_only: bool = False):
    """(model, processor) for the depth slot: a name, folder or repo id (see the module docstring), or a source from
    `resolve_depth_model`. `variant` applies to the checkpoint's own DPT only."""
    from ..dpt_processing import DPTImageProcessor
    source = resolve_depth_model(name, checkpoint=checkpoint, revision=revision, cache_dir=cache_dir,
                                 local_files_only=local_files_only)
    folder = source.folder
    if source.repo_id is not None:
        folder = _download(source.repo_id, ["config.json", "preprocessor_config.json", WEIGHT_FILES[0]], source.hub)
        if not (folder / WEIGHT_FILES[0]).is_file():  # older repos: the pickle (loaded with weights_only=True)
            folder = _download(source.repo_id, ["config.json", "preprocessor_config.json", WEIGHT_FILES[1]],
                               source.hub)
    model = depth_model_class(source.kind).from_pretrained(folder, dtype=dtype, device=device,
                                                           variant=variant if source.own else None)
    return model, DPTImageProcessor.from_pretrained(source.processor_folder)


def depth_model_configs(name, *, checkpoint=None, local_files_only: bool = False):
    """(kind, config dataclass, DPTProcessorConfig) of a depth model, no weights read: the packaged configs for the
    Depth Anything V2 names (minidepth/data/depth-anything-v2/, no network), else the model's config files."""
    from ..dpt_processing import DPTProcessorConfig
    from .loader import read_json
    text = str(name).strip()
    if text in HUB_REPOS:
        from .depth_anything_format import packaged_config, packaged_folder
        size = text.rsplit("-", 1)[1]
        processor = read_json(packaged_folder(size) / "preprocessor_config.json")
        return "depth_anything", packaged_config(size), DPTProcessorConfig.from_dict(processor)
    source = resolve_depth_model(text, checkpoint=checkpoint, local_files_only=local_files_only)
    processor = read_json(source.processor_folder / "preprocessor_config.json")
    return source.kind, source.config, DPTProcessorConfig.from_dict(processor)


def depth_model_key(name) -> str:
    """A file-name-safe key of a depth model for caches: the name itself for NAMES, the repo id with "--" for "/",
    and for a folder its name plus a hash of its path, config and weight files' sizes and times (a retrained model
    in the same folder gets a new key)."""
    text = str(name or DEFAULT).strip()
    if text in NAMES:
        return text
    path = Path(text).expanduser()
    if not path.is_dir():
        return _safe(text.replace("/", "--"))
    h = hashlib.sha256(str(path.resolve()).encode())
    for file in sorted(path.iterdir()):
        if file.name == "config.json" or file.suffix in (".safetensors", ".bin"):
            stat = file.stat()
            h.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"{_safe(path.resolve().name)}-{h.hexdigest()[:8]}"


def _safe(text: str) -> str:
    return re.sub(r"[^\w.\-]+", "-", text)


class DepthModels:
    """A pipeline's depth models by name, each loaded once (in the dtype and on the device of the one in the slot
    when it loads): `use(name)` puts it into `pipe.depth_estimator` / `pipe.feature_extractor`. `current` is the name
    of the pipeline's own at the start; `checkpoint` (folder or repo id) is where "dpt-hybrid" comes from."""

    def __init__(self, pipe, current: str | None = None, checkpoint=None, variant: str | None = None):
        self.pipe, self.checkpoint, self.variant = pipe, checkpoint, variant
        self.current = check_depth_model_name(current or DEFAULT)
        self.loaded = {self.current: (pipe.depth_estimator, pipe.feature_extractor)}

    def use(self, name: str | None) -> None:
        key = check_depth_model_name(name or DEFAULT)
        if key == self.current:
            return
        if key not in self.loaded:
            from ..depth import model_device_dtype
            slot = self.pipe.depth_estimator
            device, dtype = model_device_dtype(slot) if slot is not None else (self.pipe.device, self.pipe.dtype)
            self.loaded[key] = load_depth_model(key, checkpoint=self.checkpoint, dtype=dtype, device=device,
                                                variant=self.variant)
        self.pipe.depth_estimator, self.pipe.feature_extractor = self.loaded[key]
        self.current = key
