"""Test checkpoints in the official hub layout, with random weights, built with the reference libraries.

Nothing here can download weights, so tests make their own `stable-diffusion-2-depth`-shaped checkpoints:

    build_checkpoint(folder, size="tiny" | "official", fp16_variant=False)

instantiates diffusers / transformers models from the real configs in `tests/data/sd2-depth-configs/` (official size) or
shrunken versions of them (tiny), perturbs every parameter so that no weight is a trivial 0 or 1, and saves them as the hub
does, quirks included:
  - `vae/`: the mid-block attention under the legacy names `query/key/value/proj_attn`;
  - `text_encoder/model.safetensors`: also stores `text_model.embeddings.position_ids` (int64, [1, 77]);
  - `tokenizer/`: vocab.json + merges.txt rebuilt offline from open_clip's `bpe_simple_vocab_16e6.txt.gz`, plus the two
    JSON files of the checkpoint (pad token "!"); no tokenizer.json;
  - `model_index.json`, `scheduler/scheduler_config.json`, `feature_extractor/preprocessor_config.json`;
  - optionally `<name>.fp16.safetensors` variants.

`cached_checkpoint(size)` builds once per cache directory (`MINIDEPTH_TEST_CACHE`, default: a per-session temp folder) and
reuses it; `component_folder(size, name)` is the path of one component.

Test/benchmark code only: it imports diffusers and transformers, which minidepth itself never does.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "tests" / "data" / "sd2-depth-configs"
sys.path.insert(0, str(REPO / "scripts"))

from build_clip_tokenizer import write_tokenizer_folder  # noqa: E402


def official_config(name: str) -> dict:
    """One of the checkpoint's config files, e.g. "unet_config.json" -> dict."""
    return json.loads((CONFIGS / name).read_text())


# ------------------------------------------------------------------------------------------------ configs per size
def unet_config(size: str) -> dict:
    cfg = official_config("unet_config.json")
    if size == "tiny":
        cfg.update(block_out_channels=[32, 64, 64, 64], attention_head_dim=[1, 2, 2, 2], cross_attention_dim=32,
                   layers_per_block=1, sample_size=8)
    return cfg


def vae_config(size: str) -> dict:
    cfg = official_config("vae_config.json")
    if size == "tiny":  # still four blocks, so still a factor-8 autoencoder like the real one
        cfg.update(block_out_channels=[32, 32, 64, 64], layers_per_block=1, sample_size=32)
    return cfg


def text_encoder_config(size: str) -> dict:
    cfg = official_config("text_encoder_config.json")
    if size == "tiny":
        cfg.update(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3, projection_dim=32)
    return cfg


def depth_estimator_config(size: str) -> dict:
    cfg = official_config("depth_estimator_config.json")
    cfg.pop("id2label", None)
    cfg.pop("label2id", None)
    if size == "tiny":
        cfg.update(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
                   backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 32, 32, 32], fusion_hidden_size=16,
                   backbone_featmap_shape=[1, 64, 24, 24],
                   # transformers' default init (std 0.02) makes this small net's depth constant (all zero after
                   # the final ReLU); std 0.1 gives a varying depth map (~94% positive), so parity means something
                   initializer_range=0.1)
        bb = cfg["backbone_config"]
        bb.update(embedding_size=8, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1], num_groups=8)
    return cfg


