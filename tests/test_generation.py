"""minidepth/generation.py: the one generation path of `minidepth generate`, `minidepth batch` and the web page.

All in one process on the tiny checkpoint (each front end loads its own pipeline, as it does for a user; one process
means one thread count, so equal pixels are a bit-exact comparison).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from minidepth import StableDiffusionDepth2ImgPipeline, generation
from minidepth.console import Console
from test_cli import photo

PROMPT, NEGATIVE = "a wooden cabin in the snow", "blurry"
# the settings every front end gets; ddim so that the scheduler choice is exercised, two images for seed + i
SETTINGS = {"strength": 0.75, "steps": 4, "guidance": 6.0, "seed": 7, "scheduler": "ddim", "num_images": 2}


def pixels(path) -> np.ndarray:
    with PIL.Image.open(path) as img:
        return np.asarray(img).astype(np.int32)


def png_text(path) -> dict:
    with PIL.Image.open(path) as img:
        img.load()
        return dict(img.text)


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------ three front ends
def test_generate_batch_and_the_page_make_the_same_files(tiny_checkpoint, tmp_path):
    """One job through `minidepth generate`, `minidepth batch` (a one-line jobs file) and the page's Studio: the same
    pixels and the same PNG text, both chunks (AUTOMATIC1111's `parameters` and minidepth's JSON record) whole. The
    photo is 100x68, so the pipeline floors it to 96x64 in all three. Only the file names differ, as each front end
    names its files: generate `--out`, batch the job's name, the page `minidepth-SEED.png` in its own folder."""
    from minidepth.cli import main
    from minidepth.cli.command import load_pipeline
    from minidepth.cli.serve import Studio
    source = tmp_path / "in.png"
    photo(100, 68).save(source)
    model = str(tiny_checkpoint)
    s = SETTINGS

    options = [f"--{k.replace('_', '-')}" if i % 2 == 0 else str(v) for k, v in s.items() for i in (0, 1)]
    assert main(["generate", "--image", str(source), "--prompt", PROMPT, "--negative-prompt", NEGATIVE, *options,
                 "--model", model, "--device", "cpu", "--quiet", "--out", str(tmp_path / "cli.png")]) == 0
    from_cli = [tmp_path / "cli-1.png", tmp_path / "cli-2.png"]

    job = {"image": str(source), "prompt": PROMPT, "negative_prompt": NEGATIVE, "strength": s["strength"],
           "steps": s["steps"], "guidance_scale": s["guidance"], "seed": s["seed"], "scheduler": s["scheduler"],
           "num_images": s["num_images"], "name": "batched"}
    (tmp_path / "jobs.jsonl").write_text(json.dumps(job) + "\n")
    assert main(["batch", str(tmp_path / "jobs.jsonl"), "--model", model, "--device", "cpu", "--quiet",
                 "--out", str(tmp_path / "batch")]) == 0
    from_batch = [tmp_path / "batch" / "batched-1.png", tmp_path / "batch" / "batched-2.png"]

    console = Console("test", quiet=True)
    studio = Studio(load_pipeline(tiny_checkpoint, None, "fp32", "cpu", console), model, None, None, "fp32", "cpu",
                    1000, console)
    warnings = []
    out = studio.generate(str(source), PROMPT, NEGATIVE, s["strength"], s["steps"], s["guidance"], s["seed"],
                          s["scheduler"], s["num_images"], None, "", False, warn=warnings.append)
    from_page = out["images"]
    assert [Path(p).name for p in from_page] == ["minidepth-7.png", "minidepth-8.png"]  # seed + i per image
    assert warnings == ["the photo is 100x68 pixels; sides must be multiples of 8, so it is resized to 96x64 "
                        "(width / height choose the size)"]  # the page's own fields

    for i, (cli, batch, page) in enumerate(zip(from_cli, from_batch, from_page)):
        reference = pixels(cli)
        assert reference.shape == (64, 96, 3)
        for name, other in (("batch", batch), ("page", page)):
            diff = np.abs(pixels(other) - reference)
            assert diff.max() == 0, f"image {i + 1}: {name} vs generate: max diff {diff.max()}"
            assert png_text(other) == png_text(cli), f"image {i + 1}: {name}'s PNG text differs from generate's"
        assert f"Seed: {7 + i}," in png_text(cli)["parameters"] and "Sampler: DDIM" in png_text(cli)["parameters"]


# ------------------------------------------------------------------------------------------------ the library
def job(tmp_path, name: str, seed: int, **changes) -> generation.Job:
    path = tmp_path / f"{name}.png"
    if not path.exists():
        photo(64, 48, seed=seed).save(path)
    settings = dict(prompt=f"a {name} in the snow", photo_path=str(path), model="tiny", steps=3, strength=1.0,
                    seed=seed)
    return generation.Job(**{**settings, **changes})


