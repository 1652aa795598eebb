"""The architecture as a table: per model and block, the output shape, the parameters and the GFLOP of one call.

    from minidepth.inside.tour import architecture_tour
    tour = architecture_tour(size=512)        # SD2-depth presets; architecture_tour(model_dir=...) reads a checkpoint
    architecture_tour(512, depth_model="depth-anything-v2-small")     # another model in the depth slot
    print(tour.text())                        # or tour.markdown(); `minidepth tour --size 512` prints the same

Everything runs on torch's META device: the models are built without weights (no file, no network, no memory) and
called on empty tensors of the right shapes, which propagates shapes only. FLOPs come from torch's own counter,
`torch.utils.flop_counter.FlopCounterMode`, which counts matrix multiplications and convolutions (2 FLOPs per
multiply-add; SDPA attention through its own formula, 4 * B * h * L * S * d for QK^T and PV) and nothing else
(normalisation, activations and additions are not counted). Per block: a forward pre-hook reads the counter's running
total before the block, a forward hook after it; the difference is the block's FLOPs.

The five models and how often a generation calls them (defaults: 50 steps, strength 0.8, guidance 7.5):

    model            input of one call                              calls per generation
    text encoder     token ids (1, 77)                              2 with guidance (prompt, negative prompt), else 1
    depth (DPT)      pixels (1, 3, 384, 384): the feature extractor resizes every photo to 384x384
                     (`depth_model=`: that model, at its preprocessing's size, e.g. Depth Anything V2 at 518 on the
                     side closer to 518, multiples of 14; the packaged configs for its three names, no network)
    VAE encoder      image (1, 3, H, W)                             1
    UNet             latents + depth (B, 5, H/8, W/8), text (B, 77, 1024); B = 2 with guidance (the unconditional
                     and the conditional half in one batch), else 1.  One call per scheduler timestep after the
                     strength cut: `len(scheduler.timesteps[t_start * order:])`, t_start = steps - int(steps *
                     strength); PNDM (the checkpoint's scheduler) repeats its first timestep, so 50 steps at strength
                     0.8 are 40 denoising steps but 41 UNet calls; DDIM makes 40
    VAE decoder      latents (1, 4, H/8, W/8)                       1

Rows: one per block/level (UNet: time embedding, conv_in, each down level, mid block, each up level, output
layers), in the order they run. Runs of identical rows (the 23 text-encoder layers, the 12 ViT blocks) are merged into
one row "layers.0-22 (23x)" with their summed parameters and FLOPs. A row "(unused)" holds weights stored in the
checkpoint that the forward pass never reads (the DPT's final ViT LayerNorm); "(own)" rows hold a container's direct
parameters (the DPT's CLS token and position embeddings) and FLOPs outside its listed blocks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

# The checkpoint's scheduler_config.json (stable-diffusion-2-depth), used without --model to count UNet calls.
SD2_DEPTH_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                       "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
                       "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True,
                       "steps_offset": 1, "trained_betas": None}


@dataclass
class Row:
    name: str                 # dotted module name inside the model, e.g. "down_blocks.0"
    kind: str                 # module class name
    shape: tuple | None       # output shape of one call (None: not called)
    params: int
    flops: int                # per call of the model
    order: float = float("inf")  # when it first ran (rows are listed in running order)
    count: int = 1            # > 1 for merged runs of identical blocks


@dataclass
class ModelTour:
    name: str                 # "UNet", "VAE encoder", ...
    input: str                # what one call gets, in words
    rows: list[Row]
    params: int               # = sum of the rows' parameters
    flops: int                # per call; = sum of the rows' FLOPs = FlopCounterMode's total
    calls: int                # per generation


@dataclass
class Tour:
    size: tuple[int, int]     # (height, width) of the image
    models: list[ModelTour]
    settings: dict = field(default_factory=dict)  # steps, strength, guidance, scheduler, denoising steps

    def model(self, name: str) -> ModelTour:
        return next(m for m in self.models if m.name == name)

    @property
    def generation_flops(self) -> int:
        return sum(m.flops * m.calls for m in self.models)

    def text(self) -> str:
        return _render(self, markdown=False)

    def markdown(self) -> str:
        return _render(self, markdown=True)


# ------------------------------------------------------------------------------------------------ measuring
def flop_counter():
    """torch's FLOP counter, plus the CPU flash-attention kernel that torch's table lacks (as benchmarks/ does)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_flash(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)
    extra = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        extra[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = cpu_flash
    return FlopCounterMode(display=False, custom_mapping=extra)


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        return next((t for t in map(_first_tensor, x) if t is not None), None)
    if hasattr(x, "last_hidden_state"):
        return x.last_hidden_state
    return None


def _row_modules(model: nn.Module, roots: list[str], expand: set[str]) -> list[tuple[str, nn.Module, bool]]:
    """(name, module, is_own_row) for every row: `roots` and, inside expanded containers and ModuleLists, their
    children. An expanded container with direct parameters gets an "(own)" row."""
    out = []

    def visit(name: str, module: nn.Module):
        if name in expand or isinstance(module, nn.ModuleList):
            if name in expand and not isinstance(module, nn.ModuleList):
                out.append((name, module, True))
            for child_name, child in module.named_children():
                visit(f"{name}.{child_name}", child)
        else:
            out.append((name, module, False))
    for root in roots:
        visit(root, model.get_submodule(root))
    return out


def measure(model: nn.Module, call, roots: list[str], expand: set[str]) -> tuple[list[Row], int]:
    """Run `call()` (which calls `model`'s `roots` on meta tensors) under the FLOP counter, with hooks on every row
    module. Returns the rows (merged, in running order) and the counter's total."""
    entries = _row_modules(model, roots, expand)
    stats: dict[int, dict] = {id(m): {"flops": 0, "shape": None, "order": float("inf"), "starts": []}
                              for _, m, _ in entries}
    counter = flop_counter()
    clock = [0]

    def pre(module, args):
        s = stats[id(module)]
        s["starts"].append(counter.get_total_flops())
        if s["order"] == float("inf"):
            s["order"] = clock[0]
            clock[0] += 1

    def post(module, args, output):
        s = stats[id(module)]
        s["flops"] += counter.get_total_flops() - s["starts"].pop()
        t = _first_tensor(output)
        s["shape"] = tuple(t.shape) if t is not None else s["shape"]
    handles = [h for _, m, _ in entries for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        with counter:
            call()
    finally:
        for h in handles:
            h.remove()
    total = counter.get_total_flops()

    rows = []
    for name, module, own in entries:
        s = stats[id(module)]
        if own:  # the container's direct parameters and the FLOPs outside its listed children
            inside = [stats[id(m)]["flops"] for n, m, o in entries if n.startswith(name + ".") and not o]
            params = sum(p.numel() for p in module.parameters(recurse=False))
            called = s["order"] != float("inf")  # a container the model iterates instead of calling: no own FLOPs
            rows.append(Row(f"{name} (own)", type(module).__name__, None, params,
                            s["flops"] - sum(inside) if called else 0, s["order"] + 0.5))
        else:
            rows.append(Row(name, type(module).__name__, s["shape"], sum(p.numel() for p in module.parameters()),
                            s["flops"], s["order"]))
    rows = [r for r in rows if r.params or r.flops or (r.shape is not None and not r.name.endswith("(own)"))]
    rows = [r if r.shape is not None or r.name.endswith("(own)") else
            Row(f"{r.name} (unused)", r.kind, None, r.params, r.flops, r.order) for r in rows]
    listed = sum(r.flops for r in rows)
    if total != listed:  # FLOPs outside every row (none for the SD2-depth models)
        rows.append(Row("(other)", "", None, 0, total - listed))
    rows.sort(key=lambda r: r.order)
    return _merge(rows), total


def _merge(rows: list[Row]) -> list[Row]:
    """Merge runs of identical blocks `x.0, x.1, ...` (same kind, shape, parameters, FLOPs) into one row."""
    out: list[Row] = []
    for row in rows:
        m = re.fullmatch(r"(.*)\.(\d+)", row.name)
        prev = out[-1] if out else None
        if m and prev is not None:
            pm = re.fullmatch(r"(.*)\.(\d+)(?:-(\d+))?", prev.name)
            if (pm and pm.group(1) == m.group(1) and int(pm.group(3) or pm.group(2)) + 1 == int(m.group(2))
                    and prev.kind == row.kind and prev.shape == row.shape
                    and prev.params // prev.count == row.params and prev.flops // prev.count == row.flops):
                out[-1] = Row(f"{pm.group(1)}.{pm.group(2)}-{m.group(2)}", row.kind, row.shape,
                              prev.params + row.params,
                              prev.flops + row.flops, prev.order, prev.count + 1)
                continue
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------ the five models
def _configs(model_dir: str | Path | None) -> dict:
    """Config dataclasses (presets, or a checkpoint folder's config files), the DPT input size and the scheduler."""
    from ..depth import DPTProcessorConfig
    from ..models.autoencoder import AutoencoderKLConfig
    from ..models.clip_text import CLIPTextConfig
    from ..models.dpt import DPTConfig
    from ..models.unet import UNetConfig
    if model_dir is None:
        return {"unet": UNetConfig.sd2_depth(), "vae": AutoencoderKLConfig.sd2_depth(),
                "text_encoder": CLIPTextConfig.sd2_depth(), "depth_estimator": DPTConfig.sd2_depth(),
                "processor": DPTProcessorConfig.sd2_depth(), "scheduler": SD2_DEPTH_SCHEDULER}
    from ..checkpoints import read_json
    from ..checkpoints.diffusers_format import unet_config_from_dict, vae_config_from_dict
    from ..checkpoints.transformers_format import clip_text_config_from_dict, dpt_config_from_dict
    root = Path(model_dir)
    return {"unet": unet_config_from_dict(read_json(root / "unet" / "config.json")),
            "vae": vae_config_from_dict(read_json(root / "vae" / "config.json")),
            "text_encoder": clip_text_config_from_dict(read_json(root / "text_encoder" / "config.json")),
            "depth_estimator": dpt_config_from_dict(read_json(root / "depth_estimator" / "config.json")),
            "processor": DPTProcessorConfig.from_dict(read_json(root / "feature_extractor" /
                                                                "preprocessor_config.json")),
            "scheduler": read_json(root / "scheduler" / "scheduler_config.json")}


def unet_calls(scheduler_config: dict, steps: int, strength: float) -> tuple[int, int]:
    """(denoising steps, UNet calls) of a generation: the pipeline's `get_timesteps` rule on this scheduler."""
    from ..schedulers import scheduler_from_config
    scheduler = scheduler_from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    t_start = max(steps - min(int(steps * strength), steps), 0)
    return steps - t_start, len(scheduler.timesteps[t_start * scheduler.order:])


def _depth_tour(cfg: dict, depth_model: str | None, model_dir, height: int, width: int) -> ModelTour:
    """The depth model's table: the checkpoint's DPT (or its presets), or `depth_model` of depth_models.py."""
    from ..checkpoints import build_on_meta
    from ..checkpoints.depth_models import DEFAULT, depth_model_class, depth_model_configs
    kind, config, processor = "dpt", cfg["depth_estimator"], cfg["processor"]
    if depth_model not in (None, DEFAULT):
        kind, config, processor = depth_model_configs(depth_model, checkpoint=model_dir)
    model = build_on_meta(lambda: depth_model_class(kind)(config))
    dh, dw = processor.output_size(height, width)
    expand = {"backbone", "backbone.resnet", "backbone.resnet.stages", "neck"} if kind == "dpt" else \
        {"backbone", "neck"}
    rows, total = measure(model, lambda: model(torch.empty(1, 3, dh, dw, device="meta")), ["backbone", "neck", "head"],
                          expand)
    name = "depth (DPT)" if kind == "dpt" else "depth (Depth Anything)"
    return ModelTour(name, f"pixels (1, 3, {dh}, {dw})", rows, model.num_parameters(), total, 1)


def architecture_tour(size: int | tuple[int, int] = 512, model_dir: str | Path | None = None, *, steps: int = 50,
                      strength: float = 0.8, guidance_scale: float = 7.5, depth_model: str | None = None) -> Tour:
    """The table for a `size` (side, or (height, width)) image; presets unless `model_dir` (a checkpoint folder);
    `depth_model`: a name, folder or repo id of checkpoints/depth_models.py in the depth slot (None: the DPT)."""
    from ..checkpoints import build_on_meta
    from ..models.autoencoder import AutoencoderKL
    from ..models.clip_text import CLIPTextModel
    from ..models.unet import UNet
    height, width = (size, size) if isinstance(size, int) else size
    cfg = _configs(model_dir)
    guided = guidance_scale > 1
    batch = 2 if guided else 1
    denoising, calls = unet_calls(cfg["scheduler"], steps, strength)
    meta = dict(device="meta")
    models = []

    text = build_on_meta(lambda: CLIPTextModel(cfg["text_encoder"]))
    n_tokens = text.config.max_positions
    text._check_ids = lambda ids: None  # its value-range check reads the ids, which meta tensors do not have
    rows, total = measure(text, lambda: text(torch.zeros(1, n_tokens, dtype=torch.long, **meta)),
                          ["token_embedding", "position_embedding", "layers", "final_layer_norm"], set())
    models.append(ModelTour("text encoder", f"token ids (1, {n_tokens})", rows, text.num_parameters(), total,
                            2 if guided else 1))

    models.append(_depth_tour(cfg, depth_model, model_dir, height, width))

    vae = build_on_meta(lambda: AutoencoderKL(cfg["vae"]))
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    lh, lw = -(-height // f), -(-width // f)
    rows, total = measure(vae, lambda: vae.quant_conv(vae.encoder(torch.empty(1, 3, height, width, **meta))),
                          ["encoder", "quant_conv"], {"encoder"})
    params = sum(p.numel() for m in (vae.encoder, vae.quant_conv) for p in m.parameters())
    models.append(ModelTour("VAE encoder", f"image (1, 3, {height}, {width})", rows, params, total, 1))

    unet = build_on_meta(lambda: UNet(cfg["unet"]))
    uc = unet.config
    x = torch.empty(batch, uc.in_channels, lh, lw, **meta)
    context = torch.empty(batch, n_tokens, uc.cross_attention_dim, **meta)
    rows, total = measure(unet, lambda: unet(x, torch.tensor(500, **meta), encoder_hidden_states=context),
                          ["time_embedding", "conv_in", "down_blocks", "mid_block", "up_blocks", "conv_norm_out",
                           "conv_out"], set())
    models.append(ModelTour("UNet", f"latents+depth ({batch}, {uc.in_channels}, {lh}, {lw}), text ({batch}, "
                                    f"{n_tokens}, {uc.cross_attention_dim})", rows, unet.num_parameters(), total,
                            calls))

    latent = vae.config.latent_channels
    rows, total = measure(vae, lambda: vae.decoder(vae.post_quant_conv(torch.empty(1, latent, lh, lw, **meta))),
                          ["post_quant_conv", "decoder"], {"decoder"})
    params = sum(p.numel() for m in (vae.decoder, vae.post_quant_conv) for p in m.parameters())
    models.append(ModelTour("VAE decoder", f"latents (1, {latent}, {lh}, {lw})", rows, params, total, 1))

    for m in models:
        assert sum(r.params for r in m.rows) == m.params, f"{m.name}: rows do not cover every parameter"
        assert sum(r.flops for r in m.rows) == m.flops, f"{m.name}: rows do not add up to the FLOP counter"
    source = str(model_dir or "SD2-depth presets") + (f", depth model {depth_model}" if depth_model else "")
    settings = {"steps": steps, "strength": strength, "guidance_scale": guidance_scale, "denoising_steps": denoising,
                "scheduler": cfg["scheduler"].get("_class_name"), "source": source}
    return Tour((height, width), models, settings)


# ------------------------------------------------------------------------------------------------ printing
def _gflop(flops: int) -> str:
    return f"{flops / 1e9:,.1f}"


def _table(header: list[str], rows: list[list[str]], markdown: bool, right: set[int]) -> list[str]:
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]
        return lines + ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = lambda r: "  ".join(c.rjust(w) if i in right else c.ljust(w)
                              for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]


def _render(tour: Tour, markdown: bool) -> str:
    h, w = tour.size
    s = tour.settings
    title = (f"SD2-depth architecture at {w}x{h} ({s['source']}); GFLOP counted by torch.utils.flop_counter "
             "(2 per multiply-add; matmuls, convolutions, attention)")
    lines = [f"## {title}" if markdown else title, ""]
    for m in tour.models:
        head = f"{m.name}: {m.params:,} parameters, {_gflop(m.flops)} GFLOP per call; input {m.input}"
        lines += [f"### {head}" if markdown else head, ""]
        rows = [[r.name + (f" ({r.count}x)" if r.count > 1 else ""), r.kind,
                 "-" if r.shape is None else "x".join(map(str, r.shape)), f"{r.params:,}", _gflop(r.flops),
                 f"{100 * r.flops / m.flops:.1f}%" if m.flops else "-"] for r in m.rows]
        rows.append(["total", "", "", f"{m.params:,}", _gflop(m.flops), "100.0%" if m.flops else "-"])
        lines += _table(["block", "type", "output", "parameters", "GFLOP", "share"], rows, markdown,
                        {3, 4, 5}) + [""]
    total = tour.generation_flops
    head = (f"one generation: {s['steps']} steps, strength {s['strength']}, guidance {s['guidance_scale']} "
            f"({s['scheduler']}: {s['denoising_steps']} denoising steps, {tour.model('UNet').calls} UNet calls)")
    lines += [f"### {head}" if markdown else head, ""]
    rows = [[m.name, f"{m.params:,}", _gflop(m.flops), str(m.calls), _gflop(m.flops * m.calls),
             f"{100 * m.flops * m.calls / total:.1f}%"] for m in tour.models]
    rows.append(["total", f"{sum(m.params for m in tour.models):,}", "", "", _gflop(total), "100.0%"])
    lines += _table(["model", "parameters", "GFLOP per call", "calls", "GFLOP", "share"], rows, markdown,
                    {1, 2, 3, 4, 5})
    return "\n".join(lines)
