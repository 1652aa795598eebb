"""The depth-model slot (#27): any depth model of minidepth/depth.py's protocol in place of the checkpoint's DPT-Hybrid.

- parity: our pipeline with Depth Anything V2 (tiny config, random weights, a transformers folder) against diffusers'
  pipeline given transformers' DepthAnythingForDepthEstimation and its DPTImageProcessor: the same pixels (exact mode);
  transformers' model and processor in OUR slot (the protocol's `.predicted_depth` / `.pixel_values` forms) too;
- the README's own-model example runs; names, folders, modules that break the protocol: a clear error, before
  anything heavy runs;
- the command line (generate + --from, depth, batch with a job's own model, train-lora's depth cache, tour) and the
  page's Studio, end to end on the tiny checkpoint; the benchmark script's smoke run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from test_cli import photo
from test_depth_anything import TINY, reference_folder
from test_generation import pixels, png_text

from minidepth import StableDiffusionDepth2ImgPipeline
from minidepth.checkpoints import components
from minidepth.checkpoints.depth_anything_format import packaged_folder
from minidepth.checkpoints.depth_models import (DepthModels, check_depth_model_name, depth_model_key,
                                                load_depth_model)
from minidepth.models.depth_anything import DepthAnythingV2
from minidepth.observers import Observer

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a wooden cabin in the snow"
CALL = dict(num_inference_steps=4, strength=0.75, guidance_scale=6.0)


def same(ours, ref, what: str) -> None:
    ours, ref = (np.asarray(x, dtype=np.float64) for x in (ours, ref))
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    diff = np.abs(ours - ref)
    print(f"{what}: max abs diff {diff.max():.3e}, mean {diff.mean():.3e}")
    assert diff.max() == 0, f"{what}: max abs diff {diff.max():.3e}, mean {diff.mean():.3e} (exact mode expects 0)"


def record(path) -> dict:
    return json.loads(png_text(path)["minidepth"])


@pytest.fixture(scope="module")
def da_folder(tmp_path_factory) -> Path:
    """A tiny Depth Anything V2 as transformers saves it, with the published (packaged) preprocessing."""
    folder = reference_folder(TINY["tiny"], tmp_path_factory.mktemp("depth-anything-tiny"))
    shutil.copy(packaged_folder("small") / "preprocessor_config.json", folder)
    return folder


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "in.png"
    photo(64, 48).save(path)
    return path


def run(pipe, image, seed: int = 0, **kw):
    return pipe(PROMPT, image=image, generator=torch.Generator().manual_seed(seed), output_type="np", **CALL,
                **kw).images


# ------------------------------------------------------------------------------------------------ parity
def test_same_pixels_as_diffusers_with_depth_anything(tiny_checkpoint, da_folder, photo_file, monkeypatch):
    from diffusers import StableDiffusionDepth2ImgPipeline as Reference
    from transformers import DepthAnythingForDepthEstimation
    from transformers import DPTImageProcessor as ReferenceProcessor

    from minidepth.depth import estimate_depth
    from minidepth.models.dpt import DPTDepthModel

    def no_dpt(*args, **kwargs):
        raise AssertionError("the checkpoint's DPT was loaded although another model fills the depth slot")
    with monkeypatch.context() as m:
        m.setattr(DPTDepthModel, "from_pretrained", classmethod(no_dpt))
        ours = StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_checkpoint, depth_estimator=str(da_folder))
    ours.set_exact(True)
    ours.set_progress_bar_config(disable=True)
    assert type(ours.depth_estimator) is DepthAnythingV2
    ref_model = DepthAnythingForDepthEstimation.from_pretrained(da_folder).eval()
    ref_processor = ReferenceProcessor.from_pretrained(da_folder)
    ref = Reference.from_pretrained(tiny_checkpoint, depth_estimator=ref_model, feature_extractor=ref_processor)
    ref.set_progress_bar_config(disable=True)
    image = PIL.Image.open(photo_file)
    depth = estimate_depth(image, ours.depth_estimator, ours.feature_extractor)
    assert depth.shape == (1, 392, 518) and 0.3 < (depth > 0).float().mean() and depth.std() > 0  # not trivial
    expected = run(ref, image)
    same(run(ours, image), expected, "ours (Depth Anything V2 by name) vs diffusers (transformers' model)")

    # transformers' model and processor in OUR slot: `.predicted_depth` and a BatchFeature's `.pixel_values`
    ours.depth_estimator, ours.feature_extractor = ref_model, ref_processor
    same(run(ours, image), expected, "ours with transformers' components vs diffusers")

    # the DPT-Hybrid differs (the depth model matters), and saving keeps the slot: diffusers reloads it too
    ours_dpt = StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_checkpoint)
    ours_dpt.set_exact(True)
    ours_dpt.set_progress_bar_config(disable=True)
    assert np.abs(run(ours_dpt, image) - expected).max() > 0
    ours_dpt.depth_estimator, ours_dpt.feature_extractor = load_depth_model(da_folder)
    saved = Path(str(da_folder) + "-pipeline")
    ours_dpt.save_pretrained(saved)
    assert json.loads((saved / "model_index.json").read_text())["depth_estimator"][1] == \
        "DepthAnythingForDepthEstimation"
    again = StableDiffusionDepth2ImgPipeline.from_pretrained(saved)
    again.set_exact(True)
    again.set_progress_bar_config(disable=True)
    assert type(again.depth_estimator) is DepthAnythingV2
    same(run(again, image), expected, "ours, saved with Depth Anything and reloaded, vs diffusers")
    reloaded = Reference.from_pretrained(saved)
    reloaded.set_progress_bar_config(disable=True)
    same(run(reloaded, image), expected, "diffusers loading our saved pipeline")


def test_single_file_with_another_depth_model_gives_diffusers_pixels(tiny_checkpoint, da_folder, photo_file, tmp_path,
                                                                     monkeypatch):
    """`from_single_file(..., depth_estimator=)`: the file's DPT is not built; the same pixels as diffusers' pipeline
    on the same networks with transformers' Depth Anything V2. A bad name fails before the file is read."""
    from diffusers import StableDiffusionDepth2ImgPipeline as Reference
    from transformers import DepthAnythingForDepthEstimation
    from transformers import DPTImageProcessor as ReferenceProcessor

    from minidepth.checkpoints.single_file import convert
    from minidepth.models.dpt import DPTDepthModel

    single = convert(tiny_checkpoint, tmp_path / "tiny-depth.safetensors")

    def no_dpt(*args, **kwargs):
        raise AssertionError("the file's DPT was built although another model fills the depth slot")
    with monkeypatch.context() as m:
        m.setattr(DPTDepthModel, "from_single_file", classmethod(no_dpt))
        ours = StableDiffusionDepth2ImgPipeline.from_single_file(single, config=str(tiny_checkpoint),
                                                                 depth_estimator=str(da_folder))
    ours.set_exact(True)
    ours.set_progress_bar_config(disable=True)
    assert type(ours.depth_estimator) is DepthAnythingV2
    ref = Reference.from_pretrained(tiny_checkpoint,
                                    depth_estimator=DepthAnythingForDepthEstimation.from_pretrained(da_folder).eval(),
                                    feature_extractor=ReferenceProcessor.from_pretrained(da_folder))
    ref.set_progress_bar_config(disable=True)
    image = PIL.Image.open(photo_file)
    same(run(ours, image), run(ref, image), "ours (single file + Depth Anything V2 by name) vs diffusers")
    with pytest.raises(ValueError, match="did you mean depth-anything-v2-small"):
        StableDiffusionDepth2ImgPipeline.from_single_file(tmp_path / "nowhere.safetensors",
                                                          depth_estimator="depth-anything-v2-smal")


