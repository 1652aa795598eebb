"""`minidepth serve`: a local web page (gradio) for depth-to-image, with the depth map, the denoising filmstrip and the
attention maps per word next to the result.

    pip install -e ".[web]"
    minidepth serve --model weights/stable-diffusion-2-depth        # then open http://127.0.0.1:7860

How it behaves:
  - the model loads once, when the server starts; gradio's queue runs one generation at a time (concurrency 1, plus a
    lock), so two browser tabs wait for each other instead of sharing the model;
  - a generation is what `minidepth generate` does with the same arguments: the same library call
    (`minidepth.generation.generate`), so the same pixels and the same PNG settings; the images are served as those
    PNG files;
  - Mode "ldm" is `generate --mode ldm` (minidepth/ldm_mode.py): the photo padded, not resized; LDM's DDIM grid;
    switching the mode moves strength and guidance to that mode's defaults when they are still the other's;
  - bad input (no photo, an unreadable file, a value out of range, an image under 8x8, a word not in the prompt) is a
    message in the page (gr.Error), never a crash; silent changes (resize to a multiple of 8, ...) are gr.Warnings;
  - binds 127.0.0.1 (this machine only) unless --host says otherwise; a public gradio.live link only with --share;
  - safe to leave running (serve_safety.py): requests for another Host than the bound address (or an --allowed-host)
    get 400 (DNS rebinding); --auth / --auth-file ask for a password (warned about when listening beyond loopback
    without one); gradio's analytics are off unless --analytics; only the sample photo itself is served from the
    package; uploads are capped at MAX_UPLOAD, and photos and depth maps follow the size policy of --max-pixels
    (minidepth/image_files.py: a file too large is refused from its header, before it is decoded).
gradio is imported only here, and only when the server starts: `minidepth --help` needs neither gradio nor torch.
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

from .args import (DEFAULT_MODEL, DTYPES, GENERATE_DEFAULTS, MAX_SEED, SCHEDULERS, CLIError, check_depth_model,
                   depth_model_option)

from . import serve_safety
from .args import max_pixels_option, to_integer
from ..image_files import MAX_PIXELS

MAX_UPLOAD = "50mb"  # gradio refuses larger uploads (the pixel limits apply besides)
PAGE_TOO_LARGE = "; upload a smaller photo (or start the server with a larger --max-pixels)"
PAGE_SIZE_TOO_LARGE = "; choose a smaller width / height (or start the server with a larger --max-pixels)"
# the page's sample photo, minidepth/data/sample-photo.png (scripts/make_sample_photo.py draws it)
SAMPLE_PHOTO = Path(__file__).resolve().parents[1] / "data" / "sample-photo.png"
OWN_SCHEDULER = "checkpoint's own"


# ------------------------------------------------------------------------------------------------ the command
def add_parser(sub, formatter_class) -> None:
    p = sub.add_parser("serve", formatter_class=formatter_class, help="a local web page (gradio) to generate images",
                       description="Start a web page for depth-to-image on this machine: photo, prompt and settings "
                                   "in; images (PNGs with their settings), the depth map, the denoising filmstrip "
                                   "and attention maps per word out. Needs gradio: pip install -e \".[web]\".")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="PATH_OR_REPO_ID",
                   help=f"checkpoint folder or Hugging Face repo id (default: {DEFAULT_MODEL})")
    p.add_argument("--variant", choices=["fp16"], help="load the half-precision weight files")
    p.add_argument("--revision", help="Hub branch, tag or commit (repo ids only)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 lets other machines in (default: 127.0.0.1, this one only)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--share", action="store_true",
                   help="also ask gradio for a temporary public link (off unless given)")
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], help="where to run (default: cuda, else mps, else cpu)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="computation precision")
    depth_model_option(p)  # the page's first choice; the page offers the others (each loaded once, on first use)
    p.add_argument("--quiet", "-q", action="store_true", help="fewer lines on stderr")
    max_pixels_option(p)
    serve_safety.add_options(p)  # --allowed-host, --auth, --auth-file, --analytics


def run(args, console) -> int:
    if not 0 < args.port < 65536:
        raise CLIError(f"--port {args.port}: must be in [1, 65535]", code=2)
    auth = serve_safety.read_auth(args.auth, args.auth_file)
    serve_safety.warn_if_open(args, auth, console)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "True" if args.analytics else "False"  # read when gradio is imported
    try:
        import gradio  # noqa: F401
    except ImportError as e:
        raise CLIError(f"serve needs gradio, which is not installed ({e}); pip install -e \".[web]\"") from e
    from .command import load_pipeline, pick_device, warn_half_on_cpu
    from .model import checkpoint_limits, resolve_depth_model, resolve_model
    depth_model = check_depth_model(args.depth_model)
    root = resolve_model(args.model, variant=args.variant, revision=args.revision)
    device = pick_device(args.device)
    warn_half_on_cpu(console, args.dtype, device)
    pipe = load_pipeline(root, args.variant, args.dtype, device, console,
                         depth_model=resolve_depth_model(depth_model, root))
    pipe.set_progress_bar_config(disable=True)  # the page has its own progress bar
    studio = Studio(pipe, args.model, args.variant, args.revision, args.dtype, device, checkpoint_limits(root)[0],
                    console, depth_model=depth_model)
    studio.max_pixels = args.max_pixels
    demo = build_app(studio, analytics=args.analytics)
    console.info(f"outputs are kept in {studio.folder}")
    demo.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, share=args.share, show_error=True, ssr_mode=False,
        allowed_paths=[str(SAMPLE_PHOTO)], quiet=args.quiet, footer_links=["api"], mcp_server=False, auth=auth,
        max_file_size=MAX_UPLOAD, app_kwargs={"middleware": serve_safety.host_middleware(args)}, num_workers=0)
    return 0


# ------------------------------------------------------------------------------------------------ one generation
class Studio:
    """The loaded pipeline and what the page asks of it: `generate(...)` checks the page's input, hands one
    generation.Job to the library (the same path as `minidepth generate`) and writes the files the page shows."""

    max_pixels = MAX_PIXELS  # the size policy (minidepth/image_files.py); `run` sets serve's --max-pixels

    def __init__(self, pipe, model: str, variant, revision, dtype: str, device: str, max_steps: int, console,
                 depth_model: str | None = None):
        from ..checkpoints.depth_models import NAMES, DepthModels
        self.pipe, self.model, self.variant, self.revision = pipe, model, variant, revision
        self.dtype, self.device, self.max_steps, self.console = dtype, device, max_steps, console
        self.depth_models = DepthModels(pipe, depth_model, model, variant)  # the one loaded; others on first use
        self.depth_choices = list(dict.fromkeys([self.depth_models.current, *NAMES]))
        self.folder = Path(tempfile.mkdtemp(prefix="minidepth-serve-"))
        self.lock, self.jobs = threading.Lock(), 0

    def generate(self, photo: str | None, prompt: str, negative_prompt: str, strength: float, steps: int,
                 guidance: float, seed, scheduler: str, num_images: int, depth_file: str | None, words: str,
                 filmstrip: bool, mode: str = "diffusers", crop_padding: bool = False, depth_model: str | None = None,
                 width=None, height=None, warn=None, progress=None) -> dict:
        """Check everything first (CLIError), then generate; mode="ldm" (+ crop_padding) as `generate --mode ldm`;
        `depth_model` one of `depth_choices` (or any name, folder or repo id; None: the one loaded first);
        `width` / `height` as `generate --width/--height` (0 or None: the photo's own).
        Returns {"images": [PNG paths], "seed": first seed, "depth": PNG path, "filmstrip": PNG path or None,
        "attention": [(PNG path, caption)]}."""
        from ..generation import Job, Wording, check
        from .files import open_image, read_depth_map
        warn = warn or self.console.warn
        progress = (lambda *a, **k: None) if progress is None else progress  # not `or`: gr.Progress has a len()
        if not photo:
            raise CLIError("no photo: upload one (or click the sample photo under the upload box)")
        seed = None if seed in (None, "", "random") else seed  # a number of the right kind: check_generate
        key = None if scheduler in (None, "", OWN_SCHEDULER) else scheduler
        s = {**GENERATE_DEFAULTS, "image": [photo], "prompt": prompt or "", "negative_prompt": negative_prompt or None,
             "strength": strength, "steps": steps, "guidance": guidance, "seed": seed,
             "scheduler": key, "depth_map": depth_file or None, "dtype": self.dtype, "mode": mode or "diffusers",
             "depth_model": depth_model or self.depth_models.current,
             "width": None if width in (None, "", 0) else width, "height": None if height in (None, "", 0) else height}
        try:
            num_images, ldm = to_integer(num_images, "--num-images", "an integer >= 1"), s["mode"] == "ldm"
        except ValueError as e:
            raise CLIError(str(e), code=2) from e
        if crop_padding and not ldm:
            raise CLIError("--crop-padding only applies with --mode ldm (the diffusers mode does not pad)", code=2)
        from .args import check_generate
        check_generate(s, num_images, self.max_steps)  # NaN, inf, 2.5 steps: refused, naming the field
        seed = s["seed"]
        s["depth_model"] = check_depth_model(s["depth_model"], option="depth model")
        words = [w.strip() for w in (words or "").split(",") if w.strip()]
        if ldm and (words or filmstrip):  # both follow the diffusers pipeline's denoising loop
            warn("the filmstrip and attention maps are not recorded in ldm mode")
            words, filmstrip = [], False
        if words:
            from ..inside.attention_maps import check_words
            try:
                check_words(self.pipe.tokenizer, s["prompt"], words)
            except ValueError as e:
                raise CLIError(str(e), code=2) from e  # "attention maps: 'dog' not in the prompt ..."
        if not s["prompt"].strip():
            warn("the prompt is empty: nothing steers the image but the photo and its depth")

        limit = "the server's --max-pixels"  # a photo too large is refused before it is decoded
        job = Job(prompt=s["prompt"], photo=open_image(photo, _Warnings(warn), "photo", self.max_pixels, limit),
                  photo_path=photo, max_pixels=self.max_pixels,
                  model=self.model, negative_prompt=s["negative_prompt"], strength=s["strength"], steps=s["steps"],
                  width=s["width"], height=s["height"],
                  guidance=s["guidance"], seed=seed, scheduler=key, num_images=num_images,
                  depth_map=read_depth_map(depth_file, self.max_pixels) if depth_file else None,
                  depth_map_path=s["depth_map"],
                  mode=s["mode"], crop_padding=bool(crop_padding), variant=self.variant, revision=self.revision,
                  dtype=self.dtype, depth_model=s["depth_model"])
        try:  # the photo's size, the depth map's aspect ratio: in the page's words
            check(job, warn, Wording(photo="the photo", depth_map="the depth map",
                                     resize_hint=" (width / height choose the size)",
                                     small_hint=" (or set width / height to resize it)",
                                     large_hint=PAGE_SIZE_TOO_LARGE if s["width"] or s["height"] else PAGE_TOO_LARGE,
                                     limit=limit))
        except ValueError as e:
            raise CLIError(str(e)) from e
        with self.lock:  # the queue already runs one job at a time; the lock makes it a rule of this class
            return self._run(job, words, filmstrip, warn, progress)

    def _run(self, job, words: list[str], filmstrip: bool, warn, progress) -> dict:
        import contextlib
        import dataclasses

        from ..generation import depth_picture, generate, resolve_seed
        from ..inside.attention_maps import record_attention
        from ..inside.filmstrip import record_filmstrip
        from .png_metadata import png_info
        self.jobs += 1
        number = self.jobs
        folder = self.folder / f"{number:04d}"
        folder.mkdir()
        job = dataclasses.replace(job, seed=resolve_seed(job.seed))  # drawn here: the log and the page show it
        start = time.perf_counter()
        self.console.info(f"job {number}: started (seed {job.seed}, {job.num_images} image(s), {job.steps} steps)")
        progress(0, desc="estimating depth")

        def on_step(done: int, total: int) -> None:  # after each UNet call: one tick of the page's bar
            progress((done, total), desc="denoising", unit="UNet calls")
        try:  # the chosen depth model into the pipeline's slot (loaded on its first use)
            self.depth_models.use(job.depth_model)
        except (ValueError, OSError) as e:
            raise CLIError(f"depth model {job.depth_model}: {e}") from e
        with contextlib.ExitStack() as stack:
            attention = stack.enter_context(record_attention(self.pipe, words)) if words else None
            film = stack.enter_context(record_filmstrip(self.pipe)) if filmstrip else None
            try:
                [result] = generate(self.pipe, [job], device=self.device, warn=warn, progress=on_step)
            except (ValueError, TypeError) as e:  # the pipeline's own checks
                raise CLIError(str(e), code=2) from e
            progress(1.0, desc="saving")
            out = {"seed": job.seed, "images": [], "attention": [], "filmstrip": None}
            for i, (image, record) in enumerate(zip(result.images, result.records)):
                path = folder / f"minidepth-{record['seed']}.png"
                image.save(path, pnginfo=png_info(record))
                out["images"].append(path)
                if attention is not None:
                    for k, (word, overlay) in enumerate(attention.overlays(image, words, index=i).items()):
                        overlay.save(folder / f"attn-{i + 1}-{k + 1}.png")
                        caption = word + (f" (image {i + 1})" if job.num_images > 1 else "")
                        out["attention"].append((folder / f"attn-{i + 1}-{k + 1}.png", caption))
            if film is not None:
                out["filmstrip"] = folder / "filmstrip.png"
                film.strip("vae", index=0).save(out["filmstrip"])
        out["depth"] = folder / "depth.png"
        depth_picture(result.depth, result.images[0].size).save(out["depth"])
        self.console.info(f"job {number}: done in {time.perf_counter() - start:.1f} s: {folder}")
        return out


class _Warnings:
    """A Console for cli_files.open_image whose warnings go to the page."""

    def __init__(self, warn):
        self.warn, self.info = warn, lambda message: None


def page_message(error: Exception) -> str:
    """A CLIError's line, worded for the page: "--strength 2.0: ..." -> "strength 2.0: ..." (--max-pixels stays: it
    is the server's option, for whoever runs it)."""
    text = str(error).replace("raise --max-pixels", "raise the server's --max-pixels")
    return re.sub(r"--(?!max-pixels)([a-z][a-z-]*)", lambda m: m.group(1).replace("-", " "), text)


# ------------------------------------------------------------------------------------------------ the page
def build_app(studio: Studio, analytics: bool = False):
    """The page; `analytics`: let gradio send its usage statistics (serve's --analytics)."""
    import gradio as gr

    def generate(photo, prompt, negative_prompt, strength, steps, guidance, seed, scheduler, num_images, depth_file,
                 words, filmstrip, mode="diffusers", crop_padding=False, depth_model=None, width=0, height=0,
                 progress=gr.Progress()):  # noqa: B008 (gradio's way to ask for a bar)
        def warn(message):
            studio.console.warn(message)
            gr.Warning(page_message(message))
        try:
            out = studio.generate(photo, prompt, negative_prompt, strength, steps, guidance, seed, scheduler,
                                  num_images, depth_file, words, filmstrip, mode, crop_padding, depth_model,
                                  width, height, warn=warn, progress=progress)
        except CLIError as e:
            studio.console.warn(f"refused: {e}")
            message = page_message(e)
            for path in (photo, depth_file):  # gradio's upload folders mean nothing to the user: the file's name
                message = message.replace(path, Path(path).name) if path else message
            raise gr.Error(message, title="Cannot generate") from e
        except gr.Error:
            raise
        except Exception as e:  # noqa: BLE001  (a message in the page, never a stack trace; the server goes on)
            studio.console.warn(f"failed: {type(e).__name__}: {e}")
            raise gr.Error(f"{type(e).__name__}: {e}", title="Generation failed") from e
        images = [str(p) for p in out["images"]]
        return (images, f"{out['seed']}", images, str(out["depth"]),
                str(out["filmstrip"]) if out["filmstrip"] else None,
                [(str(p), caption) for p, caption in out["attention"]])

    with gr.Blocks(title="minidepth", analytics_enabled=analytics) as demo:
        gr.Markdown("## minidepth — Stable Diffusion 2 depth-to-image\nA photo's estimated depth keeps the layout; "
                    "the prompt says what to paint. The depth map, the denoising filmstrip and where each word "
                    "attends are shown next to the result.")
        with gr.Row():
            with gr.Column():
                photo = gr.Image(label="Photo", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                 elem_id="photo")
                gr.Examples([[str(SAMPLE_PHOTO)]], inputs=[photo], label="Sample photo (click to use it)")
                prompt = gr.Textbox(label="Prompt", placeholder="a marble statue in a garden", elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", placeholder="blurry, low quality", elem_id="negative")
                with gr.Row():
                    strength = gr.Slider(0, 1, value=0.8, step=0.01, label="Strength (1 repaints everything)",
                                         elem_id="strength")
                    steps = gr.Slider(1, min(studio.max_steps, 150), value=50, step=1, label="Steps",
                                      elem_id="steps")
                with gr.Row():
                    guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance (CFG scale)",
                                         elem_id="guidance")
                    num_images = gr.Slider(1, 8, value=1, step=1, label="Number of images", elem_id="num-images")
                with gr.Row():
                    seed = gr.Number(value=-1, precision=0, minimum=-1, maximum=MAX_SEED,
                                     label="Seed (-1: random)", elem_id="seed")
                    dice = gr.Button("random seed", size="sm")
                    reuse = gr.Button("reuse last seed", size="sm")
                    scheduler = gr.Dropdown([OWN_SCHEDULER, *SCHEDULERS], value=OWN_SCHEDULER, label="Scheduler",
                                            elem_id="scheduler")
                with gr.Row():  # the photo resized first, as `generate --width/--height`
                    width = gr.Number(value=0, precision=0, minimum=0, label="Width (0: the photo's; one alone keeps "
                                      "its aspect ratio)", elem_id="width")
                    height = gr.Number(value=0, precision=0, minimum=0, label="Height (0: the photo's; multiples of 8)",
                                       elem_id="height")
                with gr.Row():
                    mode = gr.Radio(["diffusers", "ldm"], value="diffusers", label="Mode", elem_id="mode",
                                    info="ldm: as Stability's original depth2img script: the photo padded to multiples "
                                         "of 64 instead of resized, its MiDaS preprocessing and LDM's DDIM timestep "
                                         "grid (the scheduler is ignored; no own depth map)")
                    crop = gr.Checkbox(value=False, label="crop the padding (ldm: outputs at the photo's size)",
                                       interactive=False, elem_id="crop-padding")
                with gr.Accordion("Depth map and a look inside", open=True):
                    depth_file = gr.File(label="Own depth map (optional: grey PNG, brighter = nearer, or .npy)",
                                         file_types=["image", ".npy"], elem_id="depth-file")
                    depth_model = gr.Dropdown(studio.depth_choices, value=studio.depth_choices[0],
                                              label="Depth model", elem_id="depth-model",
                                              info="dpt-hybrid: the checkpoint's own, which SD2-depth was trained "
                                                   "on; another one is loaded on first use (ldm mode: dpt-hybrid)")
                    words = gr.Textbox(label="Attention maps for words of the prompt (comma-separated)",
                                       placeholder="statue, garden", elem_id="words")
                    filmstrip = gr.Checkbox(value=True, label="Denoising filmstrip (one VAE decode per frame)",
                                            elem_id="filmstrip")
                run_button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                gallery = gr.Gallery(label="Images", columns=2, format="png", buttons=["download", "fullscreen"],
                                     elem_id="gallery")
                seed_used = gr.Textbox(label="Seed used", interactive=False, elem_id="seed-used")
                files = gr.File(label="PNG files (the settings are in their metadata: `minidepth info FILE`)",
                                file_count="multiple", elem_id="files")
                depth_out = gr.Image(label="Estimated depth map (near = bright)", format="png", elem_id="depth")
                film_out = gr.Image(label="Denoising filmstrip: predicted x0 along the way (image 1)", format="png",
                                    elem_id="filmstrip-out")
                attention_out = gr.Gallery(label="Attention maps per word", columns=3, format="png",
                                           elem_id="attention")
        _say_which_input({"photo": photo, "strength": strength, "steps": steps, "guidance": guidance, "seed": seed,
                          "number of images": num_images, "mode": mode, "width": width, "height": height}, gr,
                         studio.max_pixels)

        def switch_mode(chosen, strength_now, guidance_now):  # a value still at the other mode's default follows
            from .args import LDM_DEFAULTS
            ldm = chosen == "ldm"
            old, new = (GENERATE_DEFAULTS, LDM_DEFAULTS) if ldm else (LDM_DEFAULTS, GENERATE_DEFAULTS)
            return (new["strength"] if strength_now == old["strength"] else strength_now,
                    new["guidance"] if guidance_now == old["guidance"] else guidance_now,
                    gr.Checkbox(interactive=ldm) if ldm else gr.Checkbox(value=False, interactive=False),
                    gr.Checkbox(value=not ldm, interactive=not ldm), gr.Textbox(interactive=not ldm))
        mode.change(switch_mode, inputs=[mode, strength, guidance],
                    outputs=[strength, guidance, crop, filmstrip, words], api_name=False, queue=False)
        dice.click(lambda: -1, outputs=seed, api_name=False, queue=False)
        reuse.click(lambda used: int(used) if used else -1, inputs=seed_used, outputs=seed, api_name=False,
                    queue=False)
        run_button.click(generate, inputs=[photo, prompt, negative, strength, steps, guidance, seed, scheduler,
                                           num_images, depth_file, words, filmstrip, mode, crop, depth_model,
                                           width, height],
                         outputs=[gallery, seed_used, files, depth_out, film_out, attention_out], api_name="generate")
    return demo


def _say_which_input(inputs: dict, gr, max_pixels: int = MAX_PIXELS) -> None:
    """gradio checks some inputs itself before `generate` runs (a slider's range, a photo that PIL must open) and its
    messages do not say which input: prefix the input's name, and say plainly when a photo is not an image. Before
    gradio's own checks: a number field's value must be a finite number (the API can send NaN or text), and a photo
    file must be within the size policy, from its header (`image_files.open_image_file`: nothing is decoded)."""
    from ..image_files import TooLarge, check_generation_size, open_image_file
    for name, component in inputs.items():
        numeric = isinstance(component, (gr.Slider, gr.Number))

        def preprocess(payload, original=component.preprocess, name=name, numeric=numeric):
            if numeric and payload is not None and (isinstance(payload, bool) or not isinstance(payload, (int, float))
                                                    or not math.isfinite(payload)):
                raise gr.Error(f"{name} {payload!r}: must be a finite number", title="Cannot generate")
            try:
                if name == "photo" and getattr(payload, "path", None):
                    shown = getattr(payload, "orig_name", None) or Path(payload.path).name
                    with open_image_file(payload.path, shown, max_pixels=max_pixels,
                                         raise_with="the server's --max-pixels") as img:  # the photo's own size
                        check_generation_size(img.size, shown, max_pixels, PAGE_TOO_LARGE)  # (decoding it is the risk)
                return original(payload)
            except Exception as e:
                detail = getattr(e, "message", None) or str(e)
                if name == "photo" and isinstance(e, (OSError, ValueError)) and not isinstance(e, TooLarge):  # PIL
                    detail = f"{getattr(payload, 'orig_name', None) or 'the file'} is not a readable image"
                raise gr.Error(f"{name}: {detail}", title="Cannot generate") from e
        component.preprocess = preprocess


if __name__ == "__main__":  # python -m minidepth.web ... = minidepth serve ...
    from .command import main
    sys.exit(main(["serve", *sys.argv[1:]]))
