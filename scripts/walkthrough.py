"""Generate docs/walkthrough.md: one 512x512 generation through minidepth, with shapes measured from the code.

    python scripts/walkthrough.py            # print the document
    python scripts/walkthrough.py --write    # rewrite docs/walkthrough.md
    python scripts/walkthrough.py --check    # exit 1 with a diff when docs/walkthrough.md is out of date

Every network is built at the official SD2-depth size on the meta device (no weights, no memory, no values) and the
pipeline's own methods run on meta tensors of the real sizes; forward hooks record the shapes and, from the call stack,
the line that made each call. Only small things run on real numbers: the tokenizer, the scheduler's timestep table,
the depth normalisation (fed a stand-in map of the DPT's output shape, since meta tensors have no min or max) and the
random draws (drawn on the CPU, as a CPU generator always does). Links are computed, never typed.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import inspect
import json
import sys
import tempfile
import types
from pathlib import Path
from unittest import mock

import PIL.Image
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "minidepth"
DOC = REPO / "docs" / "walkthrough.md"
CONFIGS = REPO / "tests" / "data" / "sd2-depth-configs"
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from minidepth import depth as depth_module  # noqa: E402
from minidepth import image_processing  # noqa: E402
from minidepth.checkpoints import build_on_meta  # noqa: E402
from minidepth.models.autoencoder import AutoencoderKL, DiagonalGaussian  # noqa: E402
from minidepth.models.clip_text import CLIPTextModel  # noqa: E402
from minidepth.models.dpt import DPTDepthModel  # noqa: E402
from minidepth.models.unet import UNet  # noqa: E402
from minidepth.pipeline import StableDiffusionDepth2ImgPipeline as Pipeline  # noqa: E402
from minidepth.schedulers import SCHEDULERS, scheduler_from_config  # noqa: E402
from minidepth.tokenizer import CLIPTokenizer  # noqa: E402

PROMPT, SIZE, STEPS, STRENGTH, GUIDANCE, SEED = "a marble statue of two cats", 512, 50, 0.8, 7.5, 0


# ------------------------------------------------------------------------------------------------ links and shapes
@functools.cache
def source_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def cite(path: str | Path, line: int, code: str | None = None) -> str:
    """"`code` [file:line](../minidepth/file#Lline)"; `code` defaults to the line itself, shortened (then "…")."""
    path = Path(path).resolve()
    rel, text, more = path.relative_to(PKG).as_posix(), source_lines(path)[line - 1].strip(), ""
    if code is None:
        code = text.split("  #")[0].rstrip()
        if len(code) > 60:  # cut after the last "(" or ", " that fits
            cut = max(code.rfind("(", 0, 60), code.rfind(", ", 0, 60))
            code, more = code[:cut + 1].rstrip(" ,") if cut > 20 else code[:60], "…"
    assert code in text, (rel, line, code)
    return f"`{code}`{more} [{rel}:{line}](../minidepth/{rel}#L{line})"


def define(obj) -> str:
    """The `def` / `class` line of a function or class."""
    obj = inspect.unwrap(obj)
    lines, start = inspect.getsourcelines(obj)
    i = next(i for i, s in enumerate(lines) if s.lstrip().startswith(("def ", "class ")))
    return cite(inspect.getsourcefile(obj), start + i, lines[i].strip().split("(")[0])


def find(fn, needle: str) -> str:
    """The line of `fn` that contains `needle` (fails loudly when the code has moved on)."""
    fn = inspect.unwrap(fn)
    lines, start = inspect.getsourcelines(fn)
    for i, s in enumerate(lines):
        if needle in s:
            return cite(inspect.getsourcefile(fn), start + i, needle)
    raise LookupError(f"{fn.__qualname__} no longer contains {needle!r}: update scripts/walkthrough.py")


def call_site(skip: tuple[str, ...] = ()) -> str:
    """The innermost line in minidepth/ on the call stack (files in `skip` excepted)."""
    frame = sys._getframe(1)
    while frame is not None:
        path = Path(frame.f_code.co_filename).resolve()
        if PKG in path.parents and path.name not in skip:
            return cite(path, frame.f_lineno)
        frame = frame.f_back
    raise RuntimeError("no minidepth frame on the stack")


def shape(x) -> str:
    if isinstance(x, torch.Tensor):
        return "(" + ", ".join(str(s) for s in x.shape) + ")"
    if isinstance(x, (list, tuple)):
        return " ".join(shape(t) for t in x if isinstance(t, (torch.Tensor, list, tuple)))
    return shape(x.last_hidden_state)  # CLIPTextOutput


def table(header: tuple[str, ...], rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows])


class Recorder:
    """Forward hooks that record (name, input shape, output shape, calling line), first call only."""

    def __init__(self):
        self.rows: dict[str, list] = {}
        self.sizes: dict[str, tuple] = {}  # name -> (input size, output size), for the prose

    def watch(self, section: str, modules: dict):
        rows = self.rows.setdefault(section, [])

        def hook(module, args, out, name):
            out = out[0] if isinstance(out, tuple) else out  # a block's (output, skips): its output
            if name not in self.sizes:
                self.sizes[name] = (args[0].shape, out.shape if isinstance(out, torch.Tensor) else None)
                rows.append((name, shape(args[0]), shape(out), call_site()))
        for name, m in modules.items():
            m.register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name))

    def table(self, section: str, notes: dict | None = None) -> str:
        notes = notes or {}
        return table(("module", "input", "output", "note", "called at"),
                     [(f"`{n}`", i, o, notes.get(n, ""), c) for n, i, o, c in self.rows[section]])


# ------------------------------------------------------------------------------------------------ the run
def build_tokenizer(folder: Path) -> CLIPTokenizer:
    """The checkpoint's tokenizer/ folder, rebuilt offline from open_clip's BPE file, loaded the usual way."""
    from build_clip_tokenizer import write_tokenizer_folder
    write_tokenizer_folder(folder, CONFIGS / "tokenizer_special_tokens_map.json",
                           CONFIGS / "tokenizer_tokenizer_config.json")
    return CLIPTokenizer.from_pretrained(folder)


def watch_skips(unet: UNet) -> tuple[dict, list]:
    """Name every skip s0, s1, ... as the down path pushes it; record what each up block pops and the channels each
    of its ResnetBlocks then receives (input + skip, concatenated)."""
    names, notes, rows = {}, {}, []

    def push(block_name, tensors):
        for t in tensors:
            names[id(t)] = f"s{len(names)}"
        notes[block_name] = "pushes " + ", ".join(f"{names[id(t)]} ({t.shape[1]}, {t.shape[-1]})" for t in tensors)
    unet.conv_in.register_forward_hook(lambda m, a, out: push("conv_in", [out]))
    for i, block in enumerate(unet.down_blocks):
        block.register_forward_hook(lambda m, a, out, i=i: push(f"down_blocks.{i}", out[1]))
    for i, block in enumerate(unet.up_blocks):
        channels = []
        block.register_forward_pre_hook(lambda m, args, i=i, channels=channels: rows.append(
            (f"`up_blocks.{i}`", ", ".join(f"{names[id(p)]} ({p.shape[1]}, {p.shape[-1]})" for p in args[1]), channels)))
        for resnet in block.resnets:
            resnet.register_forward_pre_hook(lambda m, args, channels=channels: channels.append(args[0].shape[1]))
    return notes, rows


def run() -> dict[str, str]:
    """Run the pipeline's steps on meta tensors; return the tables and numbers the template needs."""
    rec = Recorder()
    unet, vae, text_encoder, dpt = (build_on_meta(cls) for cls in (UNet, AutoencoderKL, CLIPTextModel, DPTDepthModel))
    text_encoder._check_ids = lambda ids: None  # its range check reads id values, which meta ids do not have
    scheduler = scheduler_from_config(json.loads((CONFIGS / "scheduler_config.json").read_text()))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp) / "tokenizer")
    pipe = Pipeline(vae, text_encoder, tokenizer, unet, scheduler, dpt, depth_module.DPTImageProcessor())
    pipe.set_progress_bar_config(disable=True)
    photo = PIL.Image.new("RGB", (SIZE, SIZE), (120, 110, 100))
    generator = torch.Generator().manual_seed(SEED)

    rec.watch("text_call", {"text_encoder": text_encoder})
    rec.watch("text", {"token_embedding": text_encoder.token_embedding, "layers.0": text_encoder.layers[0],
                       f"layers.{len(text_encoder.layers) - 1}": text_encoder.layers[-1],
                       "final_layer_norm": text_encoder.final_layer_norm})
    bb = dpt.backbone
    rec.watch("dpt", {"backbone.resnet.stem": bb.resnet.stem,
                      **{f"backbone.resnet.stages.{i}": s for i, s in enumerate(bb.resnet.stages)},
                      "backbone.proj": bb.proj, "backbone.blocks.0": bb.blocks[0],
                      **{f"backbone.blocks.{i}": bb.blocks[i] for i in dpt.config.vit_out_indices},
                      **{f"neck.reassemble.{i}": dpt.neck.reassemble[i] for i in (2, 3)},
                      **{f"neck.fusion.{i}": f for i, f in enumerate(dpt.neck.fusion)}, "head": dpt.head})
    vae_encoder = {"encoder.conv_in": vae.encoder.conv_in, "encoder.mid_block": vae.encoder.mid_block,
                   **{f"encoder.down_blocks.{i}": b for i, b in enumerate(vae.encoder.down_blocks)},
                   "encoder.conv_out": vae.encoder.conv_out, "quant_conv": vae.quant_conv}
    rec.watch("encoder", vae_encoder)
    rec.watch("unet_call", {"unet": unet})
    rec.watch("unet", {"time_embedding": unet.time_embedding, "conv_in": unet.conv_in, "mid_block": unet.mid_block,
                       **{f"down_blocks.{i}": b for i, b in enumerate(unet.down_blocks)},
                       **{f"up_blocks.{i}": b for i, b in enumerate(unet.up_blocks)}, "conv_out": unet.conv_out})
    skip_notes, skip_rows = watch_skips(unet)
    rec.watch("decoder", {"post_quant_conv": vae.post_quant_conv, "decoder.conv_in": vae.decoder.conv_in,
                          "decoder.mid_block": vae.decoder.mid_block, "decoder.conv_out": vae.decoder.conv_out,
                          **{f"decoder.up_blocks.{i}": b for i, b in enumerate(vae.decoder.up_blocks)}})
    draws, resizes, calls = [], [], {}
    real_randn, real_interpolate = torch.randn, F.interpolate

    def randn(size, *args, **kwargs):  # where each random number is drawn, and which pipeline line asked for it
        inner, outer = call_site(skip=("noise.py",)), call_site(skip=("noise.py", "autoencoder.py"))
        draws.append((len(draws) + 1, shape(torch.empty(size, device="meta")), inner, "same" if inner == outer else outer))
        return real_randn(size, *args, **kwargs)

    def interpolate(x, *args, **kwargs):
        out = real_interpolate(x, *args, **kwargs)
        resizes.append((shape(x), shape(out)))
        return out

    def traced(name, method):  # the scheduler's calls from the loop: input and output shapes, calling line
        def wrapper(*args, **kwargs):
            out = method(*args, **kwargs)
            calls[name] = (shape(args[0]), shape(out[0] if isinstance(out, tuple) else out), call_site())
            return out
        return wrapper
    scheduler.scale_model_input = traced("scale_model_input", scheduler.scale_model_input)
    scheduler.step = traced("step", scheduler.step)

    with mock.patch.object(torch, "randn", randn), mock.patch.object(F, "interpolate", interpolate):
        # 1. prompt -> embeddings, unconditional half first
        ids = [tokenizer([text], padding="max_length", truncation=True, return_tensors="pt").input_ids
               for text in (PROMPT, "")]
        cond, uncond = pipe.encode_prompt(PROMPT, 1, True)
        prompt_embeds = torch.cat([uncond, cond])
        # 2. depth: the DPT on meta, then the real resize and normalisation on a stand-in of the DPT's output shape
        pixels = pipe.feature_extractor(photo)
        predicted = depth_module.estimate_depth(photo, dpt, pipe.feature_extractor)
        stand_in = torch.linspace(0.0, 1.0, predicted.numel()).reshape(predicted.shape)
        depth_mask = depth_module.prepare_depth_map(photo, stand_in, batch_size=1, do_classifier_free_guidance=True)
        depth_resize = resizes[-1]
        # 3. image, timesteps (real numbers: the scheduler's table is computed on the CPU)
        image = pipe.preprocess(photo)
        timesteps, num_steps = Pipeline.get_timesteps(types.SimpleNamespace(scheduler=scheduler, device="cpu"),
                                                      STEPS, STRENGTH)
        alpha_bar = float(scheduler.alphas_cumprod[timesteps[0]])
        # 4. latents: random draws 1 and 2
        latents = pipe.prepare_latents(image, timesteps[:1].repeat(1), 1, 1, prompt_embeds.dtype, generator)
        # 5. the first iteration of the loop (every iteration has the same shapes)
        denoised = pipe.denoise(latents, timesteps[:1], prompt_embeds, depth_mask.to("meta"), guidance_scale=GUIDANCE,
                                num_inference_steps=1, extra_step_kwargs=pipe._step_kwargs(generator, 0.0))
        # 6. latents -> image
        decoded = pipe.decode(denoised, "pt")
        pil = image_processing.postprocess(torch.zeros(decoded.shape), "pil")[0]

    eos = ids[0][0].tolist().index(tokenizer.eos_token_id) + 1
    scale, step, unet_call = calls["scale_model_input"], calls["step"], rec.rows["unet_call"][0][1:]
    listed = lambda t, n: ", ".join(str(int(x)) for x in t[:n]) + f", …, {int(t[-1])}"  # noqa: E731
    size = rec.sizes
    down = [size[f"down_blocks.{i}"][0] for i in range(len(unet.down_blocks))] + [size["mid_block"][0]]
    arrow = lambda xs: " → ".join(str(x) for x in dict.fromkeys(xs))  # noqa: E731  (distinct values, in order)
    numbers = {"n_inference": STEPS, "strength": STRENGTH, "guidance": GUIDANCE, "size": SIZE, "max_len": ids[0].shape[1],
               "grid": size["backbone.proj"][1][-1], "n_tokens": size["backbone.blocks.0"][0][1],
               "latent_side": latents.shape[-1], "latent_ch": latents.shape[1], "scaling": vae.config.scaling_factor,
               "moments_ch": size["quant_conv"][1][1], "t_first": int(scheduler.timesteps[0]),
               "temb": size["time_embedding"][1][-1], "unet_sides": arrow(d[-1] for d in down),
               "unet_channels": arrow(d[1] for d in down),
               "first_cat": f"{size['up_blocks.0'][0][1]} + {skip_rows[0][2][0] - size['up_blocks.0'][0][1]} = "
                            f"{skip_rows[0][2][0]}"}
    return {**numbers,
        "call": define(Pipeline.__call__),
        "steps": table(("step", "defined at", "called at"), [
            (f"`{name}`", define(getattr(Pipeline, name)), find(Pipeline.__call__, f"self.{name}("))
            for name in ("encode_prompt", "prepare_depth_map", "preprocess", "get_timesteps", "prepare_latents",
                         "denoise", "decode")]),
        "tokens": table(("text", "input_ids", "ids", "tokens"), [
            (f'"{PROMPT}"', shape(ids[0]), listed(ids[0][0], eos + 1),
             " ".join(f"`{tokenizer.backend.id_to_token(i)}`" for i in ids[0][0, :eos].tolist())),
            ('"" (negative)', shape(ids[1]), listed(ids[1][0], 3), "`<|startoftext|>` `<|endoftext|>`")]),
        "tokenize": find(Pipeline._embed, "self.tokenizer(texts"), "n_pad": 77 - eos,
        "clip_class": define(CLIPTextModel), "n_layers": len(text_encoder.layers),
        "text": table(("module", "input", "output", "called at"),
                      [(f"`{n}`", i, o, c) for n, i, o, c in rec.rows["text_call"] + rec.rows["text"]]),
        "embeds": table(("tensor", "shape", "code"), [
            ("`prompt_embeds`, `negative_prompt_embeds`", shape(cond), find(Pipeline.encode_prompt, "return prompt_embeds")),
            ("CFG batch `[negative; positive]`", shape(prompt_embeds),
             find(Pipeline.__call__, "torch.cat([negative_prompt_embeds, prompt_embeds])"))]),
        "pixels": shape(pixels), "dpt_class": define(DPTDepthModel), "dpt": rec.table("dpt"),
        "depth": table(("step", "shape", "code"), [
            ("DPT output `predicted_depth`", shape(predicted), find(depth_module.prepare_depth_map, "estimate_depth(")),
            ("bicubic resize to the latent grid", " -> ".join(depth_resize),
             find(depth_module.prepare_depth_map, 'mode="bicubic"')),
            (f"per image `2 (d - min) / (max - min) - 1`: [{depth_mask.min():.0f}, {depth_mask.max():.0f}]",
             shape(depth_mask[:1]), find(depth_module.prepare_depth_map, "depth = 2.0 * (depth - d_min)")),
            ("doubled for CFG: `depth_mask`", shape(depth_mask),
             find(depth_module.prepare_depth_map, "torch.cat([depth] * 2)"))]),
        "image": shape(image), "preprocess": find(image_processing.preprocess, "return 2.0 * x - 1.0"),
        "timesteps": table(("", "values", "code"), [
            (f"`scheduler.timesteps` ({len(scheduler.timesteps)})", listed(scheduler.timesteps, 5),
             find(Pipeline.get_timesteps, "set_timesteps(")),
            (f"kept for strength {STRENGTH} ({len(timesteps)})", listed(timesteps, 4),
             find(Pipeline.get_timesteps, "timesteps = self.scheduler.timesteps[")),
            ("denoising steps (progress bar)", num_steps, find(Pipeline.get_timesteps, "return timesteps,"))]),
        "t0": int(timesteps[0]), "n_loop": len(timesteps), "n_steps": num_steps,
        "signal": f"{alpha_bar ** 0.5:.3f}", "noise": f"{(1 - alpha_bar) ** 0.5:.3f}",
        "vae_class": define(AutoencoderKL), "encoder": rec.table("encoder"),
        "latents": table(("step", "shape", "code"), [
            ("moments `[mean; logvar]` -> mean, logvar", shape(torch.empty(size["quant_conv"][1], device="meta")) + " -> " + draws[0][1] + " each",
             find(DiagonalGaussian.__init__, "moments.chunk(2, dim=1)")),
            ("posterior sample `mean + std * eps` (draw 1)", draws[0][1], draws[0][2]),
            (f"times `scaling_factor` {vae.config.scaling_factor}", draws[0][1], find(Pipeline.prepare_latents, "scaling_factor * latents")),
            ("img2img noise (draw 2)", draws[1][1], draws[1][2]),
            (f"`add_noise` to t = {int(timesteps[0])}", shape(latents), find(Pipeline.prepare_latents, "add_noise("))]),
        "loop": table(("step", "shape", "code"), [
            ("latents, doubled for CFG", scale[0], find(Pipeline.denoise, "torch.cat([latents] * 2)")),
            ("`scale_model_input` (identity for PNDM)", scale[1], scale[2]),
            ("append the depth channel: the UNet's input", unet_call[0],
             find(Pipeline.denoise, "torch.cat([x, depth_mask], dim=1)")),
            ("UNet: predicted noise for both halves", unet_call[1], unet_call[2]),
            ("CFG split `uncond, cond`", step[0] + " each", find(Pipeline.denoise, "noise_pred.chunk(2)")),
            (f"guided noise `u + {GUIDANCE} (c - u)`", step[0],
             find(Pipeline.denoise, "uncond + guidance_scale * (cond - uncond)")),
            ("`scheduler.step`: the next latents", step[1], step[2])]),
        "unet_class": define(UNet), "unet": rec.table("unet", skip_notes),
        "skips": table(("up block", "pops (channels, side)", "its ResnetBlocks get (channels)"),
                       [(b, p, ", ".join(map(str, c))) for b, p, c in skip_rows]),
        "decode": table(("step", "shape", "code"), [
            (f"latents / {vae.config.scaling_factor}", shape(denoised), find(Pipeline.decode, "latents / self.vae.config.scaling_factor")),
            ("decoder output, in [-1, 1]", shape(decoded), find(Pipeline.decode, "self.vae.decode(")),
            (f"`(x / 2 + 0.5).clamp(0, 1)`, then a {pil.size[0]} x {pil.size[1]} PIL image", shape(decoded),
             find(image_processing.postprocess, "(image * 0.5 + 0.5).clamp(0, 1)"))]),
        "decoder": rec.table("decoder"),
        "draws": table(("draw", "shape", "drawn at", "asked for by"), draws), "n_draws": len(draws),
        "step_kwargs": find(Pipeline._step_kwargs, "inspect.signature(self.scheduler.step)"),
        "schedulers": stochastic_schedulers(scheduler.config),
    }


