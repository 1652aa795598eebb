"""The whole original single file (`512-depth-ema.safetensors` / `.ckpt`): load all four networks from it, check it,
and convert it to and from the diffusers folder layout.

What the file holds (1,610 tensors; `ldm_format.py` has the per-network key maps):

    model.diffusion_model.*    686  the UNet                                   -> unet
    first_stage_model.*        248  the VAE                                    -> vae
    cond_stage_model.model.*   294  the OpenCLIP ViT-H text tower              -> text_encoder (23 of its 24 blocks)
    depth_model.model.*        368  MiDaS DPT-Hybrid                           -> depth_estimator
    (no prefix)                 14  DDPM schedule buffers, EMA counters        -> not used

Everything else a pipeline needs (the four configs, the PNDM scheduler config, the DPT feature extractor config and
the CLIP vocabulary) is packaged with minidepth under `minidepth/data/sd2-depth/`, laid out like a diffusers folder
without weights, so loading works offline. `config=` points at another such folder (e.g. a diffusers checkpoint of
another size; only its JSON and tokenizer files are read).

The file is opened once and checked as a whole before any network is built: every tensor must be used by one of the
networks or be one of the KNOWN EXTRAS below (each checked for its shape, none required):

    betas, alphas_cumprod, ... (12)             [T]  LDM's DDPM schedule, T = num_train_timesteps; the scheduler config
                                                     is what sampling uses (a warning if `betas` disagrees with it)
    model_ema.decay, model_ema.num_updates      []   LitEma counters
    model_ema.<name without dots>                    EMA shadow copies of UNet weights (only in non-pruned .ckpt
                                                     files), same shape as the UNet weight they shadow
    cond_stage_model.model.transformer.resblocks.<L>.*   OpenCLIP's last block: SD2 reads the penultimate layer
    cond_stage_model.model.text_projection      [D, P]  OpenCLIP's contrastive head, not part of the text encoder
    cond_stage_model.model.logit_scale          []
    depth_model.model.pretrained.model.head.*   [N, 768], [N]  timm's ImageNet classifier of the ViT, unused by MiDaS

A file that is not SD2-depth (SD 1.x, SD 2.x text-to-image such as 2.1-v, an inpainting model, SDXL, a lone MiDaS
file) is refused with a sentence saying what it looks like.

Writing a single file from a diffusers folder (`save_single_file`) writes the four networks under the original names
and the 12 DDPM buffers computed from the scheduler config exactly as LDM's `register_schedule` does. It cannot
reproduce what a diffusers folder does not hold: OpenCLIP's 24th block, `text_projection`, `logit_scale`, the MiDaS
classifier head and the EMA counters are omitted. The LDM code and AUTOMATIC1111 load single files with
`strict=False` and stop OpenCLIP one block before the end (`layer="penultimate"`), so none of them is needed there.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from .loader import CheckpointError, TensorFile, build_on_meta, export_state_dict, read_json

PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "data" / "sd2-depth"
NETWORKS = ("unet", "vae", "text_encoder", "depth_estimator")
DDPM_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2")
UNET_PREFIX, DEPTH_PREFIX = "model.diffusion_model.", "depth_model.model."
OPENCLIP_PREFIX = "cond_stage_model.model."


def network_classes() -> dict[str, type]:
    from ..models.autoencoder import AutoencoderKL
    from ..models.clip_text import CLIPTextModel
    from ..models.dpt import DPTDepthModel
    from ..models.unet import UNet
    return {"unet": UNet, "vae": AutoencoderKL, "text_encoder": CLIPTextModel, "depth_estimator": DPTDepthModel}


def network_configs(config_folder: str | os.PathLike | None = None) -> dict:
    """Our config dataclass per network, from `<folder>/<network>/config.json` (default: the packaged ones)."""
    from .pretrained import folder_format
    folder = Path(config_folder) if config_folder is not None else PACKAGED_CONFIGS
    return {name: folder_format(cls).config_from_dict(read_json(folder / name / "config.json"))
            for name, cls in network_classes().items()}


def ldm_keymaps(configs: dict) -> dict:
    """The original single file's key map per network, for these configs."""
    from .pretrained import single_file_layouts
    return {name: single_file_layouts(cls)[0].keymap(configs[name]) for name, cls in network_classes().items()}