def test_a_group_is_one_batched_call_with_a_seed_per_sample(pipe, tmp_path):
    """Two jobs in one call = the pipeline's batched call with one generator per sample (bit for bit); the same jobs
    one by one give the same records and seeds, and the same images up to the float rounding of batched kernels,
    which the tiny random-weight model amplifies (tests/test_batch.py measured it: max 11/255, mean 1.2/255; a wrong
    seed or photo pairing is ~40/255 on average)."""
    exact, _ = pipe.exact, pipe.set_exact(True)
    try:
        a, b = job(tmp_path, "cabin", 7), job(tmp_path, "boat", 9)
        grouped = generation.generate(pipe, [a, b], device="cpu")
        single = [generation.generate(pipe, [j], device="cpu")[0] for j in (a, b)]
        photos = [PIL.Image.open(j.photo_path).convert("RGB") for j in (a, b)]
        direct = pipe(prompt=[a.prompt, b.prompt], image=photos, num_inference_steps=3, strength=1.0,
                      generator=[torch.Generator("cpu").manual_seed(s) for s in (7, 9)]).images
    finally:
        pipe.set_exact(exact)
    for k in range(2):
        assert grouped[k].seeds == single[k].seeds == [(7, 9)[k]]
        assert grouped[k].records == single[k].records
        assert np.array_equal(np.asarray(grouped[k].images[0]), np.asarray(direct[k])), f"job {k}: not the call"
        diff = np.abs(np.asarray(grouped[k].images[0], np.int32) - np.asarray(single[k].images[0], np.int32))
        assert diff.max() <= 16 and diff.mean() <= 2.5, f"job {k}: grouped vs alone: max {diff.max()}"
        assert grouped[k].depth.shape[0] == 1  # the job's own row of the DPT's batched estimate
    assert not torch.equal(grouped[0].depth, grouped[1].depth)  # each job's own DPT estimate
    assert grouped[0].record["prompt"] == a.prompt and grouped[1].record["prompt"] == b.prompt


def test_groups_and_what_cannot_share_a_call(tmp_path):
    a, b = job(tmp_path, "cabin", 7), job(tmp_path, "boat", 9)
    depth = np.ones((48, 64), np.float32)
    others = [job(tmp_path, "house", 3, depth_map=depth), job(tmp_path, "tree", 4, steps=5),
              job(tmp_path, "dog", 5, num_images=2), job(tmp_path, "cat", 6)]
    assert generation.groups([a, b, *others], 2) == [[0, 1], [2], [3], [4], [5]]
    assert generation.groups([a, b, *others], 3) == [[0, 1, 5], [2], [3], [4]]
    assert generation.groups([a, b], 1) == [[0], [1]]
    with pytest.raises(ValueError, match="jobs of one call must share their settings"):
        generation.generate(None, [a, others[1]], device="cpu")


def test_scheduler_warnings_progress_and_stage_times(pipe, tmp_path):
    """A fresh scheduler per call (the checkpoint's own again after a ddim job); warnings through `warn`; progress
    after every UNet call; StageTimes from the stage events; no pipeline method replaced."""
    said, ticks = [], []
    timer = generation.StageTimes("cpu")
    generation.generate(pipe, [job(tmp_path, "cabin", 7, scheduler="ddim")], device="cpu")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    [result] = generation.generate(pipe, [job(tmp_path, "cabin", 7, eta=0.5)], device="cpu", warn=said.append,
                                   observers=[timer], progress=lambda done, total: ticks.append((done, total)))
    assert type(pipe.scheduler).__name__ == "PNDMScheduler" and result.record["sampler"] == "PLMS"
    assert said == ["--eta 0.5 has no effect with PNDMScheduler (only ddim uses eta)"]
    total = ticks[0][1]
    assert total > 1 and ticks == [(i, total) for i in range(1, total + 1)]
    assert {"prompt", "depth", "encode", "denoise", "decode"} <= set(timer.seconds)
    assert not [name for name, value in vars(pipe).items() if callable(value) and hasattr(type(pipe), name)]

    said.clear()
    ldm = job(tmp_path, "cabin", 7, mode="ldm", scheduler="euler", strength=0.9, steps=4)
    [result] = generation.generate(pipe, [ldm], device="cpu", warn=said.append,
                                   progress=lambda done, total: ticks.append((done, total)))
    assert said == ["--scheduler euler is ignored with --mode ldm (LDM's own DDIM sampler)"]
    assert result.record["sampler"] == "DDIM" and result.record["mode"] == "ldm" and result.depth is not None
    assert ticks[-1][0] == ticks[-1][1] == 3  # t_enc = min(int(0.9 * 4), 4 - 1)


def test_check_before_the_model(tmp_path):
    """Sizes and the depth map's aspect ratio, in the command line's words by default, the page's when asked."""
    said = []
    odd = job(tmp_path, "odd", 1, photo=photo(100, 68), photo_path="in.png",
              depth_map=np.ones((8, 8), np.float32), depth_map_path="square.npy")
    generation.check(odd, said.append)
    assert said == ["--image in.png is 100x68 pixels; sides must be multiples of 8, so it is resized to 96x64 "
                    "(--width/--height choose the size)",
                    "--depth-map square.npy is 8x8 but the image is 96x64: the depth map is stretched from aspect "
                    "ratio 1.00 to 1.50"]
    assert generation.output_size(generation.Job(**{**vars(odd), "width": 64})) == (64, 40)
    with pytest.raises(ValueError, match="the photo is 4x4 pixels; images must be at least 8x8$"):
        generation.check(job(tmp_path, "tiny", 1, photo=photo(4, 4)),
                         wording=generation.Wording("the photo", "the depth map", "", ""))
    assert generation.resolve_seed(5) == 5 and 0 <= generation.resolve_seed(-1, said.append) < 2 ** 32
    assert said[-1].startswith("seed: ") and "to get the same image again" in said[-1]
