"""Depth Anything V2: parity with transformers' DepthAnythingForDepthEstimation on identical random weights, the key
map both ways, the config translation, the packaged configs and the preprocessing.

Reference networks are built from configs with transformers (seeded random weights, every parameter jittered, the last
bias shifted so the depth map is mostly positive: a ReLU output of zeros would make parity meaningless), saved with
transformers' `save_pretrained`, and loaded with our `from_pretrained`. Exact mode: the expected difference is 0.0 in
float32 on the CPU (same ops in the same order, same memory layouts). Tiny configs always run; the published Small /
Base / Large sizes are `official`, one model pair in memory at a time.
"""

from __future__ import annotations

import copy
import gc
import json

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from minidepth.checkpoints import CheckpointError, build_on_meta, export_state_dict, load_weights
from minidepth.checkpoints.depth_anything_format import (DEPTH_ANYTHING_KEYS, DEPTH_ANYTHING_V5_KEYS,
                                                         depth_anything_config_from_dict,
                                                         depth_anything_config_to_dict, image_processor,
                                                         packaged_config, packaged_folder)
from minidepth.models.depth_anything import DepthAnythingConfig, DepthAnythingV2

# Parameter counts of the published checkpoints (ours = transformers', mask token included; the model cards' 24.8M,
# 97.5M, 335.3M).
OFFICIAL_PARAMETERS = {"small": 24_785_089, "base": 97_470_785, "large": 335_315_649}

# Tiny configs, as transformers' config.json would hold them. Head size 16 (hidden / heads): transformers passes
# SDPA `scale=head_dim**-0.5`, ours lets SDPA compute 1/sqrt(d); both are exact for 16 and 64 (all published sizes).
TINY_BACKBONE = {"model_type": "dinov2", "hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 4,
                 "image_size": 56, "patch_size": 14, "out_indices": [1, 2, 3, 4], "reshape_hidden_states": False,
                 "initializer_range": 0.1}
TINY = {"tiny": {"backbone_config": TINY_BACKBONE, "reassemble_hidden_size": 32, "neck_hidden_sizes": [8, 16, 32, 32],
                 "fusion_hidden_size": 16, "head_hidden_size": 8, "initializer_range": 0.1},
        # six blocks, levels from blocks 2, 3, 5, 6 (like Large: not the last four), no qkv bias, no mask token,
        # MLP ratio 3, a 70-pixel (5 x 5) training grid
        "tiny-skip": {"backbone_config": {**TINY_BACKBONE, "num_hidden_layers": 6, "out_indices": [2, 3, 5, 6],
                                          "qkv_bias": False, "use_mask_token": False, "mlp_ratio": 3,
                                          "image_size": 70},
                      "reassemble_hidden_size": 32, "neck_hidden_sizes": [16, 16, 32, 32], "fusion_hidden_size": 16,
                      "head_hidden_size": 8, "initializer_range": 0.1},
        "tiny-metric": {"backbone_config": TINY_BACKBONE, "reassemble_hidden_size": 32,
                        "neck_hidden_sizes": [8, 16, 32, 32], "fusion_hidden_size": 16, "head_hidden_size": 8,
                        "initializer_range": 0.1, "depth_estimation_type": "metric", "max_depth": 20}}

# (batch, height, width): the training grid (square: no position interpolation), non-square grids (bicubic), a
# larger square grid, sides that are not multiples of 14 (the patch conv drops the rest), batch 2
TINY_INPUTS = [(1, 56, 56), (2, 70, 98), (1, 84, 84), (1, 60, 75), (1, 98, 42)]


def compare(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Exact parity: max |ours - ref| == 0. Prints the max and mean differences either way."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    diff = (ours.double() - ref.double()).abs()
    print(f"{what}: max abs diff {diff.max().item():.3e}, mean abs diff {diff.mean().item():.3e}, "
          f"max |ref| {ref.abs().max().item():.3e}")
    assert diff.max().item() == 0.0, (f"{what}: max abs diff {diff.max().item():.3e}, "
                                      f"mean {diff.mean().item():.3e} (exact mode expects 0)")


def pixels(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """ImageNet-normalised-looking input: smooth colour gradients + noise, roughly in [-2, 2.5]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(-1, 1, height)[:, None]
    x = torch.linspace(-1, 1, width)[None, :]
    base = torch.stack([torch.sin(3 * x + y), y.expand(height, width), x * y])
    return 1.5 * base[None] * (0.5 + torch.rand(batch, 3, 1, 1, generator=g)) + 0.3 * torch.randn(
        batch, 3, height, width, generator=g)


def reference_model(config: dict, seed: int = 0):
    """transformers' DepthAnythingForDepthEstimation from a config dict, random weights (seeded), every parameter
    jittered, and the last conv's bias shifted so about 75% of the relative depth is positive (metric: sigmoid)."""
    from transformers import DepthAnythingConfig as ReferenceConfig
    from transformers import DepthAnythingForDepthEstimation
    torch.manual_seed(seed)
    model = DepthAnythingForDepthEstimation(ReferenceConfig.from_dict(copy.deepcopy(config))).eval()
    g = torch.Generator().manual_seed(seed)
    captured = {}
    hook = model.head.conv3.register_forward_hook(lambda m, i, out: captured.__setitem__("out", out))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
        model(pixels(1, 56, 56, seed=seed + 100))
        model.head.conv3.bias -= captured["out"].float().quantile(0.25)
    hook.remove()
    return model


def reference_folder(config: dict, folder, seed: int = 0):
    """Save a reference model like the hub does (transformers' save_pretrained) and return the folder."""
    model = reference_model(config, seed)
    model.save_pretrained(folder)
    del model
    return folder


def load_reference(folder):
    from transformers import DepthAnythingForDepthEstimation
    return DepthAnythingForDepthEstimation.from_pretrained(folder).eval()


# ------------------------------------------------------------------------------------------------ tiny parity
@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tmp_path_factory):
    folder = reference_folder(TINY[request.param], tmp_path_factory.mktemp(request.param))
    return request.param, folder, DepthAnythingV2.from_pretrained(folder), load_reference(folder)


@pytest.mark.parametrize("shape", TINY_INPUTS, ids=[f"{b}x{h}x{w}" for b, h, w in TINY_INPUTS])
def test_tiny_depth_matches_transformers(tiny, shape):
    name, _, ours, ref = tiny
    x = pixels(*shape, seed=sum(shape))
    with torch.no_grad():
        expected = ref(x).predicted_depth
        got = ours(x)
    assert got.shape == (shape[0], shape[1] // 14 * 14, shape[2] // 14 * 14)
    assert (expected > 0).float().mean() > 0.4 and expected.std() > 1e-4, "degenerate reference depth"
    compare(got, expected, f"{name} predicted_depth {shape}")


def test_tiny_backbone_features_match_transformers(tiny):
    """The four levels the neck reads: the chosen blocks' outputs through the final LayerNorm, CLS token first."""
    name, _, ours, ref = tiny
    x = pixels(1, 70, 112, seed=5)
    with torch.no_grad():
        expected = ref.backbone(x).feature_maps
        features, grid = ours.backbone(x)
    assert grid == (5, 8) and len(features) == len(expected) == 4
    for level, (got, exp) in enumerate(zip(features, expected)):
        compare(got, exp, f"{name} backbone level {level}")


def test_tiny_parameter_count_and_config(tiny):
    name, _, ours, ref = tiny
    assert ours.num_parameters() == sum(p.numel() for p in ref.parameters())
    assert ours.config == depth_anything_config_from_dict(TINY[name])
    assert ours.config.vit_out_indices == ((0, 1, 2, 3) if name != "tiny-skip" else (1, 2, 4, 5))


def test_position_embeddings_interpolate_like_transformers(tiny):
    name, _, ours, ref = tiny
    emb = ref.backbone.embeddings
    grid = ours.config.grid
    for h, w, square in ((grid, grid, True), (grid + 3, grid + 1, False), (2, 9, False), (grid, grid, False)):
        dummy = torch.zeros(1, 1 + h * w, ours.config.hidden_size)
        with torch.no_grad():
            expected = emb.interpolate_pos_encoding(dummy, h * 14, h * 14 if square else w * 14 + 1)
            got = ours.backbone.position_embeddings(h, w, square_input=square)
        compare(got, expected, f"{name} position embeddings {h}x{w}")


# ------------------------------------------------------------------------------------------------ key maps
def test_save_pretrained_reproduces_the_reference_file_and_transformers_loads_it(tiny, tmp_path):
    name, folder, ours, ref = tiny
    ours.save_pretrained(tmp_path)
    stored, written = load_file(str(folder / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert sorted(written) == sorted(stored)
    assert all(torch.equal(written[k], stored[k]) for k in stored)
    again = load_reference(tmp_path)  # transformers reads our config.json and file
    x = pixels(1, 70, 98, seed=9)
    with torch.no_grad():
        compare(again(x).predicted_depth, ours(x), f"{name} ours -> save_pretrained -> transformers")
        compare(again(x).predicted_depth, ref(x).predicted_depth, f"{name} round trip vs original reference")
    assert DepthAnythingV2.from_pretrained(tmp_path).config == ours.config


def test_config_round_trip(tiny):
    cfg = tiny[2].config
    assert depth_anything_config_from_dict(json.loads(json.dumps(depth_anything_config_to_dict(cfg)))) == cfg


def test_loading_is_strict(tiny, tmp_path):
    ours = tiny[2]
    stored = export_state_dict(ours, DEPTH_ANYTHING_KEYS)
    missing = dict(stored)
    del missing["neck.fusion_stage.layers.0.residual_layer1.convolution1.weight"]  # stored though never used
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="residual_layer1"):
        load_weights(build_on_meta(lambda: DepthAnythingV2(ours.config)), tmp_path / "missing.safetensors",
                     DEPTH_ANYTHING_KEYS)
    extra = dict(stored, **{"backbone.pooler.weight": torch.zeros(2)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="pooler"):
        load_weights(build_on_meta(lambda: DepthAnythingV2(ours.config)), tmp_path / "extra.safetensors",
                     DEPTH_ANYTHING_KEYS)


def test_files_with_transformers_5_attention_names_load(tiny, tmp_path):
    name, folder, ours, _ = tiny
    renamed = {k.replace("attention.attention.query", "attention.q_proj")
               .replace("attention.attention.key", "attention.k_proj")
               .replace("attention.attention.value", "attention.v_proj")
               .replace("attention.output.dense", "attention.o_proj"): v
               for k, v in load_file(str(folder / "model.safetensors")).items()}
    assert set(renamed) == set(export_state_dict(ours, DEPTH_ANYTHING_V5_KEYS))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(renamed, str(tmp_path / "model.safetensors"))
    model = DepthAnythingV2.from_pretrained(tmp_path)
    x = pixels(1, 56, 70, seed=3)
    with torch.no_grad():
        compare(model(x), ours(x), f"{name} q_proj-named file")


def test_in_memory_state_dict_maps_one_to_one(tiny):
    """transformers 5's in-memory names (q_proj ...) through DEPTH_ANYTHING_V5_KEYS: every tensor, same values."""
    _, _, ours, ref = tiny
    exported = export_state_dict(ours, DEPTH_ANYTHING_V5_KEYS)
    state = ref.state_dict()
    assert sorted(exported) == sorted(state)
    assert all(torch.equal(exported[k], state[k]) for k in state)


# ------------------------------------------------------------------------------------------------ config traps
def test_packaged_configs_are_the_presets():
    for size in ("small", "base", "large"):
        assert packaged_config(size) == DepthAnythingConfig.preset(size), size
    large = DepthAnythingConfig.large()
    assert large.vit_out_indices == (4, 11, 17, 23) and large.mlp_size == 4096 and large.grid == 37


@pytest.mark.parametrize("size", ["small", "base", "large"])
def test_packaged_configs_build_the_same_network_in_transformers(size):
    """transformers reads the packaged config.json; its network (on the meta device) has our names' counterparts with
    the same shapes, and the published parameter count."""
    from transformers import DepthAnythingConfig as ReferenceConfig
    from transformers import DepthAnythingForDepthEstimation
    cfg = ReferenceConfig.from_json_file(str(packaged_folder(size) / "config.json"))
    with torch.device("meta"):
        ref = DepthAnythingForDepthEstimation(cfg)
    ours = build_on_meta(lambda: DepthAnythingV2(DepthAnythingConfig.preset(size)))
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in export_state_dict(ours, DEPTH_ANYTHING_V5_KEYS).items()} == expected
    assert ours.num_parameters() == OFFICIAL_PARAMETERS[size] == sum(p.numel() for p in ref.parameters())


def test_partial_backbone_config_takes_dinov2_defaults():
    """A backbone_config that leaves keys out gets Dinov2Config's defaults (ViT-B width, 224 image, reshape true),
    exactly as transformers does; without reshape_hidden_states=false the reference neck cannot run: refused."""
    from transformers import DepthAnythingConfig as ReferenceConfig
    d = {"backbone_config": {"model_type": "dinov2", "num_attention_heads": 4, "out_indices": [3, 6, 9, 12],
                             "reshape_hidden_states": False}, "reassemble_hidden_size": 768}
    cfg = depth_anything_config_from_dict(d)
    ref = ReferenceConfig.from_dict(copy.deepcopy(d)).backbone_config
    assert (cfg.hidden_size, cfg.image_size, cfg.num_layers) == (ref.hidden_size, ref.image_size,
                                                                  ref.num_hidden_layers) == (768, 224, 12)
    del d["backbone_config"]["reshape_hidden_states"]
    with pytest.raises(ValueError, match="reshape_hidden_states"):
        depth_anything_config_from_dict(d)


def test_missing_backbone_config_takes_depth_anything_default():
    from transformers import DepthAnythingConfig as ReferenceConfig
    cfg = depth_anything_config_from_dict({})
    ref = ReferenceConfig().backbone_config
    assert cfg.vit_out_indices == tuple(i - 1 for i in ref.out_indices) == (8, 9, 10, 11)
    assert (cfg.hidden_size, cfg.num_heads, cfg.image_size) == (ref.hidden_size, ref.num_attention_heads,
                                                                ref.image_size) == (384, 6, 518)


@pytest.mark.parametrize("change, match", [
    ({"backbone_config": None, "backbone": "vit_small_patch14_dinov2"}, "backbone"),
    ({"backbone_config": {**TINY_BACKBONE, "use_swiglu_ffn": True}}, "use_swiglu_ffn"),
    ({"backbone_config": {**TINY_BACKBONE, "apply_layernorm": False}}, "apply_layernorm"),
    ({"backbone_config": {**TINY_BACKBONE, "out_indices": [0, 1, 2, 3]}}, "stage 0"),
    ({"backbone_config": {**TINY_BACKBONE, "out_features": ["stage1", "stage2", "stage3", "stage9"]}}, "out_features"),
    ({"backbone_config": {**TINY_BACKBONE, "model_type": "vit"}}, "model_type"),
    ({"reassemble_hidden_size": 64}, "reassemble_hidden_size"),
    ({"patch_size": 16}, "patch_size"),
    ({"head_in_index": 0}, "head_in_index"),
    ({"depth_estimation_type": "metric", "max_depth": None}, "max_depth"),
    ({"neck_hidden_sizes": [8, 16, 32]}, "neck level"),
])
def test_from_dict_rejects_what_it_does_not_implement(change, match):
    with pytest.raises(ValueError, match=match):
        depth_anything_config_from_dict({**TINY["tiny"], **change})


def test_out_features_negative_indices_and_null_max_depth():
    bb = {**TINY_BACKBONE, "out_indices": None, "out_features": ["stage1", "stage2", "stage3", "stage4"]}
    assert depth_anything_config_from_dict({**TINY["tiny"], "backbone_config": bb}).vit_out_indices == (0, 1, 2, 3)
    bb = {**TINY_BACKBONE, "out_indices": [-4, -3, -2, -1]}
    assert depth_anything_config_from_dict({**TINY["tiny"], "backbone_config": bb}).vit_out_indices == (0, 1, 2, 3)
    assert depth_anything_config_from_dict({**TINY["tiny"], "max_depth": None}).max_depth == 1.0


@pytest.mark.parametrize("shape", [(1, 3, 56), (1, 4, 56, 56), (1, 3, 13, 56)])
def test_bad_pixel_values(tiny, shape):
    with pytest.raises(ValueError, match="pixel_values"):
        tiny[2](torch.zeros(shape))


# ------------------------------------------------------------------------------------------------ preprocessing
def photo(height: int, width: int) -> PIL.Image.Image:
    """The package's sample photo (a rendered scene) resized to (height, width), with sensor-like noise added so the
    resampling filters see texture at every size."""
    base = PIL.Image.open(packaged_folder().parents[1] / "sample-photo.png").convert("RGB")
    a = np.asarray(base.resize((width, height), PIL.Image.LANCZOS)).astype(np.float64)
    noise = np.random.default_rng(height * 7919 + width).normal(0, 10, a.shape)
    return PIL.Image.fromarray(np.clip(a + noise, 0, 255).astype(np.uint8))


# (height, width): landscape 4:3 (-> 518 x 686), portrait, square, panorama, tiny upscaled, odd sides
PHOTO_SIZES = [(480, 640), (640, 480), (518, 518), (300, 1000), (61, 97), (383, 517)]


@pytest.fixture(scope="module")
def processors():
    from transformers import DPTImageProcessor as Reference
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil
    folder = packaged_folder("small")
    return {"torch": (image_processor("small"), Reference.from_pretrained(folder)),
            "pil": (image_processor("small", backend="pil"), DPTImageProcessorPil.from_pretrained(folder))}


@pytest.mark.parametrize("backend", ["torch", "pil"])
@pytest.mark.parametrize("size", PHOTO_SIZES, ids=[f"{h}x{w}" for h, w in PHOTO_SIZES])
def test_pixel_values_match_transformers(processors, backend, size):
    ours, ref = processors[backend]
    image = photo(*size)
    expected = ref(images=image, return_tensors="pt").pixel_values
    got = ours(image)
    assert got.shape[-2] % 14 == 0 and got.shape[-1] % 14 == 0 and 518 in got.shape[-2:]
    compare(got, expected, f"{backend} preprocessing {size}")


def test_processor_output_sizes():
    cfg = image_processor().config
    assert cfg.output_size(480, 640) == (518, 686)   # the side that moves least becomes 518, then multiples of 14
    assert cfg.output_size(640, 480) == (686, 518)
    # transformers' rule is "scale as little as possible", not the original code's "lower bound" (shorter side 518):
    # a tall 1000 x 300 image shrinks to 518 x 154 (the original: 1736 x 518); a small one grows until its LONGER
    # side is 518 (100 x 150 -> 350 x 518; the original: 518 x 784)
    assert cfg.output_size(1000, 300) == (518, 154)
    assert cfg.output_size(100, 150) == (350, 518)
    assert all(image_processor(s).config == cfg for s in ("base", "large"))


# ------------------------------------------------------------------------------------------------ official sizes
@pytest.mark.official
@pytest.mark.parametrize("size", ["small", "base", "large"])
def test_official_size_matches_transformers(size, tmp_path):
    """The published architecture (random weights): depth at 518 x 518 (the training grid) and at 518 x 686 (the
    processor's output for a 4:3 photo: bicubic position embeddings), exact; the file we write equals transformers'."""
    config = json.loads((packaged_folder(size) / "config.json").read_text())
    folder = reference_folder(config, tmp_path / "reference", seed=7)
    ours, ref = DepthAnythingV2.from_pretrained(folder), load_reference(folder)
    try:
        assert ours.num_parameters() == OFFICIAL_PARAMETERS[size]
        for shape in ((1, 518, 518), (1, 518, 686)):
            x = pixels(*shape, seed=11)
            with torch.no_grad():
                expected = ref(x).predicted_depth
                got = ours(x)
            # (the bias was calibrated on a 56 x 56 input: at 518 about 30-70% of the map stays positive)
            assert (expected > 0).float().mean() > 0.2 and expected.std() > 1e-4, "degenerate reference depth"
            compare(got, expected, f"{size} predicted_depth {shape}")
            del expected, got
        del ref
        gc.collect()
        ours.save_pretrained(tmp_path / "ours")
    finally:
        del ours
        gc.collect()
    assert_same_files(folder / "model.safetensors", tmp_path / "ours" / "model.safetensors")


def assert_same_files(expected_path, written_path) -> None:
    """Same tensor names, and every tensor equal, read one at a time (no second copy of a large model in memory)."""
    from safetensors import safe_open
    with safe_open(str(expected_path), "pt") as expected, safe_open(str(written_path), "pt") as written:
        assert sorted(written.keys()) == sorted(expected.keys())
        names = expected.keys()  # a safetensors handle is not iterable itself
        unequal = [k for k in names if not torch.equal(written.get_tensor(k), expected.get_tensor(k))]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[:5]}"