# ------------------------------------------------------------------------------------------------ what a file is
def describe(file: TensorFile) -> str:
    """One phrase saying what kind of checkpoint `file` looks like (used in errors)."""
    names = list(file)
    has = lambda prefix: any(n.startswith(prefix) for n in names)
    if has("conditioner.embedders."):
        return "a Stable Diffusion XL checkpoint (conditioner.embedders.*)"
    if not has(UNET_PREFIX):
        if has("pretrained.model.") and has("scratch."):
            return ("MiDaS' own depth model file (pretrained.model.*, scratch.*); load it with "
                    "DPTDepthModel.from_single_file")
        if any(n.startswith(("down_blocks.", "unet.", "text_model.", "dpt.")) for n in names):
            return "a state dict in diffusers/transformers names, not an original single file"
        return f"not an LDM checkpoint (no {UNET_PREFIX}* tensors)"
    conv_in = UNET_PREFIX + "input_blocks.0.0.weight"
    channels = file.shape(conv_in)[1] if conv_in in file and len(file.shape(conv_in)) == 4 else None
    if has("cond_stage_model.transformer."):
        family = "Stable Diffusion 1.x"
        text = "CLIP ViT-L under cond_stage_model.transformer.*"
    elif has(OPENCLIP_PREFIX):
        family = "Stable Diffusion 2.x"
        text = "OpenCLIP under cond_stage_model.model.*"
    else:
        family, text = "Stable Diffusion", "no text encoder tensors"
    kind = {4: "text-to-image (e.g. 2.0/2.1 base or 768-v)" if family.endswith("2.x") else "text-to-image",
            9: "inpainting", 5: "depth-to-image", 8: "instruct-pix2pix"}.get(channels, "unknown")
    depth = "depth_model.* present" if has(DEPTH_PREFIX) else "no depth_model.*"
    return (f"a {family} {kind} model (UNet conv_in takes {channels} input channels; {text}; {depth})")


def check_is_sd2_depth(file: TensorFile, configs: dict) -> None:
    """Refuse a file that is some other kind of model, saying what it looks like."""
    in_ch = configs["unet"].in_channels
    conv_in = UNET_PREFIX + "input_blocks.0.0.weight"
    ok = (conv_in in file and len(file.shape(conv_in)) == 4 and file.shape(conv_in)[1] == in_ch
          and any(n.startswith(OPENCLIP_PREFIX) for n in file) and any(n.startswith(DEPTH_PREFIX) for n in file)
          and not any(n.startswith("conditioner.embedders.") for n in file))
    if not ok:
        raise CheckpointError(f"{file.path} is not a Stable Diffusion 2 depth checkpoint: it looks like "
                              f"{describe(file)}. SD2-depth has a {in_ch}-channel UNet conv_in (4 latent + 1 depth), "
                              f"an OpenCLIP text encoder ({OPENCLIP_PREFIX}*) and MiDaS ({DEPTH_PREFIX}*).")


# ------------------------------------------------------------------------------------------------ the known extras
def known_extras(file: TensorFile, configs: dict, num_train_timesteps: int) -> dict[str, tuple[int, ...] | None]:
    """The expected shape of every known extra in `file` (None: a shadow whose shape is checked by name)."""
    text = configs["text_encoder"]
    d, f, last = text.width, text.mlp_width, text.num_layers
    block = f"{OPENCLIP_PREFIX}transformer.resblocks.{last}."
    shapes = {name: (num_train_timesteps,) for name in DDPM_BUFFERS}
    shapes.update({"model_ema.decay": (), "model_ema.num_updates": (), OPENCLIP_PREFIX + "logit_scale": ()})
    shapes.update({block + "attn.in_proj_weight": (3 * d, d), block + "attn.in_proj_bias": (3 * d,),
                   block + "attn.out_proj.weight": (d, d), block + "attn.out_proj.bias": (d,),
                   block + "ln_1.weight": (d,), block + "ln_1.bias": (d,), block + "ln_2.weight": (d,),
                   block + "ln_2.bias": (d,), block + "mlp.c_fc.weight": (f, d), block + "mlp.c_fc.bias": (f,),
                   block + "mlp.c_proj.weight": (d, f), block + "mlp.c_proj.bias": (d,)})
    head = DEPTH_PREFIX + "pretrained.model.head."
    width = configs["depth_estimator"].hidden_size
    if head + "bias" in file and len(file.shape(head + "bias")) == 1:
        shapes.update({head + "weight": (file.shape(head + "bias")[0], width)})
        shapes[head + "bias"] = file.shape(head + "bias")
    if OPENCLIP_PREFIX + "text_projection" in file:
        proj = file.shape(OPENCLIP_PREFIX + "text_projection")
        shapes[OPENCLIP_PREFIX + "text_projection"] = (d, proj[1] if len(proj) == 2 else -1)
    return shapes