def stochastic_schedulers(config) -> str:
    """Four calls of every scheduler (from the SD2 config, eta as the pipeline passes it) on small real tensors:
    which ones draw random numbers, how often, and where."""
    rows, real_randn = [], torch.randn
    variants = [(name, cls, {}, 0.0) for name, cls in SCHEDULERS.items()]
    variants += [("DDIMScheduler", SCHEDULERS["DDIMScheduler"], {}, 1.0),
                 ("DPMSolverMultistepScheduler", SCHEDULERS["DPMSolverMultistepScheduler"],
                  {"algorithm_type": "sde-dpmsolver++"}, 0.0)]
    for name, cls, overrides, eta in variants:
        s = cls.from_config(config, **overrides)
        s.set_timesteps(STEPS)
        kwargs = Pipeline._step_kwargs(types.SimpleNamespace(scheduler=s), torch.Generator().manual_seed(0), eta)
        sites, x = [], torch.zeros(1, 4, 8, 8)
        with mock.patch.object(torch, "randn", lambda *a, **k: sites.append(call_site(("noise.py",))) or real_randn(*a, **k)):
            for t in s.timesteps[:4]:
                x = s.step(torch.ones_like(x), t, s.scale_model_input(x, t), **kwargs, return_dict=False)[0]
        if sites:
            option = ", ".join([f"{k}={v!r}" for k, v in overrides.items()] + ([f"eta={eta:g}"] if eta else []))
            rows.append((f"`{name}`" + (f" ({option})" if option else ""), f"{len(sites)} of 4", sites[-1]))
    return table(("scheduler", "calls that draw", "drawn at"), rows)


