"""Generation settings inside PNG files, as AUTOMATIC1111 and minidepth read them back.

Two text chunks are written:
  - `parameters`: AUTOMATIC1111's format, which image viewers, civitai and the webui's "PNG Info" tab show:
        a marble statue of two cats
        Negative prompt: blurry
        Steps: 50, Sampler: PLMS, CFG scale: 7.5, Seed: 1234, Size: 512x384, Model: stable-diffusion-2-depth, ...
  - `minidepth`: the same settings as JSON, exact (full paths of the photo and depth map, scheduler key, dtype), which
    `minidepth generate --from IMAGE.png` reruns.
Only PIL is imported here (no torch).
"""

from __future__ import annotations

import json
import re

from .args import A1111_NAMES

JSON_KEY = "minidepth"
PARAMETERS_KEY = "parameters"


def _quote(value: str) -> str:
    """A1111 quotes values that contain its separators."""
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:"\n') else text


def parameters_text(settings: dict) -> str:
    """`settings` (the JSON record) -> AUTOMATIC1111's three-part `parameters` text."""
    lines = [settings.get("prompt") or ""]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    fields = {"Steps": settings["steps"], "Sampler": settings.get("sampler"), "CFG scale": settings["guidance"],
              "Seed": settings["seed"], "Size": f"{settings['size'][0]}x{settings['size'][1]}",
              "Model": settings.get("model_name"), "Denoising strength": settings["strength"]}
    if settings.get("clip_skip") is not None:
        fields["Clip skip"] = settings["clip_skip"] + 1  # A1111 counts the last layer as 1
    if settings.get("eta"):
        fields["Eta"] = settings["eta"]
    if settings.get("depth_model") not in (None, "dpt-hybrid"):  # another depth model than SD2-depth's own
        fields["Depth model"] = settings["depth_model"]
    fields["Version"] = f"minidepth {settings.get('version', '')}".strip()
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


_FIELD = re.compile(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_parameters_text(text: str) -> dict:
    """AUTOMATIC1111's `parameters` text -> generate settings (those that map onto minidepth's options)."""
    lines = text.strip().split("\n")
    last = lines[-1] if re.match(r"\s*Steps: \d", lines[-1]) or ", Steps: " in lines[-1] else ""
    if last:
        lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    fields = {}
    for key, value in _FIELD.findall(last):
        fields[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    out = {"prompt": "\n".join(prompt).strip(), "negative_prompt": "\n".join(negative).strip() or None}
    by_a1111 = {v.lower(): k for k, v in A1111_NAMES.items()}
    by_a1111.update({"pndm": "pndm", "dpm++ 2m sde": None, "euler_a": "euler-a", "k_euler_a": "euler-a",
                     "k_euler": "euler", "k_lms": "lms", "k_heun": "heun", "k_dpm_2": "dpm2", "k_dpm_2_a": "dpm2-a"})
    conversions = {"Steps": ("steps", int), "CFG scale": ("guidance", float), "Seed": ("seed", int),
                   "Denoising strength": ("strength", float), "Eta": ("eta", float),
                   "Clip skip": ("clip_skip", lambda v: int(v) - 1)}
    for key, (name, convert) in conversions.items():
        if key in fields:
            try:
                out[name] = convert(fields[key])
            except ValueError:
                pass
    if fields.get("Depth model"):
        out["depth_model"] = fields["Depth model"]
    sampler = fields.get("Sampler", "").lower()
    if by_a1111.get(sampler):
        out["scheduler"] = by_a1111[sampler]
    if out.get("clip_skip") == 0:
        out["clip_skip"] = None  # A1111's "Clip skip: 1" is no skip
    return out


def png_info(settings: dict):
    """A PIL PngInfo holding both chunks, for `image.save(f, pnginfo=...)`."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_itxt(PARAMETERS_KEY, parameters_text(settings))
    info.add_itxt(JSON_KEY, json.dumps(settings, ensure_ascii=False, sort_keys=True))
    return info


def read_png_text(path) -> dict:
    """The text chunks of an image file ({} for none); OSError/ValueError when it is not a readable image. A file
    above the size policy's file limit (minidepth/image_files.py) is not decoded: only the chunks before its pixels
    are read, which is where minidepth and AUTOMATIC1111 write theirs."""
    import warnings

    from PIL import Image

    from ..image_files import file_limit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # nothing is decoded past the limit
        try:
            img = Image.open(path)
        except Image.DecompressionBombError as e:
            raise ValueError(str(e)) from e
    with img:
        if img.width * img.height > file_limit():
            chunks = img.info
        else:
            img.load()  # text chunks after the pixels too
            chunks = getattr(img, "text", {})
        return {k: v for k, v in chunks.items() if isinstance(v, str)}


def read_settings(path) -> tuple[dict, str | None]:
    """(settings, AUTOMATIC1111 text) of a PNG: minidepth's JSON when present, else the parsed `parameters` text;
    ({}, None) when the file has neither."""
    chunks = read_png_text(path)
    text = chunks.get(PARAMETERS_KEY)
    if JSON_KEY in chunks:
        try:
            return json.loads(chunks[JSON_KEY]), text
        except json.JSONDecodeError:
            pass
    return (parse_parameters_text(text), text) if text else ({}, None)
