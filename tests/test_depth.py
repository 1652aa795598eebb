"""DPT preprocessing, depth estimation and the UNet's depth channel, against the live references:
transformers 5 `DPTImageProcessor` / `DPTImageProcessorPil` and diffusers'
`StableDiffusionDepth2ImgPipeline.prepare_depth_map` (called on a pipeline built from the tiny checkpoint), on identical
weights and inputs."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

import factory
from minidepth.depth import (DPTImageProcessor, DPTProcessorConfig, colorize_depth, depth_tensor, estimate_depth,
                             prepare_depth_map, save_depth_image)
from minidepth.models.dpt import DPTDepthModel

CPU = torch.device("cpu")
# diffusers' prepare_depth_map enters torch.autocast("cpu", float32), which warns and does nothing
pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")


def compare(ours: torch.Tensor, ref: torch.Tensor, tol: float, what: str, relative: bool = False) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    diff = (ours.double() - ref.double()).abs()
    scale = ref.double().abs().max().item() if relative else 1.0
    print(f"{what}: max abs diff {diff.max().item():.3e}, mean abs diff {diff.mean().item():.3e}")
    assert diff.max().item() <= tol * scale, f"{what}: max abs diff {diff.max().item():.3e} (mean {diff.mean():.3e})"


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A synthetic "photograph": smooth colour gradients plus sensor-like noise, uint8 (H, W, 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(3 * x + seed) * 0.5 + 0.5, y, (x + y) / 2], axis=-1) * 200 + 20
    return np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)


SIZES = [(480, 640), (383, 517), (97, 61), (384, 384), (1001, 300), (5, 7)]


def inputs_of(a: np.ndarray) -> dict:
    t = torch.from_numpy(a).permute(2, 0, 1)
    b = photo(*a.shape[:2], seed=7)
    return {"pil": PIL.Image.fromarray(a), "numpy uint8 HWC": a, "numpy float HWC": a.astype(np.float32) / 255,
            "numpy NHWC": np.stack([a, b]), "tensor uint8 CHW": t, "tensor float CHW": t.float() / 255,
            "tensor NCHW": torch.stack([t, torch.from_numpy(b).permute(2, 0, 1)]).float() / 255,
            "list of PIL": [PIL.Image.fromarray(a), PIL.Image.fromarray(b)], "list of tensors": [t, t.flip(-1)]}


# ------------------------------------------------------------------------------------------------ preprocessing
@pytest.fixture(scope="module")
def processors():
    from transformers import DPTImageProcessor as Reference
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil
    folder = factory.cached_checkpoint("tiny", ()) / "feature_extractor"
    return {"torch": (DPTImageProcessor.from_pretrained(folder), Reference.from_pretrained(folder)),
            "pil": (DPTImageProcessor.from_pretrained(folder, backend="pil"),
                    DPTImageProcessorPil.from_pretrained(folder))}


def test_processor_config_is_the_preset():
    cfg = DPTProcessorConfig.from_dict(factory.official_config("feature_extractor_preprocessor_config.json"))
    assert cfg == DPTProcessorConfig.sd2_depth()
    assert cfg.output_size(480, 640) == (384, 384)
    assert DPTProcessorConfig(keep_aspect_ratio=True, ensure_multiple_of=32).output_size(480, 640) == (384, 512)


# every input kind at one odd, non-square size; a PIL image and a float tensor at the other sizes
CASES = [((383, 517), kind) for kind in inputs_of(photo(4, 4))] + [
    (size, kind) for size in SIZES if size != (383, 517) for kind in ("pil", "tensor float CHW")]


@pytest.mark.parametrize("backend", ["torch", "pil"])
@pytest.mark.parametrize("size, kind", CASES, ids=[f"{h}x{w}-{kind}" for (h, w), kind in CASES])
def test_pixel_values_match_transformers(processors, backend, size, kind):
    ours, ref = processors[backend]
    image = inputs_of(photo(*size, seed=size[0]))[kind]
    expected = ref(images=image, return_tensors="pt").pixel_values
    compare(ours(image), expected, 1e-6, f"{backend} {kind} {size}")


def test_backends_differ_only_slightly(processors):
    image = PIL.Image.fromarray(photo(480, 640))
    diff = (processors["torch"][0](image) - processors["pil"][0](image)).abs()
    print(f"torch vs pil backend: max {diff.max():.3e}, mean {diff.mean():.3e}")
    assert 0 < diff.max() < 0.05


def test_float_images_quirk_and_option(processors):
    a = photo(200, 300)
    unit = a.astype(np.float32) / 255
    quirk = processors["torch"][0](unit)
    assert quirk.max() < -0.99  # [0, 1] floats divided by 255 again, as transformers does
    for backend in ("torch", "pil"):
        fixed = DPTImageProcessor(backend=backend, assume_unit_float=True)(unit)
        assert torch.equal(fixed, processors[backend][0](a)), backend  # the same as the uint8 image
    with pytest.raises(ValueError, match="assume_unit_float"):
        DPTImageProcessor(assume_unit_float=True)(unit * 2)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_non_rgb_pil_images_are_converted(processors, mode):
    ours, ref = processors["torch"]
    image = PIL.Image.fromarray(photo(120, 90)).convert(mode)
    expected = ref(images=image.convert("RGB"), return_tensors="pt").pixel_values  # the reference crashes on these
    compare(ours(image), expected, 1e-6, f"PIL {mode}")


@pytest.mark.parametrize("bad, error, match", [
    ("image.png", TypeError, "images"), ([], ValueError, "empty"), (np.zeros((10, 10, 5)), ValueError, "channels"),
    (np.full((10, 10, 3), np.nan), ValueError, "NaN"), (torch.zeros(2, 2, 3, 8, 8), ValueError, "shape"),
    ([PIL.Image.new("RGB", (8, 8)), "x"], TypeError, r"images\[1\]"), (np.zeros((8, 8, 3), bool), TypeError, "dtype")])
def test_bad_images(bad, error, match):
    with pytest.raises(error, match=match):
        DPTImageProcessor()(bad)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        DPTImageProcessor(backend="cv2")


# ------------------------------------------------------------------------------------------------ depth
@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionDepth2ImgPipeline
    return StableDiffusionDepth2ImgPipeline.from_pretrained(factory.cached_checkpoint("tiny")).to("cpu")


@pytest.fixture(scope="module")
def ours():
    root = factory.cached_checkpoint("tiny")
    return (DPTDepthModel.from_pretrained(root / "depth_estimator"),
            DPTImageProcessor.from_pretrained(root / "feature_extractor"))


def ours_prepare(ours, image, depth_map, batch, cfg, dtype=torch.float32, **kw):
    model, processor = ours
    return prepare_depth_map(image, depth_map, batch, cfg, dtype, CPU, depth_estimator=model,
                             feature_extractor=processor, **kw)


def test_estimate_depth_matches_transformers(pipe, ours):
    images = [PIL.Image.fromarray(photo(200, 300, seed=s)) for s in (1, 2)]
    pixel_values = pipe.feature_extractor(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        expected = pipe.depth_estimator(pixel_values).predicted_depth
    compare(estimate_depth(images, *ours, exact=True), expected, 1e-5, "estimate_depth", relative=True)


DETECTED = {
    "one PIL": (lambda: PIL.Image.fromarray(photo(72, 96)), 1, False),
    "one PIL, 3 per prompt, CFG": (lambda: PIL.Image.fromarray(photo(72, 96)), 3, True),
    "two PIL, batch 4, CFG": (lambda: [PIL.Image.fromarray(photo(64, 48, seed=s)) for s in (1, 2)], 4, True),
    "tensor NCHW in [0, 1]": (lambda: torch.from_numpy(np.stack([photo(64, 80), photo(64, 80, 3)])).permute(0, 3, 1, 2)
                              .float() / 255, 2, True),
    "numpy NHWC (square)": (lambda: photo(64, 64)[None].astype(np.float32) / 255, 1, True),
}


@pytest.mark.parametrize("case", DETECTED)
def test_detected_depth_matches_diffusers(pipe, ours, case):
    make, batch, cfg = DETECTED[case]
    expected = pipe.prepare_depth_map(make(), None, batch, cfg, torch.float32, CPU)
    got = ours_prepare(ours, make(), None, batch, cfg)
    assert torch.isfinite(expected).all() and expected.std() > 0.1
    compare(got, expected, 1e-5, f"detected depth, {case}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_detected_depth_under_autocast_matches_diffusers(pipe, ours, dtype):
    image = PIL.Image.fromarray(photo(72, 96))
    expected = pipe.prepare_depth_map(image, None, 2, True, dtype, CPU)  # float32 DPT weights, 16-bit autocast
    got = ours_prepare(ours, image, None, 2, True, dtype=dtype)
    assert got.dtype == expected.dtype == dtype
    compare(got.float(), expected.float(), 1e-2, f"detected depth under {dtype} autocast")


def test_numpy_size_quirk_and_fix(pipe, ours):
    image = photo(64, 96)[None].astype(np.float32) / 255  # NHWC, not square
    expected = pipe.prepare_depth_map(image, None, 1, False, torch.float32, CPU)
    assert expected.shape[-2:] == (12, 8)  # diffusers swaps H and W for numpy input
    compare(ours_prepare(ours, image, None, 1, False), expected, 1e-5, "numpy quirk")
    assert ours_prepare(ours, image, None, 1, False, fix_numpy_size=True).shape[-2:] == (8, 12)


USER = {"one map": (1, 1, False), "one map, batch 3, CFG": (1, 3, True), "two maps": (2, 2, False),
        "two maps, batch 4, CFG": (2, 4, True)}


@pytest.mark.parametrize("case", USER)
def test_user_depth_matches_diffusers_exactly(pipe, ours, case):
    n, batch, cfg = USER[case]
    image = [PIL.Image.fromarray(photo(72, 104))] * n
    depth = torch.rand(n, 50, 70, generator=torch.Generator().manual_seed(n)) * 30 + 2
    expected = pipe.prepare_depth_map(image, depth, batch, cfg, torch.float32, CPU)
    assert torch.equal(ours_prepare(ours, image, depth, batch, cfg), expected)


def test_user_depth_in_other_forms(pipe, ours):
    image = PIL.Image.fromarray(photo(72, 104))
    grey = np.random.default_rng(0).integers(0, 65535, (40, 60)).astype(np.uint16)
    expected = pipe.prepare_depth_map(image, torch.from_numpy(grey.astype(np.float32))[None], 2, True,
                                      torch.float32, CPU)
    forms = {"numpy (H, W) uint16": grey, "tensor (H, W)": torch.from_numpy(grey.astype(np.float32)),
             "tensor (B, 1, H, W)": torch.from_numpy(grey.astype(np.float32))[None, None],
             "PIL I;16": PIL.Image.fromarray(grey), "PIL F": PIL.Image.fromarray(grey.astype(np.float32)),
             "list of numpy": [grey.astype(np.float64)]}
    for name, form in forms.items():
        compare(ours_prepare(ours, image, form, 2, True), expected, 1e-6, name)
    assert PIL.Image.fromarray(grey).mode == "I;16"
    eight = (grey // 257).astype(np.uint8)
    expected = pipe.prepare_depth_map(image, torch.from_numpy(eight.astype(np.float32))[None], 1, False,
                                      torch.float32, CPU)
    compare(ours_prepare(ours, image, PIL.Image.fromarray(eight), 1, False), expected, 1e-6, "PIL L")


def test_flat_depth_gives_zeros_not_nan(pipe, ours):
    image = [PIL.Image.fromarray(photo(64, 64))] * 2
    depth = torch.stack([torch.full((48, 48), 3.0), torch.rand(48, 48, generator=torch.Generator().manual_seed(0))])
    expected = pipe.prepare_depth_map(image, depth, 2, True, torch.float32, CPU)
    assert expected[0].isnan().all() and expected[2].isnan().all()  # the reference's 0 / 0
    got = ours_prepare(ours, image, depth, 2, True)
    assert torch.equal(got[0], torch.zeros_like(got[0])) and torch.equal(got[2], got[0])
    assert torch.equal(got[1], expected[1]) and torch.equal(got[3], expected[3])  # non-flat: bit-identical
    assert ours_prepare(ours, image, depth, 2, True, nan_safe=False).isnan()[[0, 2]].all()


def test_flat_depth_that_the_resize_makes_uneven():
    # bicubic resizing of a constant map is not exactly constant for some sizes: the reference then stretches rounding
    # noise to [-1, 1]; a flat input gives zeros here.
    image = PIL.Image.fromarray(photo(488, 376))
    noisy = prepare_depth_map(image, torch.full((1, 40, 30), 1.3), 1, False, torch.float32, CPU, nan_safe=False)
    assert noisy.max() - noisy.min() > 1  # the reference's behaviour (same ops)
    assert torch.equal(prepare_depth_map(image, torch.full((1, 40, 30), 1.3), 1, False, torch.float32, CPU),
                       torch.zeros(1, 1, 61, 47))


@pytest.mark.parametrize("bad, error, match", [
    (torch.rand(5), ValueError, "shape"), (torch.rand(1, 2, 8, 8), ValueError, "shape"),
    (torch.rand(1, 1, 1, 8, 8), ValueError, "shape"), (torch.rand(3, 8, 8), ValueError, "does not divide"),
    (torch.rand(5, 8, 8), ValueError, "does not divide"), (torch.tensor([[1.0, float("nan")]]), ValueError, "NaN"),
    (torch.tensor([[1.0, float("inf")]]), ValueError, "NaN"), ("depth.png", TypeError, "depth_map"),
    ({"depth": 1}, TypeError, "depth_map"), (torch.zeros(8, 8, dtype=torch.bool), TypeError, "dtype"),
    (PIL.Image.new("RGB", (8, 8)), ValueError, "single-channel"), (torch.rand(0, 8, 8), ValueError, "empty"),
    ([np.zeros((8, 8)), np.zeros((9, 9))], ValueError, "one size")])
def test_bad_depth_maps(bad, error, match):
    image = PIL.Image.fromarray(photo(64, 64))
    with pytest.raises(error, match=match) as info:
        prepare_depth_map(image, bad, 4, True, torch.float32, CPU)
    assert "depth_map" in str(info.value)


def test_missing_depth_estimator_and_tiny_images():
    with pytest.raises(ValueError, match="depth_estimator"):
        prepare_depth_map(PIL.Image.new("RGB", (64, 64)), None, 1, False, torch.float32, CPU)
    with pytest.raises(ValueError, match="image"):
        prepare_depth_map(PIL.Image.new("RGB", (64, 4)), torch.rand(1, 8, 8), 1, False, torch.float32, CPU)


def test_detected_batch_that_does_not_divide(ours):
    images = [PIL.Image.fromarray(photo(64, 64, seed=s)) for s in range(3)]
    with pytest.raises(ValueError, match="`image` gives 3 depth maps"):
        ours_prepare(ours, images, None, 4, False)


def test_depth_tensor_forms():
    assert depth_tensor(np.zeros((4, 5), np.uint8)).shape == (1, 4, 5)
    assert depth_tensor(torch.zeros(2, 1, 4, 5)).shape == (2, 4, 5)
    assert depth_tensor([np.zeros((4, 5)), np.ones((4, 5))]).shape == (2, 4, 5)


# ------------------------------------------------------------------------------------------------ saving
def test_save_depth_image(tmp_path):
    depth = torch.linspace(0, 5, 48 * 64).reshape(1, 48, 64)
    image = save_depth_image(depth, tmp_path / "depth.png", raw16_path=tmp_path / "depth16.png")
    color = np.asarray(PIL.Image.open(tmp_path / "depth.png"))
    assert color.shape == (48, 64, 3) and np.array_equal(color, np.asarray(image))
    assert tuple(color[0, 0]) == (0, 0, 4) and tuple(color[-1, -1]) == (252, 255, 164)  # far dark, near bright
    raw = PIL.Image.open(tmp_path / "depth16.png")
    assert raw.mode == "I;16"
    values = np.asarray(raw).astype(np.int64)
    assert values.min() == 0 and values.max() == 65535 and (np.diff(values.reshape(-1)) >= 0).all()
    assert (colorize_depth(np.full((4, 4), 2.0)) == (0, 0, 4)).all()  # flat: no NaN


@pytest.mark.parametrize("bad, error", [(torch.rand(2, 8, 8), ValueError), (np.full((4, 4), np.nan), ValueError),
                                        ([[1.0]], TypeError)])
def test_save_depth_image_rejects(tmp_path, bad, error):
    with pytest.raises(error, match="depth"):
        save_depth_image(bad, tmp_path / "x.png")