# ------------------------------------------------------------------------------------------------ the README example
def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    marker = "<!-- the depth-slot example: tests/test_depth_slot.py runs this block -->"
    assert marker in text, "README.md lost the depth-slot example's marker"
    return text.split(marker, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_example_of_an_own_depth_model_runs(tiny_checkpoint, photo_file):
    from minidepth.depth import prepare_depth_map
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_checkpoint)
    pipe.set_exact(True)
    pipe.set_progress_bar_config(disable=True)
    seen = []

    class Watch(Observer):
        def depth_ready(self, pipe, *, depth_mask, **data):
            seen.append(depth_mask.clone())
    namespace = {"pipe": pipe, "photo": PIL.Image.open(photo_file).convert("RGB")}
    with pipe.observing(Watch()):
        exec(compile(readme_example(), "README.md (the depth-slot example)", "exec"), namespace)
    assert type(pipe.depth_estimator).__name__ == "BlurredLuminance"
    assert namespace["image"].size == (64, 48)
    expected = prepare_depth_map(namespace["photo"], None, 1, True, depth_estimator=namespace["BlurredLuminance"](),
                                 feature_extractor=pipe.feature_extractor)
    assert torch.equal(seen[0], expected) and seen[0].std() > 0


# ------------------------------------------------------------------------------------------------ bad input
class Ramp(torch.nn.Module):
    """A depth model returning a left-to-right ramp, or one of the protocol's mistakes."""

    def __init__(self, output: str = "ok"):
        super().__init__()
        self.scale, self.output = torch.nn.Parameter(torch.ones(())), output

    def forward(self, pixel_values):
        b, _, h, w = pixel_values.shape
        d = self.scale * torch.linspace(0, 1, w).expand(b, h, w)
        return {"ok": d, "4d": d[:, None], "tuple": (d,), "batch": d[:1].repeat(b + 1, 1, 1), "int": d.long()}[
            self.output]


def test_names_and_folders_that_are_no_depth_model_fail_before_anything_loads(tiny_checkpoint, da_folder, tmp_path,
                                                                               monkeypatch):
    def nothing_loads(*args, **kwargs):
        raise AssertionError("the checkpoint started loading before the depth model was checked")
    monkeypatch.setattr(components, "_checkpoint_components", nothing_loads)
    (tmp_path / "empty").mkdir()
    no_processor = tmp_path / "no-processor"
    shutil.copytree(da_folder, no_processor)
    (no_processor / "preprocessor_config.json").unlink()
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(da_folder / name, no_weights)
    metric = tmp_path / "metric"
    shutil.copytree(da_folder, metric)
    config = json.loads((metric / "config.json").read_text())
    (metric / "config.json").write_text(json.dumps({**config, "depth_estimation_type": "metric", "max_depth": 20}))
    cases = [("depth-anything-v2-smal", "did you mean depth-anything-v2-small"), ("midas", "unknown depth model"),
             (tiny_checkpoint, "is a pipeline checkpoint"), (tiny_checkpoint / "unet", "has no model_type"),
             (tiny_checkpoint / "text_encoder", "model_type 'clip_text_model'"),
             (tmp_path / "missing" / "model", "folder not found"), (tmp_path / "empty", "no config.json"),
             (no_processor, "no preprocessor_config.json"), (no_weights, "holds no weights"),
             (metric, "metric-depth model"), (da_folder / "config.json", "a file, not a folder")]
    for name, match in cases:
        with pytest.raises(ValueError, match=match):
            StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_checkpoint, depth_estimator=str(name))
    for module, error, match in [(lambda x: x, TypeError, "must be a torch.nn.Module"),
                                 (torch.nn.Identity(), ValueError, "no parameters")]:
        with pytest.raises(error, match=match):
            StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_checkpoint, depth_estimator=module)
    with pytest.raises(TypeError, match="callable"):
        StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_checkpoint, feature_extractor=42)


def test_modules_that_break_the_protocol_are_named_before_the_unet_runs(tiny_checkpoint, photo_file):
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    own = pipe.depth_estimator, pipe.feature_extractor
    image = PIL.Image.open(photo_file)
    for bad, error, match in [(lambda x: x, TypeError, "got a function"), (torch.nn.ReLU(), ValueError, "no parameters"),
                              ("depth-anything-v2-small", TypeError, "is the name"),
                              (np.zeros((4, 4)), TypeError, "must be a torch.nn.Module")]:
        with pytest.raises(error, match=match):
            pipe.depth_estimator = bad
    with pytest.raises(TypeError, match="callable as processor"):
        pipe.feature_extractor = 42
    assert (pipe.depth_estimator, pipe.feature_extractor) == own  # a refused value leaves the slot as it was

    unet_calls = []
    hook = pipe.unet.register_forward_hook(lambda *a: unet_calls.append(1))
    for output, error, match in [("4d", ValueError, r"shape \(1, 1, 384, 384\).*depth\[:, 0\]"),
                                 ("tuple", TypeError, "returned a tuple.*predicted_depth"),
                                 ("batch", ValueError, "2 depth maps for 1 images"),
                                 ("int", TypeError, "floating point")]:
        pipe.depth_estimator = Ramp(output)
        with pytest.raises(error, match=match):
            run(pipe, image)
    pipe.depth_estimator = Ramp()
    for processor, error, match in [(lambda images: torch.zeros(1, 3, 8), ValueError, r"\(B, 3, H, W\)"),
                                    (lambda images: "pixels", TypeError, "returned a str")]:
        pipe.feature_extractor = processor
        with pytest.raises(error, match=match):
            run(pipe, image)
    pipe.feature_extractor = own[1]
    with pytest.raises(ValueError, match="mode='ldm' runs MiDaS"):
        pipe(PROMPT, image=image, mode="ldm", num_inference_steps=4)
    assert not unet_calls
    hook.remove()
    assert run(pipe, image).shape == (1, 48, 64, 3)  # a ramp is a valid depth model


def test_names_keys_and_switching(tiny_checkpoint, da_folder, tmp_path):
    assert check_depth_model_name("depth-anything-v2-base") == "depth-anything-v2-base"
    assert check_depth_model_name("someone/their-depth-model") == "someone/their-depth-model"  # a Hub repo id
    assert check_depth_model_name(str(da_folder)) == str(da_folder.resolve())
    keys = {depth_model_key(n) for n in (None, "dpt-hybrid", "depth-anything-v2-small", "a/b", str(da_folder))}
    assert len(keys) == 4 and depth_model_key(None) == "dpt-hybrid" and depth_model_key("a/b") == "a--b"
    assert depth_model_key(str(da_folder)) == depth_model_key(str(da_folder))  # stable
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_checkpoint)
    own = pipe.depth_estimator
    models = DepthModels(pipe, None, tiny_checkpoint)
    models.use(str(da_folder))
    assert type(pipe.depth_estimator) is DepthAnythingV2 and pipe.feature_extractor.config.size == (518, 518)
    loaded = pipe.depth_estimator
    models.use("dpt-hybrid")
    assert pipe.depth_estimator is own
    models.use(str(da_folder))
    assert pipe.depth_estimator is loaded  # loaded once


# ------------------------------------------------------------------------------------------------ front ends
SETTINGS = ["--steps", "4", "--strength", "0.75", "--guidance", "6", "--seed", "7"]


@pytest.fixture(scope="module")
def generated(tiny_checkpoint, da_folder, photo_file, tmp_path_factory) -> dict:
    """`minidepth generate` with Depth Anything V2 and with the checkpoint's DPT, and `--from` the first."""
    from minidepth.cli import main
    out = tmp_path_factory.mktemp("generated")
    base = ["generate", "--image", photo_file, "--prompt", PROMPT, *SETTINGS, "--model", tiny_checkpoint,
            "--device", "cpu", "--quiet"]
    assert main([*map(str, base), "--depth-model", str(da_folder), "--out", str(out / "da.png")]) == 0
    assert main([*map(str, base), "--out", str(out / "dpt.png")]) == 0
    assert main(["generate", "--from", str(out / "da.png"), "--quiet", "--out", str(out / "again.png")]) == 0
    return {"da": out / "da.png", "dpt": out / "dpt.png", "again": out / "again.png", "folder": out}


def test_generate_records_the_depth_model_and_from_reruns_with_it(generated, da_folder):
    from minidepth.cli.png_metadata import parse_parameters_text
    assert record(generated["da"])["depth_model"] == str(da_folder.resolve())
    assert record(generated["dpt"])["depth_model"] == "dpt-hybrid"
    text = png_text(generated["da"])["parameters"]
    assert f"Depth model: {da_folder.resolve()}" in text and "Depth model" not in png_text(generated["dpt"])["parameters"]
    assert parse_parameters_text(text)["depth_model"] == str(da_folder.resolve())
    assert np.abs(pixels(generated["da"]) - pixels(generated["dpt"])).max() > 0
    assert np.array_equal(pixels(generated["again"]), pixels(generated["da"]))
    assert record(generated["again"]) == record(generated["da"])


def test_batch_and_the_page_make_the_files_generate_makes(generated, tiny_checkpoint, da_folder, photo_file, tmp_path):
    """A batch with the default model and a job's own `depth_model`, and the page with its depth-model choice: the same
    pixels and PNG text as `generate`; a job or a choice naming no depth model is refused in words."""
    from minidepth.cli import main
    from minidepth.cli.errors import CLIError
    from minidepth.cli.command import load_pipeline
    from minidepth.cli.serve import Studio
    from minidepth.console import Console
    job = {"image": str(photo_file), "prompt": PROMPT, "steps": 4, "strength": 0.75, "guidance_scale": 6.0, "seed": 7}
    jobs = [{**job, "name": "dpt"}, {**job, "name": "da", "depth_model": str(da_folder)},
            {**job, "name": "bad", "depth_model": "no-such-model"}]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
    assert main(["batch", str(tmp_path / "jobs.jsonl"), "--model", str(tiny_checkpoint), "--device", "cpu", "--quiet",
                 "--out", str(tmp_path / "batch")]) == 1  # one job failed
    manifest = [json.loads(line) for line in (tmp_path / "batch" / "manifest.jsonl").read_text().splitlines()]
    assert [r["status"] for r in manifest] == ["ok", "ok", "error"]
    assert "unknown depth model 'no-such-model'" in manifest[2]["error"]
    for name in ("dpt", "da"):
        assert np.array_equal(pixels(tmp_path / "batch" / f"{name}.png"), pixels(generated[name])), name
        assert png_text(tmp_path / "batch" / f"{name}.png") == png_text(generated[name]), name

    console = Console("test", quiet=True)
    studio = Studio(load_pipeline(tiny_checkpoint, None, "fp32", "cpu", console), str(tiny_checkpoint), None, None,
                    "fp32", "cpu", 1000, console)
    assert studio.depth_choices[:2] == ["dpt-hybrid", "depth-anything-v2-small"]
    for name, choice in (("da", str(da_folder)), ("dpt", "dpt-hybrid")):
        out = studio.generate(str(photo_file), PROMPT, "", 0.75, 4, 6.0, 7, None, 1, None, "", False,
                              depth_model=choice, warn=lambda message: None)
        assert np.array_equal(pixels(out["images"][0]), pixels(generated[name])), f"page, {name}"
        assert png_text(out["images"][0]) == png_text(generated[name]), f"page, {name}"
    with pytest.raises(CLIError, match="unknown depth model 'midas'"):
        studio.generate(str(photo_file), PROMPT, "", 0.75, 4, 6.0, 7, None, 1, None, "", False, depth_model="midas")
    with pytest.raises(CLIError, match="cannot be used with --mode ldm"):
        studio.generate(str(photo_file), PROMPT, "", 0.9, 4, 9.0, 7, None, 1, None, "", False, "ldm",
                        depth_model=str(da_folder))


def test_depth_command_with_another_model_needs_no_checkpoint(da_folder, photo_file, tmp_path):
    from minidepth.cli import main
    from minidepth.depth import estimate_depth
    from minidepth.generation import depth_picture
    assert main(["depth", "--image", str(photo_file), "--depth-model", str(da_folder), "--model",
                 str(tmp_path / "no-checkpoint"), "--out", str(tmp_path / "d.png"), "--raw", str(tmp_path / "r.png"),
                 "--device", "cpu", "--quiet"]) == 0
    model, processor = load_depth_model(da_folder)
    image = PIL.Image.open(photo_file).convert("RGB")
    depth = estimate_depth(image, model, processor, exact=False)
    assert np.array_equal(pixels(tmp_path / "r.png"), np.asarray(depth_picture(depth, image.size, raw16=True)))


def test_command_line_refuses_what_is_no_depth_model(tiny_checkpoint, da_folder, photo_file, tmp_path, capsys):
    from minidepth.cli import main
    base = ["generate", "--image", str(photo_file), "--prompt", PROMPT, "--model", str(tiny_checkpoint),
            "--out", str(tmp_path / "x.png"), "--quiet"]
    for extra, message in [(["--depth-model", "depth-anything-v2"], "did you mean depth-anything-v2-"),
                           (["--depth-model", str(tiny_checkpoint)], "is a pipeline checkpoint"),
                           (["--depth-model", str(da_folder), "--mode", "ldm"], "cannot be used with --mode ldm")]:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("minidepth generate: error: --depth-model") and message in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()
    assert main(["depth", "--image", str(photo_file), "--depth-model", str(tiny_checkpoint / "vae"),
                 "--out", str(tmp_path / "d.png")]) == 2
    assert "has no model_type" in capsys.readouterr().err
    assert main(["tour", "--depth-model", "nope"]) == 2
    assert "unknown depth model 'nope'" in capsys.readouterr().err


def test_tour_shows_the_chosen_depth_model(da_folder, capsys):
    from minidepth.cli import main
    assert main(["tour", "--size", "512x384", "--depth-model", "depth-anything-v2-small"]) == 0
    out = capsys.readouterr().out
    assert "depth (Depth Anything): 24,785,089 parameters" in out and "input pixels (1, 3, 392, 518)" in out
    assert main(["tour", "--size", "64", "--depth-model", str(da_folder)]) == 0
    tiny = sum(p.numel() for p in load_depth_model(da_folder)[0].parameters())
    assert f"depth (Depth Anything): {tiny:,} parameters" in capsys.readouterr().out


def test_train_lora_keeps_a_depth_cache_per_model(tiny_checkpoint, da_folder, tmp_path):
    from minidepth.cli import main
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        photo(48 + 8 * i, 40, seed=i).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(f"a house number {i}")
    cache = tmp_path / "cache"
    common = ["train-lora", "--model", str(tiny_checkpoint), "--data", str(data), "--steps", "1", "--resolution", "32",
              "--depth-cache", str(cache), "--plot", "", "--device", "cpu", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "da.safetensors"), "--depth-model", str(da_folder)]) == 0
    key = depth_model_key(str(da_folder))
    da = sorted(cache.glob(f"*-{key}.npy"))
    assert len(da) == 2 and len(list(cache.glob("*.npy"))) == 2
    assert main([*common, "--out", str(tmp_path / "dpt.safetensors")]) == 0
    dpt = sorted(set(cache.glob("*.npy")) - set(da))
    assert len(dpt) == 2 and all(key not in p.name for p in dpt)
    model, processor = load_depth_model(da_folder)
    from minidepth.depth import estimate_depth
    with PIL.Image.open(data / "img0.png") as img:
        expected = estimate_depth(img.convert("RGB"), model, processor)[0].numpy()
    assert np.array_equal(np.load(da[0]), expected) and np.load(dpt[0]).shape == (384, 384)
    assert main([*common, "--out", str(tmp_path / "x.safetensors"), "--depth-model", "nope"]) == 2


# ------------------------------------------------------------------------------------------------ the benchmark
def test_benchmark_script_smoke_run(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("depth_models_benchmark", REPO / "benchmarks" / "depth_models.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--steps", "2", "--repeats", "1", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["models"]) == {"dpt-hybrid", "depth-anything-v2-small"}
    assert all(r["depth_median_s"] > 0 for r in results["models"].values())
    for name in ("depths.png", "images.png", "depth-dpt-hybrid.png", "depth-depth-anything-v2-small.png"):
        assert (tmp_path / name).is_file()
