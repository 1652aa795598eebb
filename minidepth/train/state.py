"""Everything a training run writes, each file atomically (a temporary name in the same folder, then os.replace, so
a killed process leaves the old file or the new one, never half of one):

    OUT.safetensors                 the LoRA: diffusers' format (unet.<layer>.lora_A/lora_B.weight, alphas in the
                                    "lora_adapter_metadata") or kohya's (lora_unet_<layer>.lora_down/lora_up/alpha)
    CHECKPOINTS/step-000100/        state.json (settings, step, data position), training_state.pt (LoRA, AdamW,
                                    learning-rate schedule, grad scaler, random states, the loss history), and
                                    pytorch_lora_weights.safetensors (the LoRA so far, loadable as it is); the
                                    folder is written as .step-000100.part and renamed when complete
    LOG.csv                         step, loss, lr, seconds (rewritten whole after every step)
    OUT-loss.png                    the loss curve, drawn with PIL
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

from .config import RESULT_FIELDS, TrainConfig, TrainError

STATE_JSON, STATE_PT, LORA_FILE = "state.json", "training_state.pt", "pytorch_lora_weights.safetensors"


# ------------------------------------------------------------------------------------------------ atomic files
def write_atomic(path: Path, write) -> None:
    """`write(binary file)` into a temporary file beside `path`, fsync, rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_log(path: Path, history: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["step", "loss", "lr", "seconds"])
    for h in history:
        writer.writerow([h["step"], f"{h['loss']:.8g}", f"{h['lr']:.8g}", f"{h['seconds']:.4f}"])
    write_atomic(path, lambda f: f.write(text.getvalue().encode()))


# ------------------------------------------------------------------------------------------------ the LoRA file
def lora_tensors(unet, text_encoder, fmt: str) -> tuple[dict, dict]:
    """(tensors, safetensors metadata) of the trained adapter in diffusers' or kohya's format."""
    import torch

    from ..adapters import lora
    from ..adapters.formats import METADATA_KEY, LayerNames
    from ..adapters.pipeline import _lora_config
    from .objective import ADAPTER
    names = LayerNames(unet, text_encoder)
    tensors, config = {}, {}
    for component, model in (("unet", unet), ("text_encoder", text_encoder)):
        layers = {names.to_file[component][ours]: layer.lora[ADAPTER] for ours, layer in lora.lora_layers(model)
                  if ADAPTER in layer.lora}
        for path, adapter in layers.items():
            down, up = adapter.down.detach().float().cpu().contiguous(), adapter.up.detach().float().cpu().contiguous()
            if fmt == "kohya":
                key = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[component] + path.replace(".", "_")
                tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                                f"{key}.alpha": torch.tensor(adapter.alpha, dtype=torch.float32)})
            else:
                tensors.update({f"{component}.{path}.lora_A.weight": down, f"{component}.{path}.lora_B.weight": up})
        if layers and fmt != "kohya":
            cfg = _lora_config({p.removeprefix("text_model."): a for p, a in layers.items()})
            config.update({f"{component}.{k}": v for k, v in cfg.items()})
    metadata = {"format": "pt"}
    if config:
        metadata[METADATA_KEY] = json.dumps(config, sort_keys=True)
    return tensors, metadata


def write_lora(path: Path, unet, text_encoder, fmt: str) -> None:
    from safetensors.torch import save
    tensors, metadata = lora_tensors(unet, text_encoder, fmt)
    write_atomic(path, lambda f: f.write(save(tensors, metadata=metadata)))


# ------------------------------------------------------------------------------------------------ checkpoints
def step_folder(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def find_checkpoint(path) -> Path:
    """A step folder, or a checkpoints folder (its latest complete step; unfinished `.part` folders are ignored)."""
    path = Path(path)
    if (path / STATE_JSON).is_file() and (path / STATE_PT).is_file():
        return path
    steps = sorted(p for p in path.glob("step-*") if (p / STATE_JSON).is_file() and (p / STATE_PT).is_file()) \
        if path.is_dir() else []
    if not steps:
        raise TrainError(f"--resume {path}: no checkpoint there (a step-NNNNNN folder with {STATE_JSON} and "
                         f"{STATE_PT}, or a folder holding them)")
    return steps[-1]


def run_settings(config: TrainConfig, model_name: str, data_fingerprint: str | None, prediction_type=None) -> dict:
    from ..checkpoints.depth_models import depth_model_key
    return {**config.result_settings(), "model": model_name, "data": data_fingerprint,
            "prediction_type": prediction_type, "depth_model": depth_model_key(config.depth_model)}


def check_resume(config: TrainConfig, settings: dict | None = None) -> dict:
    """Read the checkpoint's state.json; every result-changing setting must equal this run's (TrainError listing
    the differences). `settings`: this run's `run_settings` (None: only the options are compared). Returns it."""
    folder = find_checkpoint(config.resume)
    try:
        saved = json.loads((folder / STATE_JSON).read_text())
    except (OSError, ValueError) as e:
        raise TrainError(f"--resume {folder}: unreadable {STATE_JSON} ({e})") from e
    mine = settings or config.result_settings()
    keys = RESULT_FIELDS if settings is None else list(settings)
    diffs = [f"{k}: checkpoint {saved['settings'].get(k)!r}, now {mine[k]!r}" for k in keys
             if {"depth_model": "dpt-hybrid", **saved["settings"]}.get(k) != mine[k]]  # (runs from before the slot)
    if diffs:
        raise TrainError(f"--resume {folder} is from a run with other settings; resume with the same ones "
                         f"({'; '.join(diffs)})")
    return saved


def save_checkpoint(root: Path, step: int, settings: dict, samples_seen: int, payload: dict, unet, text_encoder):
    """Write CHECKPOINTS/step-NNNNNN atomically: built as a hidden .part folder, renamed when complete."""
    import torch
    final = step_folder(root, step)
    tmp = Path(root) / f".{final.name}.part"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with open(tmp / STATE_PT, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        write_lora(tmp / LORA_FILE, unet, text_encoder, "diffusers")
        info = {"step": step, "samples_seen": samples_seen, "settings": settings}
        (tmp / STATE_JSON).write_text(json.dumps(info, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_checkpoint(folder: Path) -> dict:
    import torch
    return torch.load(Path(folder) / STATE_PT, map_location="cpu", weights_only=True)


def rng_states() -> dict:
    """torch's, CUDA's, numpy's and Python's global generators (training itself draws from per-sample generators)."""
    import random

    import numpy as np
    import torch
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "python": [version, list(state), gauss_next],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    import random

    import numpy as np
    import torch
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, state, gauss_next = states["python"]
    random.setstate((version, tuple(state), gauss_next))
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ------------------------------------------------------------------------------------------------ the loss curve
def plot_losses(path: Path, history: list[dict], title: str = "training loss") -> None:
    """A PNG of the loss per step (grey) and its moving average (blue), with labelled axes. PIL only."""
    from PIL import Image, ImageDraw, ImageFont
    width, height, left, right, top, bottom = 800, 450, 70, 20, 40, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    lo, hi = (min(losses), max(losses)) if losses else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    s0, s1 = (steps[0], steps[-1]) if steps else (0, 1)
    s1 = s1 if s1 > s0 else s0 + 1

    def xy(step, loss):
        return (left + (step - s0) / (s1 - s0) * (width - left - right),
                top + (hi - loss) / (hi - lo) * (height - top - bottom))

    for i in range(5):  # horizontal grid with the loss values
        value = lo + (hi - lo) * i / 4
        y = xy(s0, value)[1]
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        draw.text((left - 6, y), f"{value:.4g}", fill="black", font=font, anchor="rm")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for step in (s0, (s0 + s1) // 2, s1):
        draw.text((xy(step, lo)[0], height - bottom + 8), str(step), fill="black", font=font, anchor="mt")
    draw.text((width / 2, height - 18), "step", fill="black", font=font, anchor="mm")
    draw.text((width / 2, 18), f"{title}: grey per step, blue mean of {window}", fill="black", font=font,
              anchor="mm")
    if len(history) > 1:
        draw.line([xy(s, v) for s, v in zip(steps, losses)], fill=(170, 170, 170), width=1)
        draw.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(30, 90, 200), width=2)
    elif history:
        x, y = xy(steps[0], losses[0])
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(30, 90, 200))
    write_atomic(path, lambda f: image.save(f, format="PNG"))
