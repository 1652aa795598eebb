"""The `minidepth` command, end to end in subprocesses on the tiny checkpoint, plus its pure helpers in-process.

Each subprocess imports torch (seconds), so the end-to-end runs are few and their outputs are shared by several asserts:
one module-scoped `generate` run (seed, --save-depth, --grid) is compared pixel for pixel with the pipeline's output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import factory
from minidepth.cli import command as cli

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a wooden cabin in the snow"


def photo(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    """A smooth synthetic photo (gradients + a blob + a little noise), so depth and latents are not trivial."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    img = np.stack([0.5 + 0.5 * np.sin(6 * x + 2 * y + seed), 0.5 + 0.5 * np.cos(4 * y - 3 * x),
                    np.exp(-((x - 0.5) ** 2 + (y - 0.4) ** 2) * 8)], -1) + rng.normal(0, 0.03, (height, width, 3))
    return PIL.Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def minidepth(*args, cwd, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "minidepth", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def warnings_in(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if ": warning: " in line]


def assert_one_line_error(result, code: int, *needles: str):
    err = result.stderr.strip()
    assert result.returncode == code, f"exit code {result.returncode} != {code}; stderr: {err}"
    last = err.splitlines()[-1]
    assert last.startswith("minidepth") and "error:" in last, f"no one-line error at the end of stderr: {err!r}"
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in last, f"{needle!r} not in the error line {last!r}"


def pixels(path) -> np.ndarray:
    with PIL.Image.open(path) as img:
        return np.asarray(img).copy()


def resized_depth(raw, width, height):
    """The DPT output (B, 384, 384) -> its first map bicubic-resized to the image size, as the CLI saves it."""
    import torch.nn.functional as F
    return F.interpolate(raw[:1, None], size=(height, width), mode="bicubic", align_corners=False)[0, 0]


def assert_same_pixels(ours, ref, what):
    ours, ref = np.asarray(ours, dtype=np.int32), np.asarray(ref, dtype=np.int32)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    diff = np.abs(ours - ref)
    assert diff.max() == 0, f"{what}: max abs diff {diff.max()} (mean {diff.mean():.3g}) in 0..255 units"


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with an input photo (100x68: floored to 96x64 by the pipeline) and the tiny checkpoint's path."""
    folder = tmp_path_factory.mktemp("cli")
    photo(100, 68).save(folder / "in.png")
    return folder, factory.cached_checkpoint("tiny")


@pytest.fixture(scope="module")
def generated(work):
    folder, model = work
    result = minidepth("generate", "--image", "in.png", "--prompt", PROMPT, "--steps", 2, "--seed", 7,
                       "--model", model, "--device", "cpu", "--out", "out/cabin.png", "--save-depth", "--grid",
                       cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder, model, result


@pytest.fixture(scope="module")
def pipe(work):
    from minidepth import StableDiffusionDepth2ImgPipeline
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(work[1])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_generate_equals_the_pipeline_for_the_same_seed(generated, pipe):
    folder, _, result = generated
    out = folder / "out" / "cabin.png"
    assert result.stdout.split() == [str(Path("out") / n) for n in ("cabin.png", "cabin-depth.png", "cabin-grid.png")]
    assert "denoising" in result.stderr  # the progress bar
    ref = pipe(PROMPT, image=PIL.Image.open(folder / "in.png"), num_inference_steps=2,
               generator=torch.Generator("cpu").manual_seed(7)).images[0]
    assert_same_pixels(pixels(out), ref, "generate --seed 7 vs pipeline")
    assert not [p.name for p in (folder / "out").iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_save_depth_and_grid(generated, pipe):
    from minidepth.depth import colorize_depth, estimate_depth
    folder = generated[0] / "out"
    depth, grid = pixels(folder / "cabin-depth.png"), pixels(folder / "cabin-grid.png")
    out = pixels(folder / "cabin.png")
    assert depth.shape == (64, 96, 3), depth.shape  # the output's size, in colour
    assert depth.std(axis=(0, 1)).min() > 0, "depth image is flat"
    raw = estimate_depth(PIL.Image.open(generated[0] / "in.png"), pipe.depth_estimator, pipe.feature_extractor,
                         exact=False)  # generate runs the fast kernels
    assert_same_pixels(depth, colorize_depth(resized_depth(raw, 96, 64)), "saved depth vs estimate_depth")
    # photo | depth | output, in a 2-pixel white border, with a 15-pixel caption strip under the tiles
    assert grid.shape == (2 + 64 + 15 + 2, 2 + 3 * (96 + 2), 3), grid.shape
    tile = lambda i: grid[2:66, 2 + 98 * i: 98 + 98 * i]  # noqa: E731
    assert_same_pixels(tile(1), depth, "grid middle = depth")
    assert_same_pixels(tile(2), out, "grid right = output")
    assert_same_pixels(tile(0), PIL.Image.open(generated[0] / "in.png").resize((96, 64), PIL.Image.BICUBIC),
                       "grid left = input")
    for x in (0, 1, 98, 99, 196, 197, grid.shape[1] - 1):
        assert (grid[:, x] == 255).all(), f"column {x} is not the white border"
    assert (grid[:2] == 255).all() and (grid[-2:] == 255).all()
    captions = grid[66:81]
    for i in range(3):  # dark caption text under each tile
        assert (captions[:, 2 + 98 * i: 98 + 98 * i] < 100).any(), f"no caption under tile {i}"


def test_no_overwrite_then_overwrite(generated):
    folder, model, _ = generated
    paths = [folder / "out" / n for n in ("cabin.png", "cabin-depth.png", "cabin-grid.png")]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}
    args = ("generate", "--image", "in.png", "--prompt", PROMPT, "--steps", 2, "--seed", 7, "--model", model,
            "--device", "cpu", "--out", "out/cabin.png", "--save-depth", "--grid")
    refused = minidepth(*args, cwd=folder)
    assert_one_line_error(refused, 1, "already exists", "--overwrite")
    assert "loading" not in refused.stderr, "outputs must be checked before the model is loaded"
    assert all((p.read_bytes(), p.stat().st_mtime_ns) == before[p] for p in paths), "an existing file was touched"
    again = minidepth(*args, "--overwrite", cwd=folder)
    assert again.returncode == 0, again.stderr
    for p in paths:
        assert p.stat().st_mtime_ns != before[p][1], f"{p.name} was not rewritten"
        assert p.read_bytes() == before[p][0], f"{p.name}: same seed, different file"


@pytest.fixture(scope="module")
def depth_files(work):
    folder, model = work
    result = minidepth("depth", "--image", "in.png", "--out", "d.png", "--raw", "d16.png", "--model", model,
                       "--device", "cpu", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["d.png", "d16.png"]
    return folder / "d.png", folder / "d16.png"


def test_depth_command(work, depth_files):
    from minidepth.depth import DPTImageProcessor, colorize_depth, estimate_depth
    from minidepth.models.dpt import DPTDepthModel
    folder, model = work
    dpt = DPTDepthModel.from_pretrained(model / "depth_estimator")
    processor = DPTImageProcessor.from_pretrained(model / "feature_extractor")
    raw = estimate_depth(PIL.Image.open(folder / "in.png"), dpt, processor, exact=False)  # as the command
    raw = resized_depth(raw, 100, 68)  # the input's size
    assert_same_pixels(pixels(folder / "d.png"), colorize_depth(raw), "depth --out vs estimate_depth")
    with PIL.Image.open(folder / "d16.png") as img:
        assert img.mode.startswith("I") and img.size == (100, 68), (img.mode, img.size)
    d16 = pixels(folder / "d16.png").astype(np.float64)
    assert d16.min() == 0 and d16.max() == 65535
    expected = (raw.double() - raw.min()) / (raw.max() - raw.min()) * 65535
    assert np.abs(d16 - expected.numpy()).max() <= 1  # rounding of float32 noise may flip one step


def test_depth_map_input_scheduler_and_numbering(work, depth_files, pipe):
    """The 16-bit map back in, another scheduler, two images: still exactly the pipeline's images."""
    from minidepth import schedulers
    folder, model = work
    d16 = pixels(depth_files[1]).astype(np.float32)
    result = minidepth("generate", "--image", "in.png", "--prompt", PROMPT, "--steps", 3, "--seed", 3,
                       "--num-images", 2, "--scheduler", "euler-a", "--depth-map", "d16.png", "--guidance", 5,
                       "--model", model, "--device", "cpu", "--out", "multi.png", cwd=folder)
    assert result.returncode == 0, result.stderr
    saved = pipe.scheduler
    pipe.scheduler = schedulers.EulerAncestralDiscreteScheduler.from_config(dict(saved.config))
    try:
        refs = pipe(PROMPT, image=PIL.Image.open(folder / "in.png"), num_inference_steps=3, guidance_scale=5,
                    num_images_per_prompt=2, depth_map=torch.from_numpy(d16)[None],
                    generator=[torch.Generator("cpu").manual_seed(s) for s in (3, 4)]).images
    finally:
        pipe.scheduler = saved
    for i, ref in enumerate(refs, start=1):
        assert_same_pixels(pixels(folder / f"multi-{i}.png"), ref, f"multi-{i}.png")
    assert not (folder / "multi.png").exists()
    from minidepth.cli.png_metadata import read_settings
    for i, seed in ((1, 3), (2, 4)):  # image i has seed + i - 1, as in AUTOMATIC1111
        settings, text = read_settings(folder / f"multi-{i}.png")
        assert settings["seed"] == seed and f"Seed: {seed}," in text and "Sampler: Euler a," in text
        assert settings["depth_map"] == str((folder / "d16.png").resolve()) and settings["scheduler"] == "euler-a"


def test_errors(work):
    folder, model = work
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    base = ("generate", "--prompt", PROMPT, "--steps", 2, "--model", model, "--device", "cpu")
    assert_one_line_error(minidepth(*base, "--image", "missing.jpg", cwd=folder), 1, "missing.jpg", "not found")
    assert_one_line_error(minidepth(*base, "--image", "broken.png", cwd=folder), 1, "broken.png")
    assert_one_line_error(minidepth(*base, "--image", "in.png", "--strength", 2, cwd=folder), 2, "--strength 2.0",
                          "[0, 1]")
    no_model = minidepth("generate", "--image", "in.png", "--prompt", PROMPT, "--model", "weights/nothing-here",
                         cwd=folder)
    assert_one_line_error(no_model, 1, "minidepth download", "--dir weights/nothing-here")
    assert not list(folder.glob("in-depth2img*.png")), "an output was written despite the error"


def test_help_is_fast_and_usage_errors_exit_2(tmp_path):
    script = Path(sys.executable).parent / "minidepth"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "minidepth"]
    result = subprocess.run(command + ["generate", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--strength" in result.stdout and "--overwrite" in result.stdout
    result = subprocess.run(command + ["generate", "--image", "x.png"], capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, 2, "--prompt")
    result = subprocess.run([sys.executable, "-c", "import sys, minidepth.cli; print('torch' in sys.modules)"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.stdout.strip() == "False", "importing the CLI must not import torch (`minidepth --help` stays fast)"


# ------------------------------------------------------------------------------------------------ helpers, in-process
def test_planned_outputs_and_checks(tmp_path):
    one = cli.planned_outputs(tmp_path / "a.png", 1, True, True)
    assert one == {"images": [tmp_path / "a.png"], "depth": [tmp_path / "a-depth.png"],
                   "grid": [tmp_path / "a-grid.png"]}
    many = cli.planned_outputs(tmp_path / "b.jpg", 3, False, False)
    assert many["images"] == [tmp_path / f"b-{i}.jpg" for i in (1, 2, 3)] and many["depth"] == many["grid"] == []
    assert cli.planned_outputs(Path("noext"), 1, False, False)["images"] == [Path("noext.png")]
    (tmp_path / "a.png").write_bytes(b"keep")
    with pytest.raises(cli.CLIError, match="already exists"):
        cli.check_outputs([tmp_path / "a.png"], overwrite=False)
    cli.check_outputs([tmp_path / "a.png"], overwrite=True)
    with pytest.raises(cli.CLIError, match="unknown image file extension") as e:
        cli.check_outputs([tmp_path / "a.txt"], overwrite=False)
    assert e.value.code == 2


def test_save_atomic_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "x.png"
    target.write_bytes(b"old")

    class Interrupted:  # an image whose encoder is interrupted after writing some bytes
        def save(self, f, format):
            f.write(b"\x89PNG partial")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cli.save_atomic(Interrupted(), target, overwrite=True)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
    with pytest.raises(cli.CLIError, match="already exists"):
        cli.save_atomic(photo(16, 8), target)
    cli.save_atomic(photo(16, 8), target, overwrite=True)
    assert_same_pixels(pixels(target), photo(16, 8), "saved")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_compose_grid():
    a, b, c = photo(20, 10), photo(8, 4, seed=1), photo(30, 10, seed=2)
    grid = cli.compose_grid([a, b, c])
    assert grid.size == (20 + 20 + 30, 10)
    assert_same_pixels(np.asarray(grid)[:, :20], a, "first tile")
    assert_same_pixels(np.asarray(grid)[:, 40:], c, "last tile")
    big = [photo(160, 128, seed=i) for i in range(2)]
    labelled = np.asarray(cli.compose_grid(big, labels=["photo", "a very long caption that cannot fit"], border=3))
    strip = 15  # round(max(10, 128 // 16) * 1.5)
    assert labelled.shape == (3 + 128 + strip + 3, 3 + 2 * (160 + 3), 3)
    assert_same_pixels(labelled[3:131, 166:326], big[1], "second tile inside the border")
    assert (labelled[:3] == 255).all() and (labelled[:, 163:166] == 255).all()
    text = labelled[131:131 + strip] < 128
    assert text[:, 3:163].any() and text[:, 166:326].any(), "captions missing"
    assert not text[:, :3].any() and not text[:, 163:166].any(), "a caption spills over the border"


def test_read_depth_map(tmp_path):
    depth = np.arange(12, dtype=np.float32).reshape(3, 4) * 1000
    np.save(tmp_path / "d.npy", depth)
    assert np.array_equal(cli.read_depth_map(str(tmp_path / "d.npy")), depth)
    PIL.Image.fromarray(depth.astype(np.uint16)).save(tmp_path / "d16.png")
    assert np.array_equal(cli.read_depth_map(str(tmp_path / "d16.png")), depth)
    grey = np.repeat((depth[..., None] / 50).astype(np.uint8), 3, axis=-1)
    PIL.Image.fromarray(grey).save(tmp_path / "grey.png")  # grey stored as RGB: fine
    assert np.array_equal(cli.read_depth_map(str(tmp_path / "grey.png")), grey[..., 0].astype(np.float32))
    photo(8, 8).save(tmp_path / "colour.png")
    with pytest.raises(cli.CLIError, match="colour image"):
        cli.read_depth_map(str(tmp_path / "colour.png"))
    np.save(tmp_path / "nan.npy", np.full((2, 2), np.nan))
    with pytest.raises(cli.CLIError, match="NaN"):
        cli.read_depth_map(str(tmp_path / "nan.npy"))


def test_model_resolution_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    with pytest.raises(cli.CLIError, match="minidepth download --model .* --dir weights/sd2"):
        cli.resolve_model("weights/sd2")  # parent exists: a path, never a Hub lookup
    (tmp_path / "weights" / "empty").mkdir()
    with pytest.raises(cli.CLIError, match="no model_index.json.*minidepth download"):
        cli.resolve_model("weights/empty")
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    with pytest.raises(cli.CLIError, match="HF_HUB_OFFLINE=1 turns downloading off; unset HF_HUB_OFFLINE.*"
                                           "--model weights/some-model.*minidepth download --model "
                                           "someone/some-model --dir weights/some-model"):
        cli.resolve_model("someone/some-model")


def test_download_fetches_only_what_the_pipeline_reads(tmp_path, monkeypatch):
    """`download` with a stand-in for the Hub (a snapshot_download that copies the matching files of the tiny
    checkpoint, which has both fp32 and fp16 weight files): the right files land in --dir, and the CLI picks the fp16
    variant up by itself from a folder that has only those."""
    import fnmatch
    import shutil

    import huggingface_hub
    source = factory.cached_checkpoint("tiny")
    requests = []

    def fake_snapshot_download(repo_id, revision=None, local_dir=None, allow_patterns=(), **kwargs):
        requests.append((repo_id, revision))
        for f in source.rglob("*"):
            rel = f.relative_to(source).as_posix()
            if f.is_file() and not rel.startswith(".") and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, Path(local_dir) / rel)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    for variant, suffix in ((None, ".safetensors"), ("fp16", ".fp16.safetensors")):
        folder = cli.download("owner/repo", tmp_path / str(variant), variant, "main")
        weights = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors"))
        assert weights == [f"{c}/{stem}{suffix}" for c, stem in (
            ("depth_estimator", "model"), ("text_encoder", "model"), ("unet", "diffusion_pytorch_model"),
            ("vae", "diffusion_pytorch_model"))], weights
        for needed in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
                       "feature_extractor/preprocessor_config.json", "unet/config.json"):
            assert (folder / needed).is_file(), needed
        assert cli.detect_variant(folder, "unet", None) == variant
    assert requests == [("owner/repo", "main")] * 2


def test_scheduler_names_exist():
    from minidepth import schedulers
    for name, (cls, overrides) in cli.SCHEDULERS.items():
        assert hasattr(schedulers, cls), f"--scheduler {name}: minidepth.schedulers has no {cls}"
