"""The seven components of a diffusers-layout checkpoint folder (or Hub repo): load them all, save them all."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .hub import resolve_checkpoint
from .loader import read_json


def load_components(path_or_repo_id, *, dtype=None, variant=None, revision=None, cache_dir=None,
                    local_files_only=False, device=None, depth_estimator=None, feature_extractor=None) -> dict:
    """The seven components of a checkpoint folder (or Hub repo), ready for the pipeline's constructor.
    `depth_estimator` / `feature_extractor`: see `DepthSlot`."""
    slot = DepthSlot(depth_estimator, feature_extractor, cache_dir=cache_dir, local_files_only=local_files_only)
    components = _checkpoint_components(path_or_repo_id, dtype=dtype, variant=variant, revision=revision,
                                        cache_dir=cache_dir, local_files_only=local_files_only, device=device,
                                        skip=slot.skip)
    return slot.fill(components, dtype=dtype, device=device, variant=variant)


class DepthSlot:
    """What a loader is given for the depth slot (minidepth/depth.py), checked (and a name resolved) before anything
    loads. A given `depth_estimator` replaces the checkpoint's, which is then not loaded: a model of the slot's
    protocol (used as given), or a name, folder or repo id of depth_models.py (loaded in the checkpoint's dtype on its
    device, with its own preprocessing; "dpt-hybrid": the checkpoint's own). A given `feature_extractor` replaces the
    preprocessing (default: the named model's own, else the checkpoint's)."""

    def __init__(self, depth_estimator=None, feature_extractor=None, *, cache_dir=None, local_files_only=False):
        from ..depth import check_depth_estimator, check_feature_extractor
        from .depth_models import DEFAULT, DepthModelSource, resolve_depth_model
        by_name = isinstance(depth_estimator, (str, os.PathLike, DepthModelSource))
        if by_name and str(depth_estimator).strip() == DEFAULT:
            depth_estimator, by_name = None, False
        if not by_name:
            check_depth_estimator(depth_estimator)
        check_feature_extractor(feature_extractor)
        self.source = resolve_depth_model(depth_estimator, cache_dir=cache_dir,
                                          local_files_only=local_files_only) if by_name else None
        self.depth_estimator, self.feature_extractor = (None if by_name else depth_estimator), feature_extractor
        # the checkpoint's components that are not to be loaded
        self.skip = (("depth_estimator",) if depth_estimator is not None else ()) + \
            (("feature_extractor",) if feature_extractor is not None or by_name else ())

    def fill(self, components: dict, *, dtype=None, device=None, variant=None) -> dict:
        """`components` (the checkpoint's, None where skipped) with the slot's given or named models in."""
        depth_estimator, feature_extractor = self.depth_estimator, self.feature_extractor
        if self.source is not None:
            from .depth_models import load_depth_model
            depth_estimator, processor = load_depth_model(self.source, dtype=dtype, device=device, variant=variant)
            feature_extractor = feature_extractor or processor
        for name, given in (("depth_estimator", depth_estimator), ("feature_extractor", feature_extractor)):
            components[name] = given if given is not None else components[name]
        return components


def _checkpoint_components(path_or_repo_id, *, dtype, variant, revision, cache_dir, local_files_only, device,
                           skip: tuple[str, ...]) -> dict:
    """The checkpoint's own components; those named in `skip` are not loaded (None)."""
    from ..dpt_processing import DPTImageProcessor
    from ..models.autoencoder import AutoencoderKL
    from ..models.clip_text import CLIPTextModel
    from ..models.unet import UNet
    from ..schedulers import scheduler_from_config
    from ..tokenizer import CLIPTokenizer

    root = resolve_checkpoint(path_or_repo_id, variant=variant, revision=revision, cache_dir=cache_dir,
                              local_files_only=local_files_only)
    index = json.loads((root / "model_index.json").read_text())
    missing = [c for c in COMPONENT_FOLDERS if c not in index and c not in skip]
    if missing:
        raise ValueError(f"{root / 'model_index.json'} lists no {', '.join(missing)}: not a depth-to-image checkpoint")
    kw = dict(dtype=dtype, device=device, variant=variant)
    loaders = {
        "unet": lambda: UNet.from_pretrained(root / "unet", **kw),
        "vae": lambda: AutoencoderKL.from_pretrained(root / "vae", **kw),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(root / "text_encoder", **kw),
        "depth_estimator": lambda: _depth_class(root / "depth_estimator").from_pretrained(root / "depth_estimator",
                                                                                         **kw),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(root / "tokenizer"),
        "scheduler": lambda: scheduler_from_config(read_json(root / "scheduler" / "scheduler_config.json")),
        "feature_extractor": lambda: DPTImageProcessor.from_pretrained(root / "feature_extractor"),
    }
    return {name: None if name in skip else load() for name, load in loaders.items()}


def _depth_class(folder: Path):
    """DPTDepthModel, or DepthAnythingV2 for a depth_estimator/ folder of that model_type (a pipeline saved with it)."""
    from .depth_models import depth_model_class
    kind = read_json(folder / "config.json").get("model_type", "dpt")
    return depth_model_class(kind if kind == "depth_anything" else "dpt")


COMPONENT_FOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "depth_estimator", "feature_extractor", "scheduler")
MODEL_INDEX = {
    "_class_name": "StableDiffusionDepth2ImgPipeline",
    "depth_estimator": ["transformers", "DPTForDepthEstimation"],
    "feature_extractor": ["transformers", "DPTImageProcessor"],
    "scheduler": ["diffusers", None],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def save_components(components: dict, folder: str | os.PathLike) -> Path:
    """Write each component in the diffusers/transformers layout under `folder`, plus model_index.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in COMPONENT_FOLDERS:
        component = components[name]
        if name != "scheduler" and not hasattr(component, "save_pretrained"):
            raise TypeError(f"{name}: a {type(component).__name__} has no save_pretrained, so the pipeline cannot be "
                            "saved in the diffusers layout (put a DPTDepthModel / DepthAnythingV2 in the depth slot)")
        if name == "scheduler":
            component.save_config(folder / name)  # scheduler_config.json
        else:
            component.save_pretrained(folder / name)
    index = dict(MODEL_INDEX, scheduler=["diffusers", type(components["scheduler"]).__name__])
    if type(components["depth_estimator"]).__name__ == "DepthAnythingV2":  # another model in the depth slot
        index["depth_estimator"] = ["transformers", "DepthAnythingForDepthEstimation"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder
