"""The command-line side of "see inside": `minidepth tour`, and `generate --filmstrip --attention-maps`.

    minidepth tour --size 512 [--markdown] [--model DIR]
    minidepth generate --image photo.jpg --prompt "a marble statue of a cat" --out statue.png \\
        --filmstrip --filmstrip-every 5 --attention-maps "cat,statue"
        # -> statue.png, statue-filmstrip.png, statue-attn-cat.png, statue-attn-statue.png

cli.py calls these hooks; nothing here imports torch at module level (`minidepth --help` stays quick). The extra files
follow the generate rules: planned and checked before any model loads (an existing file needs --overwrite), written
atomically. With --num-images N each image gets its own: OUT-1-filmstrip.png, OUT-1-attn-cat.png, ...
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from .errors import CLIError


# ------------------------------------------------------------------------------------------------ tour
def add_parser(sub, formatter_class) -> None:
    """Register the `tour` subcommand (called by `cli_args.build_parser`, like every subcommand module)."""
    t = sub.add_parser("tour", formatter_class=formatter_class,
                       help="the architecture as a table: shapes, parameters, GFLOP (no weights needed)",
                       description="Print every model of SD2-depth (text encoder, DPT depth, VAE encoder, UNet, VAE "
                                   "decoder) block by block: output shape at the chosen image size, parameters, "
                                   "GFLOP per call (torch's FLOP counter on the meta device) and share; then the "
                                   "totals of one generation. Needs no weights and no network.")
    t.add_argument("--size", default="512", metavar="N|WxH", help="image size: a side or WIDTHxHEIGHT (default 512)")
    t.add_argument("--model", metavar="DIR", help="read the configs of this checkpoint folder instead of the built-in "
                                                  "SD2-depth ones")
    t.add_argument("--depth-model", metavar="NAME_OR_PATH",
                   help="the depth model in the table: dpt-hybrid (default), depth-anything-v2-small|base|large "
                        "(packaged configs, no network), a folder or a Hub repo id")
    t.add_argument("--markdown", action="store_true", help="print Markdown tables (for docs)")
    t.add_argument("--steps", type=int, default=50, help="scheduler steps of the generation totals (default 50)")
    t.add_argument("--strength", type=float, default=0.8, help="strength of the generation totals (default 0.8)")
    t.add_argument("--guidance", type=float, default=7.5,
                   help="guidance scale; > 1 runs the UNet on a batch of 2 and the text encoder twice (default 7.5)")


def _parse_size(text: str) -> tuple[int, int]:
    """"512" or "768x512" (width x height) -> (height, width), multiples of 8."""
    parts = text.lower().split("x")
    try:
        width, height = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except ValueError:
        width = height = 0
    if len(parts) > 2 or width < 8 or height < 8 or width % 8 or height % 8:
        raise CLIError(f"--size {text}: must be a side or WIDTHxHEIGHT, multiples of 8 (e.g. 512 or 768x512)",
                       code=2)
    return height, width


def run(args, console=None) -> int:
    """`minidepth tour`."""
    size = _parse_size(args.size)
    if not 1 <= args.steps <= 1000 or not 0 < args.strength <= 1 or int(args.steps * args.strength) < 1:
        raise CLIError(f"--steps {args.steps} --strength {args.strength}: need 1 <= steps <= 1000, 0 < strength <= 1 "
                       "and at least one denoising step", code=2)
    if args.model is not None:
        folder = Path(args.model).expanduser()
        missing = [p for p in ("unet", "vae", "text_encoder", "depth_estimator", "feature_extractor", "scheduler")
                   if not (folder / p).is_dir()]
        if missing:
            raise CLIError(f"--model {args.model}: not a checkpoint folder (no {', '.join(missing)}/)")
    from ..inside.tour import architecture_tour
    try:  # a name, folder or repo id of checkpoints/depth_models.py, and a config minidepth runs
        tour = architecture_tour(size, args.model, steps=args.steps, strength=args.strength,
                                 guidance_scale=args.guidance, depth_model=args.depth_model)
    except ValueError as e:
        raise CLIError(f"--depth-model: {e}", code=2) from e
    print(tour.markdown() if args.markdown else tour.text())
    return 0


# ------------------------------------------------------------------------------------------------ generate
def add_generate_options(g) -> None:
    g.add_argument("--filmstrip", action="store_true",
                   help="also save OUT-filmstrip.png: photo | depth | the predicted final image x0 at every K-th "
                        "UNet call | the result")
    g.add_argument("--filmstrip-every", type=int, metavar="K",
                   help="a filmstrip frame every K UNet calls, plus the last (default: about 8 frames)")
    g.add_argument("--filmstrip-decoder", choices=["vae", "linear"], default="vae",
                   help="frames decoded by the VAE (exact; one decode per frame) or by a linear latent -> RGB map "
                        "(instant, blurry colours)")
    g.add_argument("--attention-maps", metavar="WORDS",
                   help="comma-separated words of the prompt: save OUT-attn-WORD.png, where each word's "
                        "cross-attention falls (averaged over layers, heads and steps)")


def words_of(args) -> list[str]:
    text = getattr(args, "attention_maps", None)
    words = [w.strip() for w in text.split(",") if w.strip()] if text else []
    if text is not None and not words:
        raise CLIError(f"--attention-maps {text!r}: give words of the prompt, separated by commas", code=2)
    return words


def plan_outputs(args, outputs: dict) -> None:
    """Add this run's files to one job's planned `outputs` (checked with the others before any work):
    "filmstrip" and "attention" lists, named after each image file."""
    if getattr(args, "filmstrip_every", None) is not None and args.filmstrip_every < 1:
        raise CLIError(f"--filmstrip-every {args.filmstrip_every}: must be an integer >= 1", code=2)
    if getattr(args, "filmstrip_every", None) is not None and not args.filmstrip:
        raise CLIError("--filmstrip-every needs --filmstrip", code=2)
    from ..inside import safe_name
    words = words_of(args)
    stems = [p.with_suffix("") for p in outputs["images"]]
    outputs["filmstrip"] = [s.with_name(f"{s.name}-filmstrip.png") for s in stems] if args.filmstrip else []
    outputs["attention"] = [s.with_name(f"{s.name}-attn-{safe_name(w)}.png") for s in stems for w in words]


def check_prompt_words(args, root: Path, prompt: str) -> None:
    """Words that are not in the prompt: an error before any model loads (only the tokenizer is read)."""
    words = words_of(args)
    if not words:
        return
    from ..tokenizer import CLIPTokenizer
    from ..inside.attention_maps import check_words
    try:
        check_words(CLIPTokenizer.from_pretrained(root / "tokenizer"), prompt, words)
    except ValueError as e:
        raise CLIError(f"--attention-maps: {e}", code=2) from e


@contextlib.contextmanager
def recording(pipe, args):
    """Around one pipeline call: the recorders the options ask for. Yields {"attention": rec, "filmstrip": film}."""
    words = words_of(args)
    with contextlib.ExitStack() as stack:
        state = {"decoder": args.filmstrip_decoder}
        if words:
            from ..inside.attention_maps import record_attention
            state["attention"] = stack.enter_context(record_attention(pipe, words))
        if args.filmstrip:
            from ..inside.filmstrip import record_filmstrip
            state["filmstrip"] = stack.enter_context(record_filmstrip(pipe, every=args.filmstrip_every))
        yield state


def after_generate(state: dict, outputs: dict, images: list, overwrite: bool, save_atomic) -> list[Path]:
    """Write the filmstrip and attention PNGs of one job (image i of the batch -> its own files); returns the paths."""
    written = []
    words = state["attention"].words if "attention" in state else []
    for i, image in enumerate(images):
        if "filmstrip" in state:
            path = outputs["filmstrip"][i]
            save_atomic(state["filmstrip"].strip(state.get("decoder", "vae"), index=i), path, overwrite)
            written.append(path)
        if words:
            overlays = state["attention"].overlays(image, words, index=i)
            for word, path in zip(words, outputs["attention"][i * len(words):(i + 1) * len(words)]):
                save_atomic(overlays[word], path, overwrite)
                written.append(path)
    return written
