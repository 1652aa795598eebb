"""The `minidepth` command's checkpoints: `--model` to a local folder, the checkpoint's limits read from its configs
(no model loaded), the fp16-only folders of `download --variant fp16`, and plain-words Hub errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .args import DEFAULT_DEPTH_MODEL, DEFAULT_MODEL, CLIError


# ------------------------------------------------------------------------------------------------ checkpoints
def _looks_like_path(name: str) -> bool:
    return (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") != 1
            or Path(name).expanduser().parent.is_dir())


def hub_error(repo_id: str, error: BaseException, downloading: bool = False) -> str:
    """Why the Hub did not deliver `repo_id`, in one sentence with what to do."""
    from huggingface_hub import constants
    folder = f"weights/{repo_id.split('/')[-1]}"
    local = (f"or use a checkpoint folder: --model {folder} (made with `minidepth download --model {repo_id} "
             f"--dir {folder}` where the Hub is reachable)")
    if downloading:
        local = (f"or run `minidepth download --model {repo_id} --dir {folder}` where the Hub is reachable, copy "
                 f"{folder} here and pass it as --model")
    if constants.HF_HUB_OFFLINE:
        return (f"{repo_id} is not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 turns downloading off; "
                f"unset HF_HUB_OFFLINE to download it, {local}")
    chain, e = [], error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    names = " ".join(f"{type(x).__name__} {x}" for x in chain)
    if re.search(r"LocalEntryNotFound|Connect|Timeout|Name or service|resolve host|Network|Proxy", names):
        reason = str(chain[-1]).strip().splitlines()[0] if str(chain[-1]).strip() else type(chain[-1]).__name__
        reason = re.sub(r"^Got: \w+: ", "", reason)
        return (f"could not reach the Hugging Face Hub ({constants.ENDPOINT}) to fetch {repo_id} ({reason}); check "
                f"the network connection or the proxy (HTTPS_PROXY; HF_ENDPOINT for a mirror), {local}")
    if any(type(x).__name__ in ("RepositoryNotFoundError", "GatedRepoError") for x in chain):
        return (f"{repo_id} was not found on the Hugging Face Hub or is not accessible (a typo? private and gated "
                f"repos need `hf auth login`); {local}")
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"could not fetch {repo_id} from the Hugging Face Hub ({type(error).__name__}: {reason}); {local}"


def resolve_model(model: str, *, variant: str | None = None, revision: str | None = None) -> Path:
    """--model -> a local checkpoint folder (downloading a Hub repo id when it is not cached yet)."""
    folder = Path(model).expanduser()
    fetch = f"minidepth download --model {DEFAULT_MODEL} --dir {model}"
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise CLIError(f"--model: {model} is not a checkpoint folder (no model_index.json); "
                           f"fetch one with: {fetch}")
        return folder
    if _looks_like_path(model):
        raise CLIError(f"--model: checkpoint folder {model} not found; fetch one with: {fetch}")
    from ..checkpoints.hub import resolve_checkpoint
    try:
        return resolve_checkpoint(model, variant=variant, revision=revision)
    except Exception as e:  # not cached and offline, no connection, unknown repo, gated model, ...
        raise CLIError(f"--model: {hub_error(model, e)}") from e


def resolve_depth_model(name: str | None, root: Path | None, option: str = "--depth-model"):
    """--depth-model -> None for the checkpoint's own DPT, else a checked `depth_models.DepthModelSource` (config
    files read, a Hub repo's fetched; no weights): CLIError before any model loads."""
    if name is None or name == DEFAULT_DEPTH_MODEL:  # before any import: the checks before it need no torch
        return None
    from ..checkpoints.depth_models import HUB_REPOS, resolve_depth_model as resolve
    try:
        return resolve(name, checkpoint=root)
    except ValueError as e:
        raise CLIError(f"{option}: {e}", code=2) from e
    except Exception as e:  # not cached and offline, no connection, unknown repo, ...
        raise CLIError(f"{option}: {hub_error(HUB_REPOS.get(name, name), e)}") from e


def checkpoint_limits(root: Path) -> tuple[int, int]:
    """(num_train_timesteps, CLIP layers) from the checkpoint's configs, without loading a model."""
    def read(rel, key, default):
        try:
            return int(json.loads((root / rel).read_text()).get(key, default))
        except (OSError, ValueError, TypeError, AttributeError):
            return default
    return read("scheduler/scheduler_config.json", "num_train_timesteps", 1000), \
        read("text_encoder/config.json", "num_hidden_layers", 23)


def detect_variant(folder: Path, component: str, variant: str | None) -> str | None:
    """A folder made by `minidepth download --variant fp16` has only *.fp16.* weight files: use them."""
    if variant is not None:
        return variant
    files = [p.name for p in (folder / component).glob("*") if p.suffix in (".safetensors", ".bin")]
    plain = [n for n in files if n.count(".") == 1]
    return "fp16" if not plain and any(".fp16." in n for n in files) else None