def _ema_shadows(file: TensorFile) -> dict[str, str]:
    """LitEma's shadow names (`model_ema.` + the DiffusionWrapper parameter name without dots) -> the UNet tensor."""
    return {"model_ema." + name[len("model."):].replace(".", ""): name
            for name in file if name.startswith(UNET_PREFIX)}


def check_whole_file(file: TensorFile, configs: dict, num_train_timesteps: int = 1000) -> None:
    """Every tensor of `file` is used by a network or is a known extra of the right shape; no network tensor is
    missing. One CheckpointError names every problem."""
    keymaps, used = ldm_keymaps(configs), set()
    for name, cls in network_classes().items():
        model = build_on_meta(lambda cls=cls, name=name: cls(configs[name]))
        for param in model.state_dict():
            used.update(keymaps[name].rule_for(param)[1])
    extras, shadows = known_extras(file, configs, num_train_timesteps), _ema_shadows(file)
    missing = sorted(used.difference(file))
    unknown, bad_shape = [], []
    for name in file:
        if name in used:
            continue
        expected = extras.get(name)
        if expected is None and name in shadows:
            expected = file.shape(shadows[name])
        if expected is None:
            unknown.append(name)
        elif file.shape(name) != expected:
            bad_shape.append(f"{name}: {list(file.shape(name))}, expected {list(expected)} (a known extra)")
    if missing or unknown or bad_shape:
        parts = [f"{file.path} does not match the SD2-depth single-file layout:"]
        for title, items in (("missing tensors", missing), ("unknown tensors", unknown),
                             ("shape mismatches", bad_shape)):
            if items:
                shown = "\n    ".join(items[:8]) + (f"\n    ... and {len(items) - 8} more" if len(items) > 8 else "")
                parts.append(f"  {len(items)} {title}:\n    {shown}")
        raise CheckpointError("\n".join(parts))