# ------------------------------------------------------------------------------------------------ the document
TEMPLATE = """\
# Walkthrough: one 512 × 512 generation, stage by stage

This page follows one call of the pipeline through the code, from a prompt and a photo to a new image, with the real
tensor shapes at every stage and a link to the line that produces each of them:

```python
pipe("a marble statue of two cats", image=photo, generator=torch.Generator().manual_seed(0))  # photo: 512 x 512 RGB
```

with the defaults: `strength=0.8`, `num_inference_steps=50`, `guidance_scale=7.5`, one image, and the checkpoint's
PNDM scheduler. Shapes are written `(B, C, H, W)` for images and latents and `(B, L, D)` for token sequences.

Nothing here is typed by hand. `scripts/walkthrough.py` builds every network at its official size on PyTorch's meta
device (shapes without values or memory), runs the pipeline's own methods on it, records the shapes with forward
hooks, and takes each link from the call stack or from the source. `tests/test_walkthrough.py` regenerates the page and
fails when it differs from this file, so after changing the code run `python scripts/walkthrough.py --write`.

## 0. The call

`__call__` ({call}) reads top to bottom as seven steps, each a method you can also call on its own:

{steps}

## 1. Prompt → token ids

The CLIP tokenizer lower-cases the text, splits it into words and encodes each word as byte-pair pieces (`</w>` marks
the end of a word). Every row is wrapped in `<|startoftext|>` (49406) and `<|endoftext|>` (49407) and padded to the
text encoder's fixed length of {max_len}; here that is {n_pad} padding ids. SD2's padding id is 0 (the vocabulary's "!",
see `minidepth/tokenizer.py`). With guidance on, the pipeline also needs an *unconditional* prediction, so without a
negative prompt it encodes the empty string as well. Both go through {tokenize}.

{tokens}

## 2. Token ids → text embeddings

The text encoder ({clip_class}) is OpenCLIP ViT-H's text tower with {n_layers} transformer layers (SD2 uses the
penultimate of the original 24). Token and position embeddings are added, every layer keeps the shape,
and attention is causal: token t only sees tokens 0..t, so the padding after `<|endoftext|>` never changes the prompt's
features. The shapes for the prompt (the empty negative prompt gives the same):

{text}

`encode_prompt` returns both embeddings, and `__call__` stacks them into one batch of two, unconditional half first:

{embeds}

## 3. Photo → depth map → depth channel

The depth estimator sees its own copy of the photo, taken from the *original* image: the DPT preprocessing squashes it
to 384 × 384 (the aspect ratio is not kept) and maps the pixels to [-1, 1], giving `pixel_values` {pixels}.

DPT-Hybrid ({dpt_class}) is a ResNet stem and three ResNet stages (strides 4, 8 and 16), whose stride-16 map is
projected to tokens: a {grid} × {grid} grid plus a CLS token, {n_tokens} in all. Twelve ViT blocks follow; the neck takes
four features (ResNet stages 0 and 1, and the outputs of ViT blocks 8 and 11, turned back into maps at /16 and /32),
then fuses them from the coarsest to the finest, doubling the resolution each time. The head brings the /2 map to full
size with one channel and a ReLU: relative inverse depth, large = near.

{dpt}

The UNet sees depth as one more input channel next to the 4 latent channels, so `prepare_depth_map` resizes the map to
the latent grid ({latent_side} × {latent_side}) and rescales *each image* to [-1, 1] with its own minimum and maximum: the DPT's scale
is arbitrary, only the layout matters (near = 1, far = -1). With guidance the channel is doubled like the prompts.
(Meta tensors have no minimum or maximum, so the script feeds these lines a stand-in map of the DPT's output shape
through the `depth_map` argument; from the resize on, the code is the same.)

{depth}

## 4. Photo → noised latents (random draws 1 and 2)

For the autoencoder, `preprocess` floors the size to a multiple of 8 and maps the pixels to [-1, 1]: {image},
{preprocess}.

`get_timesteps` decides how much of the schedule to run. Strength {strength} of {n_inference} steps keeps the last `int({n_inference} × {strength})` = {n_steps}
steps and starts at t = {t0} instead of {t_first}. PNDM's table has one timestep more than steps (the second one is repeated:
its first two calls form one improved-Euler step), so the loop below runs {n_loop} times for {n_steps} steps.

{timesteps}

The encoder of the autoencoder ({vae_class}) takes the side from {size} to {latent_side} and ends in {moments_ch} channels:
the mean and log-variance of a Gaussian over {latent_ch} latent channels.

{encoder}

The latents are a *sample* of that Gaussian, `mean + std × eps` (random draw 1), scaled by {scaling} so that they have
about unit variance. Then the forward process jumps straight to t = {t0}:
`x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε` with fresh noise ε (random draw 2), here `x_t = {signal} x_0 + {noise} ε`.
Most of the photo's detail is drowned, but its colours and rough composition survive; the depth channel keeps the
3-D layout.

{latents}

## 5. The denoising loop

Each of the {n_loop} iterations runs the same shapes. Classifier-free guidance (Ho & Salimans, 2022) runs the UNet on
a batch of two, the unconditional and the conditional copy of the latents, then moves the prediction away from the
unconditional one: `ε = u + s (c − u)` with s = {guidance}. The depth channel is appended *after* `scale_model_input` and is
the 5th input channel. The scheduler then turns the guided noise into the latents of the next timestep (PNDM combines
it with the last noise predictions, a linear multistep method, and draws no random numbers).

{loop}

### Inside the UNet

The UNet ({unet_class}) first turns t into a 320-d sinusoidal embedding and an MLP makes it {temb}-d; every ResnetBlock
adds it. The down path takes the side {unet_sides} while the channels grow {unet_channels}; every
intermediate output is pushed on a stack of skips (s0 … s11, channels and side in brackets). The middle block works at
the smallest side; cross-attention to the 77 text embeddings happens in the spatial transformers of every level but the lowest.

{unet}

The up path mirrors the down path with one more ResnetBlock per level. Before each ResnetBlock the newest skip is
popped and concatenated to the input channels (U-Net, Ronneberger et al. 2015), so the first block of `up_blocks.0`
sees {first_cat} channels. Each of the first three up blocks ends with an upsample to the next skip's side. The
same table, derived from the configuration, is in the docstring of `minidepth/models/unet.py`.

{skips}

## 6. Latents → image

After the last step the latents are divided by the scaling factor again and decoded: the decoder mirrors the encoder,
from {latent_side} back to {size}.

{decode}

{decoder}

## 7. Where the random numbers are drawn

The same seed gives the same image (and diffusers' image) only if the same numbers are drawn in the same order and
shapes. With a CPU `torch.Generator` every draw happens on the CPU, in the model's dtype, and is then moved to the
device. This run draws {n_draws} times:

{draws}

PNDM draws nothing in the loop. Stochastic schedulers draw in their steps (random draws 3, 4, …), from the same
generator, which the pipeline passes to `scheduler.step` only if its signature takes one ({step_kwargs}). Measured by
running every scheduler for four calls from the SD2 configuration (those not listed draw nothing):

{schedulers}

With a list of generators (one per image) every draw is made per image, each from its own generator.
"""


def render() -> str:
    return TEMPLATE.format(**run())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="rewrite docs/walkthrough.md")
    ap.add_argument("--check", action="store_true", help="exit 1 with a diff when docs/walkthrough.md is out of date")
    args = ap.parse_args()
    text = render()
    if args.write:
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(text)
    elif args.check:
        old = DOC.read_text() if DOC.exists() else ""
        sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True),
                                                   "docs/walkthrough.md", "generated"))
        return int(old != text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