# ------------------------------------------------------------------------------------------------ building
def _perturb_(model: torch.nn.Module, seed: int) -> None:
    """Random init leaves norms at 1 and biases at 0; jitter everything so a wrong mapping cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)


def _save_safetensors(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def _fp16_copy(path: Path, variant_path: Path) -> None:
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    _save_safetensors({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, variant_path)


LEGACY_VAE_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def build_unet(folder: Path, size: str, seed: int = 1) -> None:
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    model = UNet2DConditionModel.from_config(unet_config(size))
    _perturb_(model, seed)
    model.save_pretrained(folder, safe_serialization=True)


def build_vae(folder: Path, size: str, seed: int = 2) -> None:
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file
    torch.manual_seed(seed)
    model = AutoencoderKL.from_config(vae_config(size))
    _perturb_(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    # The hub file predates diffusers' attention refactor: rename the mid-block attention to the legacy names.
    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    renamed = {}
    for name, t in tensors.items():
        for new, old in LEGACY_VAE_ATTENTION.items():
            marker = f"mid_block.attentions.0.{new}."
            if marker in name:
                name = name.replace(marker, f"mid_block.attentions.0.{old}.")
        renamed[name] = t
    _save_safetensors(renamed, path)


def build_text_encoder(folder: Path, size: str, seed: int = 3) -> None:
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(**text_encoder_config(size)))
    _perturb_(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    path = folder / "model.safetensors"
    # transformers 5 saves CLIPTextModel without the `text_model.` prefix; the hub file has it on every tensor.
    tensors = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in load_file(str(path)).items()}
    n = text_encoder_config(size)["max_position_embeddings"]
    tensors["text_model.embeddings.position_ids"] = torch.arange(n, dtype=torch.int64)[None]  # stored on the hub
    _save_safetensors(tensors, path)


def build_depth_estimator(folder: Path, size: str, seed: int = 4) -> None:
    from transformers import DPTConfig, DPTForDepthEstimation
    torch.manual_seed(seed)
    model = DPTForDepthEstimation(DPTConfig(**depth_estimator_config(size)))
    _perturb_(model, seed)
    model.save_pretrained(folder, safe_serialization=True)


WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors", "depth_estimator": "model.safetensors"}
BUILDERS = {"unet": build_unet, "vae": build_vae, "text_encoder": build_text_encoder,
            "depth_estimator": build_depth_estimator}


def build_checkpoint(folder: str | Path, size: str = "tiny", fp16_variant: bool = False,
                     components: tuple[str, ...] = tuple(BUILDERS)) -> Path:
    """Write a complete random-weight `stable-diffusion-2-depth` checkpoint folder (see the module docstring)."""
    if size not in ("tiny", "official"):
        raise ValueError(f"size must be 'tiny' or 'official', got {size!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(CONFIGS / "model_index.json", folder / "model_index.json")
    for sub, files in {"scheduler": {"scheduler_config.json": "scheduler_config.json"},
                       "feature_extractor": {"preprocessor_config.json": "feature_extractor_preprocessor_config.json"}
                       }.items():
        (folder / sub).mkdir(exist_ok=True)
        for dst, src in files.items():
            shutil.copy(CONFIGS / src, folder / sub / dst)
    write_tokenizer_folder(folder / "tokenizer",
                           special_tokens_map=CONFIGS / "tokenizer_special_tokens_map.json",
                           tokenizer_config=CONFIGS / "tokenizer_tokenizer_config.json")
    for name in components:
        BUILDERS[name](folder / name, size)
        if fp16_variant:
            weights = folder / name / WEIGHT_FILES[name]
            _fp16_copy(weights, weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    return folder


# ------------------------------------------------------------------------------------------------ caching
_SESSION_DIR: Path | None = None


def cache_root() -> Path:
    global _SESSION_DIR
    env = os.environ.get("MINIDEPTH_TEST_CACHE")
    if env:
        return Path(env)
    if _SESSION_DIR is None:
        _SESSION_DIR = Path(tempfile.mkdtemp(prefix="minidepth-test-"))
    return _SESSION_DIR


def cached_checkpoint(size: str = "tiny", components: tuple[str, ...] = tuple(BUILDERS),
                      fp16_variant: bool | None = None) -> Path:
    """A checkpoint folder with (at least) `components`, built on first use. Official size always gets fp16 variants
    of what it builds; tiny gets them too (they are cheap)."""
    folder = cache_root() / f"sd2-depth-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".sd2-depth-{size}.lock", "w") as lock:  # several test processes may share the cache
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = folder / ".built"
        built = set(done.read_text().split()) if done.exists() else set()
        todo = tuple(c for c in components if c not in built)
        if todo or not (folder / "model_index.json").exists():
            build_checkpoint(folder, size, fp16_variant=True if fp16_variant is None else fp16_variant,
                             components=todo)
            done.write_text(" ".join(sorted(built | set(todo))))
    return folder


def component_folder(size: str, name: str) -> Path:
    if name in BUILDERS:
        return cached_checkpoint(size, (name,)) / name
    return cached_checkpoint(size, ()) / name




def pipeline_pair(folder):
    """minidepth's and diffusers' pipelines on the same checkpoint folder, progress bars off, minidepth in exact mode
    (diffusers' kernels: bit-identical images; the fast kernels have their own tests) - for parity tests. Both stay in
    memory: for the tiny checkpoint; official-size tests load one pipeline at a time (~5.5 GB each in float32)."""
    from diffusers import StableDiffusionDepth2ImgPipeline as Reference

    from minidepth import StableDiffusionDepth2ImgPipeline
    pair = StableDiffusionDepth2ImgPipeline.from_pretrained(folder), Reference.from_pretrained(folder)
    for pipe in pair:
        pipe.set_progress_bar_config(disable=True)
    pair[0].set_exact(True)
    return pair