# ------------------------------------------------------------------------------------------------ the DDPM buffers
def ddpm_buffers(scheduler_config: dict) -> dict[str, torch.Tensor]:
    """The 12 schedule buffers LDM's `DDPM.register_schedule` stores (float64 maths, saved as float32)."""
    n = scheduler_config.get("num_train_timesteps", 1000)
    start, end = scheduler_config.get("beta_start", 0.00085), scheduler_config.get("beta_end", 0.012)
    schedule = scheduler_config.get("beta_schedule", "scaled_linear")
    if scheduler_config.get("trained_betas") is not None:
        betas = torch.tensor(scheduler_config["trained_betas"], dtype=torch.float64)
    elif schedule == "scaled_linear":  # LDM calls this one "linear"
        betas = torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float64) ** 2
    elif schedule == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float64)
    else:
        raise ValueError(f"cannot write LDM schedule buffers for beta_schedule={schedule!r}")
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)  # v_posterior = 0
    values = {"betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
              "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
              "log_one_minus_alphas_cumprod": (1.0 - ac).log(), "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
              "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(), "posterior_variance": posterior_variance,
              "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
              "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
              "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac)}
    return {name: values[name].to(torch.float32) for name in DDPM_BUFFERS}


def _warn_if_schedule_differs(file: TensorFile, scheduler_config: dict) -> None:
    if "betas" not in file:
        return
    expected = ddpm_buffers(scheduler_config)["betas"]
    if not torch.allclose(file["betas"].float(), expected, rtol=1e-5, atol=1e-8):
        warnings.warn(f"{file.path}: its DDPM `betas` differ from the scheduler config "
                      f"({scheduler_config.get('beta_schedule')}, {scheduler_config.get('beta_start')}.."
                      f"{scheduler_config.get('beta_end')}); sampling uses the scheduler config", stacklevel=3)


# ------------------------------------------------------------------------------------------------ loading
def load_single_file(path: str | os.PathLike, config: str | os.PathLike | None = None, *,
                     dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                     depth_estimator=None, feature_extractor=None) -> dict:
    """The seven pipeline components from one original single file (see the module docstring).
    `depth_estimator` / `feature_extractor` fill the depth slot instead of the file's DPT-Hybrid (components.DepthSlot):
    the file is still checked whole, but its depth_model.* tensors are then not loaded."""
    from ..dpt_processing import DPTImageProcessor
    from ..schedulers import scheduler_from_config
    from ..tokenizer import CLIPTokenizer
    from .components import DepthSlot
    slot = DepthSlot(depth_estimator, feature_extractor)  # checked before the file is read
    folder = Path(config) if config is not None else PACKAGED_CONFIGS
    file = TensorFile(path)  # opened once; safetensors are memory-mapped, pickles read with weights_only=True
    configs = network_configs(folder)
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
    check_is_sd2_depth(file, configs)
    check_whole_file(file, configs, scheduler_config.get("num_train_timesteps", 1000))
    _warn_if_schedule_differs(file, scheduler_config)
    components = {name: None if name in slot.skip else cls.from_single_file(file, configs[name], dtype=dtype,
                                                                             device=device)
                  for name, cls in network_classes().items()}
    components["tokenizer"] = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    components["scheduler"] = scheduler_from_config(scheduler_config)
    components["feature_extractor"] = None if "feature_extractor" in slot.skip else \
        DPTImageProcessor.from_pretrained(folder / "feature_extractor")
    return slot.fill(components, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------------ writing
def single_file_state_dict(components: dict, scheduler_config: dict) -> dict[str, torch.Tensor]:
    """The four networks under the original names, plus the DDPM buffers (see the module docstring for what is not
    reproducible)."""
    configs = {name: components[name].config for name in NETWORKS}
    keymaps = ldm_keymaps(configs)
    out: dict[str, torch.Tensor] = {}
    for name in NETWORKS:
        out.update(export_state_dict(components[name], keymaps[name]))
    out.update(ddpm_buffers(scheduler_config))
    return out


def write_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """`.safetensors`, or a `.ckpt` pickle in LDM's {"state_dict": ...} layout."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(tensors, str(path), metadata={"format": "pt"})
    elif path.suffix in (".ckpt", ".pt", ".pth"):
        torch.save({"state_dict": tensors}, path)
    else:
        raise ValueError(f"{path}: write a .safetensors (preferred) or .ckpt file")
    return path


def _half(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}


# ------------------------------------------------------------------------------------------------ converting
def is_single_file(path: str | os.PathLike) -> bool:
    return Path(path).is_file()


def folder_to_single_file(folder: str | os.PathLike, target: str | os.PathLike, *, fp16: bool = False) -> Path:
    """A diffusers folder (e.g. a fine-tuned model) -> one single file in the original names."""
    from .components import load_components
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{folder}: not a diffusers checkpoint folder (no model_index.json)")
    components = load_components(folder, local_files_only=True)
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    tensors = single_file_state_dict(components, scheduler_config)
    return write_tensors(_half(tensors) if fp16 else tensors, target)


def single_file_to_folder(path: str | os.PathLike, target: str | os.PathLike, *, fp16: bool = False,
                          config: str | os.PathLike | None = None) -> Path:
    """An original single file -> a diffusers folder (diffusers' `from_pretrained` reads it). With `fp16`, the
    `<weights>.fp16.safetensors` variant files are written next to the float32 files, as on the Hub."""
    from .components import save_components
    from .pretrained import folder_format
    components = load_single_file(path, config)
    target = save_components(components, target)
    if fp16:
        for name in NETWORKS:
            fmt = folder_format(type(components[name]))
            weights = target / name / fmt.save_name
            variant = weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors"))
            write_tensors(_half(dict(TensorFile(weights))), variant)
    return target


def convert(source: str | os.PathLike, target: str | os.PathLike, *, fp16: bool = False,
            config: str | os.PathLike | None = None) -> Path:
    """The direction follows from `source`: a file -> a diffusers folder, a folder -> a single file."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"no such file or folder: {source}")
    if source.is_dir():
        if Path(target).suffix not in (".safetensors", ".ckpt"):
            raise ValueError(f"{target}: a folder converts to a single file; name it *.safetensors or *.ckpt")
        return folder_to_single_file(source, target, fp16=fp16)
    if Path(target).exists() and any(Path(target).iterdir() if Path(target).is_dir() else [True]):
        raise FileExistsError(f"{target} exists and is not an empty folder; choose a new output folder")
    return single_file_to_folder(source, target, fp16=fp16, config=config)
