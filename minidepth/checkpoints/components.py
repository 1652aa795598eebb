"""The seven components of a diffusers-layout checkpoint folder (or Hub repo): load them all, save them all."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .hub import resolve_checkpoint


def load_components(path_or_repo_id, *, dtype=None, variant=None, revision=None, cache_dir=None,
                    local_files_only=False, device=None) -> dict:
    """The seven components of a checkpoint folder (or Hub repo), ready for the pipeline's constructor."""
    from ..dpt_processing import DPTImageProcessor
    from ..models.autoencoder import AutoencoderKL
    from ..models.clip_text import CLIPTextModel
    from ..models.dpt import DPTDepthModel
    from ..models.unet import UNet
    from ..schedulers import scheduler_from_config
    from ..tokenizer import CLIPTokenizer

    root = resolve_checkpoint(path_or_repo_id, variant=variant, revision=revision, cache_dir=cache_dir,
                              local_files_only=local_files_only)
    index = json.loads((root / "model_index.json").read_text())
    missing = [c for c in COMPONENT_FOLDERS if c not in index]
    if missing:
        raise ValueError(f"{root / 'model_index.json'} lists no {', '.join(missing)}: not a depth-to-image checkpoint")
    kw = dict(dtype=dtype, device=device, variant=variant)
    return {
        "unet": UNet.from_pretrained(root / "unet", **kw),
        "vae": AutoencoderKL.from_pretrained(root / "vae", **kw),
        "text_encoder": CLIPTextModel.from_pretrained(root / "text_encoder", **kw),
        "depth_estimator": DPTDepthModel.from_pretrained(root / "depth_estimator", **kw),
        "tokenizer": CLIPTokenizer.from_pretrained(root / "tokenizer"),
        "scheduler": scheduler_from_config(json.loads((root / "scheduler" / "scheduler_config.json").read_text())),
        "feature_extractor": DPTImageProcessor.from_pretrained(root / "feature_extractor"),
    }


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
        if name == "scheduler":
            component.save_config(folder / name)  # scheduler_config.json
        else:
            component.save_pretrained(folder / name)
    index = dict(MODEL_INDEX, scheduler=["diffusers", type(components["scheduler"]).__name__])
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder
