"""Generate docs/walkthrough.md: one 512x512 generation through minidepth, with shapes measured from the code.

    python scripts/walkthrough.py            # print the document
    python scripts/walkthrough.py --write    # rewrite docs/walkthrough.md
    python scripts/walkthrough.py --check    # exit 1 with a diff when docs/walkthrough.md is out of date

Every network is built at the official SD2-depth size on the meta device (no weights, no memory, no values) and the
pipeline's own methods run on meta tensors of the real sizes; forward hooks record the shapes and, from the call stack,
the line that made each call. Only small things run on real numbers: the tokenizer, the scheduler's timestep table,
the depth normalisation (fed a stand-in map of the DPT's output shape, since meta tensors have no min or max), the
random draws (drawn on the CPU, as a CPU generator always does) and one DDIM step on ones and zeros (its coefficients).
The fast kernels (section 8) are counted, not run: their functions are replaced by recorders that compute the same
shapes, and an observer of the pipeline says which stage each call belongs to. Links are computed, never typed.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import inspect
import json
import math
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
from minidepth import cpu_memory  # noqa: E402
from minidepth import fast_kernels as kernels  # noqa: E402
from minidepth import image_processing, observers  # noqa: E402
from minidepth.checkpoints import build_on_meta  # noqa: E402
from minidepth.models import attention as attention_module  # noqa: E402
from minidepth.models.attention import Attention  # noqa: E402
from minidepth.models.autoencoder import AutoencoderKL, DiagonalGaussian  # noqa: E402
from minidepth.models.blocks import GEGLU, SpatialTransformer, TransformerBlock  # noqa: E402
from minidepth.models.clip_text import CLIPTextModel  # noqa: E402
from minidepth.models.dpt import DPTDepthModel  # noqa: E402
from minidepth.models.unet import UNet  # noqa: E402
from minidepth.pipeline import StableDiffusionDepth2ImgPipeline as Pipeline  # noqa: E402
from minidepth.schedulers import SCHEDULERS, scheduler_from_config  # noqa: E402
from minidepth.schedulers import maths as scheduler_maths  # noqa: E402
from minidepth.schedulers.ddim import DDIMScheduler  # noqa: E402
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


def find(fn, needle: str, whole: bool = False) -> str:
    """The line of `fn` (a function, class or module) that contains `needle` (fails loudly when the code has moved
    on), shown as `needle` or, with `whole`, as the whole line."""
    fn = inspect.unwrap(fn)
    lines, start = inspect.getsourcelines(fn)
    start = start or 1  # a module's source starts at line 1 (getsourcelines says 0)
    for i, s in enumerate(lines):
        if needle in s:
            return cite(inspect.getsourcefile(fn), start + i, None if whole else needle)
    name = getattr(fn, "__qualname__", getattr(fn, "__name__", fn))
    raise LookupError(f"{name} no longer contains {needle!r}: update scripts/walkthrough.py")


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
    if isinstance(x, torch.Size):
        return "(" + ", ".join(str(s) for s in x) + ")"
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


def watch_block(rec: Recorder, transformer: SpatialTransformer) -> dict:
    """Record one spatial transformer and its (first) TransformerBlock module by module, with the attention products
    of attn1 and attn2 as rows of their own: q, k, v per head and the shape of the score matrix."""
    block = transformer.transformer_blocks[0]
    rec.watch("block", {"norm": transformer.norm, "proj_in": transformer.proj_in, "norm1": block.norm1,
                        **{f"attn1.{p}": getattr(block.attn1, p) for p in ("to_q", "to_k", "to_v", "to_out")},
                        "norm2": block.norm2,
                        **{f"attn2.{p}": getattr(block.attn2, p) for p in ("to_q", "to_k", "to_v", "to_out")},
                        "norm3": block.norm3, "ff.net.0.proj": block.ff.net[0].proj, "ff.net.0": block.ff.net[0],
                        "ff.net.2": block.ff.net[2], "proj_out": transformer.proj_out})
    scores = {}

    def traced(attn: Attention, name: str):
        attend = attn.attend

        def wrapper(q, k, v, key_mask=None):
            out = attend(q, k, v, key_mask)
            if name not in scores:
                scores[name] = attn.probs(q, k, key_mask).shape  # (B, h, L, S): meta, so nothing is computed
                rec.rows["block"].append((name, f"q {shape(q)}, k v {shape(k)}", shape(out), call_site()))
            return out
        attn.attend = wrapper  # an instance attribute: Attention.forward calls self.attend
    traced(block.attn1, "attn1 product")
    traced(block.attn2, "attn2 product")
    return scores


KERNELS = {  # name -> what fast_kernels.py routes there (points 1-9 of its docstring)
    "conv3x3_nnpack": "3×3 convolution by NNPACK's Winograd F(6×6, 3×3)",
    "conv3x3_winograd": "3×3 convolution by Winograd's F(2×2, 3×3), weights transformed once (AVX-512)",
    "conv2d_as_matmul": "convolution as im2col + one matrix product",
    "upsample2x_conv3x3": "nearest 2× upsample + 3×3 convolution, folded into four 2×2 convolutions",
    "conv1x1": "1×1 convolution as a matrix product by oneDNN",
    "conv2d_prepacked": "convolution with its weight prepacked for the loop (oneDNN)",
    "linear": "`F.linear` by oneDNN's matmul",
    "constant_product": "`F.linear` of the text embeddings, kept for the loop",
    "channels-last": "convolution in channels-last layout",
    "default": "PyTorch's default convolution, unchanged",
}
STAGES = ("prompt", "depth", "encode", "denoise", "decode")


class KernelTally(observers.Observer):
    """Which kernel `fast_kernels` picks for every F.linear / F.conv2d call, per stage of the pipeline. The stages come
    from the pipeline's own announcements (this is an observer); the kernels are replaced by recorders that compute
    the same shapes with plain F.conv2d / F.linear on the meta tensors, and meta float32 counts as CPU float32. As on
    a CPU with oneDNN, NNPACK and AVX-512 (x86-64), whatever machine generates the page."""

    def __init__(self):
        self.stage, self.counts, self.sites = None, {}, {}

    def stage_started(self, pipe, *, stage, **data):
        self.stage = stage

    def stage_finished(self, pipe, **data):
        self.stage = None

    def note(self, kernel: str) -> None:
        self.counts.setdefault(kernel, dict.fromkeys(STAGES, 0))[self.stage] += 1
        if kernel not in self.sites or (self.stage == "denoise" and self.sites[kernel][0] != "denoise"):
            self.sites[kernel] = (self.stage, call_site(skip=("fast_kernels.py",)))  # an example, the UNet's first

    @contextlib.contextmanager
    def patched(self):
        choose, picked = kernels.conv2d, []

        def recorder(name, compute):
            def record(*args, **kwargs):
                out = compute(*args, **kwargs)
                if out is not None:  # (None: the kernel declined, conv2d_prepacked without room)
                    picked.append(name)
                    self.note(name)
                return out
            return record

        def conv2d(x, weight, *args, **kwargs):  # fast_kernels' dispatcher; what it leaves to F.conv2d, by layout
            picked.clear()
            out = choose(x, weight, *args, **kwargs)
            if not picked:
                self.note("channels-last" if x.shape[-2] * x.shape[-1] >= kernels.HIGH_RES_POSITIONS else "default")
            return out
        plain = {
            "linear": F.linear,
            "conv1x1": F.conv2d,
            "conv3x3_nnpack": lambda x, w, b: F.conv2d(x, w, b, padding=1),
            "conv3x3_winograd": lambda x, U, b, matmul: x.new_empty(x.shape[0], U.shape[1], *x.shape[2:]),
            "conv2d_as_matmul": lambda x, w, b, stride, padding, out_size: F.conv2d(x, w, b, stride, padding),
            "upsample2x_conv3x3": lambda x, w, b: F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b,
                                                           padding=1),
            "conv2d_prepacked": lambda x, w, b, stride, padding, dilation, groups: (
                F.conv2d(x, w, b, stride, padding, dilation, groups)
                if kernels._transformed("prepacked", w, lambda w: w, budget=kernels.PREPACK_BYTES) is not None
                else None),
            "constant_product": F.linear,
        }
        def meta_is_cpu(*tensors):  # fast_kernels._cpu_inference, with meta for cpu
            recording = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
            return not recording and all(t is None or (t.device.type in ("cpu", "meta") and t.dtype == torch.float32)
                                         for t in tensors)
        with contextlib.ExitStack() as stack:
            for name, compute in plain.items():
                stack.enter_context(mock.patch.object(kernels, name, recorder(name, compute)))
            for name, value in (("conv2d", conv2d), ("_cpu_inference", meta_is_cpu),
                                ("available", lambda: True), ("nnpack_available", lambda: True),
                                ("_avx512", lambda: True)):
                stack.enter_context(mock.patch.object(kernels, name, value))
            yield self


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
    pipe.set_exact(False)  # the fast kernels on, whatever MINIDEPTH_EXACT says: section 8 counts them
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
    transformer = unet.down_blocks[0].attentions[0]
    scores = watch_block(rec, transformer)
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
            result = out[0] if isinstance(out, tuple) else getattr(out, "prev_sample", out)  # tuple or SchedulerOutput
            calls[name] = (shape(args[0]), shape(result), call_site())
            return out
        return wrapper
    scheduler.scale_model_input = traced("scale_model_input", scheduler.scale_model_input)
    scheduler.step = traced("step", scheduler.step)

    tally = KernelTally()
    with mock.patch.object(torch, "randn", randn), tally.patched(), pipe.observing(tally):
        # 1. prompt -> embeddings, unconditional half first
        ids = [tokenizer([text], padding="max_length", truncation=True, return_tensors="pt").input_ids
               for text in (PROMPT, "")]
        cond, uncond = pipe.encode_prompt(PROMPT, 1, True)
        prompt_embeds = torch.cat([uncond, cond])
        # 2. depth: the DPT on meta, then the real resize and normalisation on a stand-in of the DPT's output shape
        pixels = pipe.feature_extractor(photo)
        with pipe._running(dpt, "depth"):  # as pipe.prepare_depth_map runs it
            predicted = depth_module.estimate_depth(photo, dpt, pipe.feature_extractor)
        stand_in = torch.linspace(0.0, 1.0, predicted.numel()).reshape(predicted.shape)
        with mock.patch.object(F, "interpolate", interpolate):
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
        **transformer_block(rec, unet, transformer, scores),
        **ddim_step(scheduler.config, int(timesteps[0])),
        **kernel_layer(tally),
        **announcements(),
    }


def transformer_block(rec: Recorder, unet: UNet, transformer: SpatialTransformer, scores: dict) -> dict:
    """Section 5, one transformer block: its numbers, its table, its links."""
    block = transformer.transformer_blocks[0]
    q_shape, side = rec.sizes["attn1.to_q"][0], rec.sizes["norm"][0][-1]
    heads, head_dim, ff_inner = block.attn1.heads, block.attn1.head_dim, block.ff.net[2].in_features
    token = lambda name: rec.sizes[name][0][-1]  # noqa: E731  (the width of a module's input tokens)
    per_head = lambda name: f"per head ({q_shape[0]}, {heads}, {rec.sizes[name][0][1]}, {head_dim})"  # noqa: E731
    notes = {"norm": f"GroupNorm, {transformer.norm.num_groups} groups", "proj_in": f"the map flattened: L = {side} × {side} tokens",
             "attn1.to_q": per_head("attn1.to_q"), "attn1.to_k": per_head("attn1.to_k"),
             "attn1.to_v": per_head("attn1.to_v"), "attn1 product": f"scores {shape(scores['attn1 product'])}",
             "attn2.to_q": per_head("attn2.to_q"), "attn2.to_k": "from the text: " + per_head("attn2.to_k"),
             "attn2.to_v": "from the text: " + per_head("attn2.to_v"),
             "attn2 product": f"scores {shape(scores['attn2 product'])}",
             "ff.net.0.proj": f"value and gate, {ff_inner} each", "ff.net.0": "GEGLU: value · gelu(gate)",
             "proj_out": "then back to a map and `+ x`"}
    attend = Attention.attend
    backends = {"sdpa": ("PyTorch's fused `scaled_dot_product_attention` (the default, as diffusers)",
                         find(attend, "F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)")),
                "math": ("the formula above, written out; `upcast=True` computes the scores in float32",
                         find(attend, "return math_attention(")),
                "sliced": ("the same formula a slice of (batch × heads) at a time: less memory",
                           find(attend, "return sliced_attention(")),
                "xformers": ("xformers' memory-efficient kernel, when xformers is installed",
                             find(attend, "return xformers_attention("))}
    assert tuple(backends) == attention_module.BACKENDS, "a new attention backend: describe it in the walkthrough"
    n_layers = sum(isinstance(m, Attention) for m in unet.modules())
    return {"st_class": define(SpatialTransformer), "block_class": define(TransformerBlock),
            "attention_class": define(Attention), "block": rec.table("block", notes),
            "n_blocks": sum(isinstance(m, TransformerBlock) for m in unet.modules()), "n_attn": n_layers,
            "side": side, "L": q_shape[1], "D": token("norm1"), "Dc": token("attn2.to_k"), "heads": heads,
            "head_dim": head_dim, "ff_inner": ff_inner,
            "flatten": find(SpatialTransformer.forward, 'h = rearrange(h, "B C H W -> B (H W) C")'),
            "st_residual": find(SpatialTransformer.forward, "return x + h"),
            "res1": find(TransformerBlock.forward, "x = x + self.attn1(self.norm1(x)"),
            "res2": find(TransformerBlock.forward, "x = x + self.attn2(self.norm2(x), context"),
            "res3": find(TransformerBlock.forward, "return x + self.ff(self.norm3(x))"),
            "geglu_split": find(GEGLU.forward, "value, gate = self.proj(x).chunk(2, dim=-1)"),
            "geglu": find(GEGLU.forward, "F.gelu(gate).mul_(value)"),
            "split_heads": find(Attention.forward, 'q = rearrange(self.to_q(x), "B L (h d) -> B h L d"'),
            "scores_line": find(attention_module.attention_probs,
                                "scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5"),
            "softmax_line": find(attention_module.attention_probs, "scores.softmax(dim=-1)"),
            "times_v": find(attention_module.math_attention, "attention_probs(q, k, upcast, mask) @ v"),
            "merge": find(Attention.forward, 'self.to_out(rearrange(out, "B h L d -> B L (h d)"))'),
            "scores1": shape(scores["attn1 product"]), "scores2": shape(scores["attn2 product"]),
            "scores_mib": f"{scores['attn1 product'].numel() * 4 / 2**20:.0f}",
            "attend": define(attend),
            "backends": table(("backend", "computes the product with", "code"),
                              [(f"`{name}`", what, code) for name, (what, code) in backends.items()]),
            "slicing": find(Pipeline.enable_attention_slicing, 'set_attention_backend(self.unet, "sliced"'),
            "set_backend": define(attention_module.set_attention_backend),
            "processor": find(Attention.forward, "out = self.processor(self, q, k, v")}


def ddim_step(config, t0: int) -> dict:
    """Section 5, one DDIM step from the SD2 configuration at the run's first timestep, on real numbers: the noise
    levels, and the step's coefficients measured by calling it on ones and zeros (it is linear in x_t, eps and z)."""
    s = DDIMScheduler.from_config(config)
    s.set_timesteps(STEPS)
    t = s.timesteps[[int(x) for x in s.timesteps].index(t0)]
    t_prev = t0 - s.config.num_train_timesteps // s.num_inference_steps
    a, a_prev = float(s.alphas_cumprod[t]), float(s.alphas_cumprod[t_prev])
    one, zero = torch.ones(1), torch.zeros(1)
    step = lambda eps, x, eta=0.0, z=None: s.step(eps, t, x, eta=eta, variance_noise=z)  # noqa: E731
    x_x, x_eps = float(step(zero, one).prev_sample), float(step(one, zero).prev_sample)
    x0_x, x0_eps = float(step(zero, one).pred_original_sample), float(step(one, zero).pred_original_sample)
    sigma = float(step(zero, zero, 1.0, one).prev_sample)  # eta = 1: the noise's coefficient
    x1_x, x1_eps = float(step(zero, one, 1.0, zero).prev_sample), float(step(one, zero, 1.0, zero).prev_sample)
    signed = lambda c, name: f"{'−' if c < 0 else '+'} {abs(c):.4f} {name}"  # noqa: E731
    code = DDIMScheduler.step
    rows = [
        ("previous timestep", f"t' = t − T/N = {t0} − {s.config.num_train_timesteps}/{STEPS}", f"t' = {t_prev}",
         find(code, "prev_timestep = timestep - c.num_train_timesteps // self.num_inference_steps")),
        ("noise levels", "ᾱ_t, ᾱ_t'", f"{a:.4f}, {a_prev:.4f}", find(code, "alpha_prod_t = self.alphas_cumprod[timestep]")
         + ", " + find(code, "alpha_prod_t_prev = self.alphas_cumprod[prev_timestep]")),
        ("predicted x0", "x̂0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t", f"x̂0 = {x0_x:.4f} x_t {signed(x0_eps, 'ε̂')}",
         find(code, "x0 = x0_from_model_output_vp(") + " → " +
         find(scheduler_maths.x0_from_eps, "return (sample - sigma_t * eps) / alpha_t")),
        ("noise size", "σ_t = η √((1 − ᾱ_t') / (1 − ᾱ_t)) √(1 − ᾱ_t / ᾱ_t')", f"σ_t = {sigma:.4f} η",
         find(code, "std_dev_t = eta * self._variance(") + ", " +
         find(DDIMScheduler._variance, "((1 - alpha_prod_t_prev) / (1 - alpha_prod_t))")),
        ("direction pointing to x_t", "√(1 − ᾱ_t' − σ_t²) ε̂", f"{(1 - a_prev) ** 0.5:.4f} ε̂ (η = 0)",
         find(code, "direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * eps")),
        ("x_t' without noise", "√ᾱ_t' x̂0 + direction", f"{a_prev ** 0.5:.4f} x̂0 + direction",
         find(code, "prev_sample = alpha_prod_t_prev ** (0.5) * x0 + direction")),
        ("fresh noise (η > 0: a random draw)", "+ σ_t z, z ~ N(0, I)", f"+ {sigma:.4f} z (η = 1)",
         find(code, "variance_noise = randn_tensor(") + ", " +
         find(code, "prev_sample = prev_sample + std_dev_t * variance_noise")),
        ("returned", "x_t' and x̂0", "", find(code, "SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)")),
    ]
    return {"ddim_class": define(DDIMScheduler), "t_prev": t_prev, "clip": s.config.clip_sample,
            "ddim": table(("term", "Song et al. 2021, eq. 12", f"here, t = {t0}", "code"), rows),
            "ddim0": f"x_{t_prev} = {x_x:.4f} x_{t0} {signed(x_eps, 'ε̂')}",
            "ddim1": f"x_{t_prev} = {x1_x:.4f} x_{t0} {signed(x1_eps, 'ε̂')} + {sigma:.4f} z",
            "x0_observed": find(Pipeline.denoise, 'x0=getattr(step, "pred_original_sample", None)')}


def kernel_layer(tally: KernelTally) -> dict:
    """Section 8: what fast_kernels.py does, and what it did for this run's calls."""
    code = {name: define(getattr(kernels, name)) for name in KERNELS if hasattr(kernels, name)}
    code["channels-last"] = find(kernels.conv2d, "x = x.contiguous(memory_format=torch.channels_last)")
    code["default"] = find(kernels.conv2d, "return F.conv2d(x, weight, bias, stride, padding, dilation, groups)")
    constants = {"low_res": "LOW_RES_POSITIONS", "high_res": "HIGH_RES_POSITIONS",
                 "nnpack_positions": "NNPACK_POSITIONS", "nnpack_channels": "NNPACK_MIN_CHANNELS",
                 "winograd": "WINOGRAD_POSITIONS"}
    square = lambda n: f"{math.isqrt(n)} × {math.isqrt(n)}" if math.isqrt(n) ** 2 == n else str(n)  # noqa: E731
    rows = [(KERNELS[name], code[name], *(tally.counts.get(name, {}).get(stage, 0) for stage in STAGES),
             tally.sites[name][1] if name in tally.sites else "")
            for name in KERNELS]
    return {"kernels": table(("kernel", "code", *STAGES, "for example"), rows),
            "fk_def": define(kernels.fast_kernels), "fk_mode": define(kernels._FastKernels),
            "dispatch": find(kernels._FastKernels.__torch_function__, "if func is F.linear or func is F.conv2d:"),
            "cpu_check": find(kernels._FastKernels.__torch_function__, "if _cpu_inference(*tensors):"),
            "noted": find(kernels._FastKernels.__torch_function__, "self.upsampled[out] = args[0]"),
            "folded": find(kernels._FastKernels.__torch_function__, "folded = _folded_conv("),
            "dispatcher": define(kernels.conv2d),
            **{f"{key}_line": find(kernels, f"{name} = ", whole=True) for key, name in constants.items()},
            **{key: square(getattr(kernels, name)) for key, name in constants.items() if key != "nnpack_channels"},
            "nnpack_channels": kernels.NNPACK_MIN_CHANNELS,
            "prepack_min": kernels.PREPACK_MIN_BYTES >> 20, "prepack_mb": kernels.PREPACK_BYTES >> 20,
            "prepack_min_line": find(kernels, "PREPACK_MIN_BYTES = ", whole=True),
            "prepack_line": find(kernels, "PREPACK_BYTES = ", whole=True),
            "winograd_mb": kernels.WINOGRAD_BYTES >> 20,
            "winograd_bytes_line": find(kernels, "WINOGRAD_BYTES = ", whole=True),
            "winograd_kept": find(kernels, "winograd_kept = ", whole=True),
            "constant": find(kernels._FastKernels.__torch_function__, "return constant_product(*args, **kwargs)"),
            "reuse": find(kernels._FastKernels.__enter__, "self.held.enter_context(reusing_freed_memory())"),
            "reuse_def": define(cpu_memory.reusing_freed_memory),
            "running": find(Pipeline._running, "fast_kernels(enabled=not self.exact"),
            "set_exact": define(Pipeline.set_exact),
            "env": find(Pipeline.__init__, 'os.environ.get("MINIDEPTH_EXACT"')}


def announcements() -> dict:
    """Section 9: where the pipeline announces each event to its observers."""
    events = {"generation_started": Pipeline.__call__, "prompt_encoded": Pipeline.encode_prompt,
              "depth_ready": Pipeline.prepare_depth_map, "image_ready": Pipeline.preprocess,
              "latents_ready": Pipeline.prepare_latents, "denoising_started": Pipeline.denoise,
              "step_done": Pipeline.denoise, "decoded": Pipeline.decode}
    assert {*events, "stage_started", "stage_finished"} == set(observers.EVENTS), "a new event: name it in section 9"
    needles = {"decoded": 'self.announce("decoded", images=images'}  # (not the early return of output_type="latent")
    return {"observable": define(observers.Observable), "observing": define(observers.Observable.observing),
            "announce": find(observers.Observable.announce, "method(self, **data)"),
            "stage": find(Pipeline._running, "with self.stage(stage)"),
            **{f"ev_{event}": find(fn, needles.get(event, f'self.announce("{event}"')) for event, fn in events.items()}}


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
tensor shapes at every stage and a link to the line that produces each of them. Then it goes to the bottom: one
transformer block of the UNet down to the attention product, one scheduler step in equations, the kernels underneath
the layers, and where an observer can listen in. The call:

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

### One transformer block, down to the attention product

The text enters the UNet in its {n_blocks} transformer blocks, one in each spatial transformer ({st_class}); one UNet
call runs {n_attn} attention layers. Follow the first block, in `down_blocks.0.attentions.0`, at the largest side
({side} × {side}). The spatial transformer normalises the feature map, flattens it into a sequence of L = {L} tokens of
width D = {D} ({flatten}) and projects it. The block ({block_class}) is three residual sub-layers, each with its own
LayerNorm in front ("pre-norm", so the residual path `x` itself is never normalised):

```
x = x + attn1(norm1(x))              self-attention: every image token looks at every other
x = x + attn2(norm2(x), context)     cross-attention: every image token looks at the 77 text tokens
x = x + ff(norm3(x))                 feed-forward, each token on its own
```

in {res1}, {res2} and {res3}. The feed-forward is a GELU-gated linear unit (Shazeer 2020): one projection to
2 × {ff_inner}, split into a value and a gate ({geglu_split}), `value · gelu(gate)` ({geglu}), then a projection back
to {D}. After the block the spatial transformer projects back, unflattens the tokens to a map and adds its own input
({st_residual}). Module by module, for the batch of two (unconditional and conditional):

{block}

Every attention layer of every network (UNet, VAE, text encoder, DPT) is one module, `Attention` ({attention_class}).
`to_q`, `to_k` and `to_v` project the tokens, and their width D = {D} is cut into h = {heads} heads of d = {head_dim}
({split_heads}): tensors of shape `(B, h, L, d)`. In cross-attention the keys and values come from the text, S = 77
tokens of width {Dc}, so only the queries have L rows. Each head then computes Vaswani et al.'s (2017, eq. 1)

```
Attention(Q, K, V) = softmax(Q Kᵀ / √d) V          Q: (B, h, L, d)   K, V: (B, h, S, d)   →   (B, h, L, d)
```

written out in {scores_line}, {softmax_line} and {times_v}. The softmax runs over the keys, so each query's weights
sum to 1; dividing by √d keeps the dot products of d-dimensional vectors from growing with d. The heads are then put
side by side again and mixed by `to_out` ({merge}). Here the score matrix of self-attention is {scores1}, {scores_mib} MiB in
float32, against {scores2} for cross-attention: self-attention at 64 × 64 is where the memory goes. Which code
computes the product is a setting of each layer, its `backend` ({attend}):

{backends}

`pipe.enable_attention_slicing()` switches the UNet's layers to `"sliced"` ({slicing}) through {set_backend}. A layer
can also hold a `processor` that replaces the product ({processor}); `record_attention(pipe, words)` in
`minidepth/inside/attention_maps.py` gives the UNet's cross-attention layers one that keeps the weights of each word.

### One scheduler step, in equations: DDIM

The checkpoint's PNDM combines the last few noise predictions; DDIM ({ddim_class}; Song et al. 2021) is the simplest
step to read, and `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)` runs it on the same noise
schedule. With ᾱ_t the cumulative product of the schedule (section 4), eq. 12 of the paper goes from t to the previous
inference timestep t' in three terms: the clean latents x̂0 that the predicted noise ε̂ implies, the "direction
pointing to x_t", and fresh noise whose size η chooses (η = 0: deterministic DDIM; η = 1: as much noise as DDPM).
From the SD2 configuration, at the first step of this run:

{ddim}

With `clip_sample={clip}` in the SD2 configuration, the clipping of x̂0 between the two is skipped. Collecting terms,
one deterministic step (η = 0) is `{ddim0}`, measured by calling `step` on ones and zeros (it is linear in each); with
η = 1 it is `{ddim1}`. The x̂0 the step returns next to the new latents is what an observer's `step_done` receives as
`x0` ({x0_observed}); the filmstrip in `minidepth/inside/filmstrip.py` computes the same formula to show the clean
image predicted at every step.

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

## 8. Underneath the layers: the kernel layer

The networks above are written with plain `nn.Linear` and `nn.Conv2d` layers, which run PyTorch's default kernels,
the ones diffusers runs: that is how the parity tests can compare the two bit for bit. On a CPU, in float32 and for
inference (no autograd graph being recorded), `minidepth/fast_kernels.py` routes some of those calls to faster kernels
that compute the same maths with a different rounding (images within 1e-3; its docstring has the measurements):

- a 3×3 convolution on at least {nnpack_positions} positions ({nnpack_positions_line}) with at least
  {nnpack_channels} input channels ({nnpack_channels_line}): NNPACK's Winograd F(6×6, 3×3), which computes a 6 × 6
  block of outputs from an 8 × 8 tile with 64 instead of 324 multiplications per channel pair;
- at most {low_res} output positions ({low_res_line}), the UNet's lowest levels: im2col and one matrix product, so
  that the large weight is used where it lies instead of being reordered for every call;
- a nearest 2× upsampling followed by a 3×3 convolution: four 2×2 convolutions of the small image, one per output
  phase (4 instead of 9 multiply-adds per output, and the upsampled image never built). The mode notes which tensors
  `F.interpolate` made by nearest doubling ({noted}), so that the convolution reading one of them is folded
  ({folded});
- in the denoising loop, on a CPU with AVX-512, a 3×3 convolution on more than {low_res} and at most {winograd}
  positions ({winograd_line}), the UNet's middle levels: Winograd's F(2×2, 3×3) (`minidepth/winograd.py`), 16
  instead of 36 multiplications per 2×2 block of outputs and channel pair, as 16 matrix products on transformed
  weights; those are made by the first image and kept with their weights ({winograd_kept}), up to {winograd_mb} MB
  ({winograd_bytes_line}), and the kernels' own pages of the checkpoint are given back;
- a 1×1 convolution, and every `F.linear`: one matrix product by oneDNN;
- any other convolution from {high_res} positions ({high_res_line}): channels-last memory layout;
- in the denoising loop, which calls the UNet with the same weights at every step, the largest weights of the
  convolutions left between those resolutions (from {prepack_min} MB, {prepack_min_line}) are reordered into oneDNN's
  layout once and kept, up to {prepack_mb} MB ({prepack_line}); and the products of the text embeddings, the same at
  every step, with each cross-attention's key and value weights are computed once ({constant}). Not a kernel but
  memory: in that loop freed memory stays in the process for the next step's tensors of the same sizes
  ({reuse}, `minidepth/cpu_memory.py` {reuse_def}), instead of fresh pages that the system faults in and zeroes.

It is one context manager, `fast_kernels()` ({fk_def}), a `TorchFunctionMode` ({fk_mode}) that sees every `F.linear`
and `F.conv2d` call made inside it ({dispatch}) and reroutes only the CPU float32 inference calls ({cpu_check}),
through `conv2d` ({dispatcher}); everything else runs unchanged. The pipeline opens it around each model it runs, in
`_running` ({running}), unless it is exact: `pipe.set_exact(True)` ({set_exact}), `MINIDEPTH_EXACT=1` in the
environment ({env}) or `--exact` on the command line gives back PyTorch's kernels and bit-identical images. (A
compiled UNet runs without it too: inductor writes its own kernels.)

For this run the script counted where each call would go, on a CPU with oneDNN, NNPACK and AVX-512, per stage of
the pipeline (the stages as the pipeline announces them, section 9; `denoise` is one of the {n_loop} UNet calls,
`prompt` the two text-encoder calls):

{kernels}

## 9. Where an observer listens

The pipeline is also an `Observable` ({observable}): `with pipe.observing(obs):` ({observing}) adds observers for a
block, and each step announces what it has made by calling `obs.<event>(pipe, **data)` on every observer that has that
method ({announce}). `__call__` announces `generation_started` after the argument checks ({ev_generation_started}), then
the steps announce `prompt_encoded` ({ev_prompt_encoded}), `depth_ready` ({ev_depth_ready}), `image_ready`
({ev_image_ready}), `latents_ready` ({ev_latents_ready}), `denoising_started` ({ev_denoising_started}), `step_done`
after every scheduler step, with the latents, the guided noise and x̂0 ({ev_step_done}), and `decoded`
({ev_decoded}); `_running` wraps each model's run in `stage_started` and `stage_finished` ({stage}). Because the steps
announce, and not `__call__`, a notebook that calls them one by one is observed too; the script that writes this page
is one, and its kernel count above is an observer that listens for `stage_started`. Observers only look (to change the
latents mid-loop there is diffusers' `callback_on_step_end`); `minidepth/observers.py` lists each event's keywords.
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
