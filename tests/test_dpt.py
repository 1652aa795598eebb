"""DPT-Hybrid depth estimator: parity with transformers' DPTForDepthEstimation on identical weights, key maps, config.

Tiny tier (default): the tiny random checkpoint from tests/factory.py. Official tier: the real architecture size with
random weights (built once per cache folder), plus meta-device checks of names, shapes and the parameter count.
"""

from __future__ import annotations

import gc
from pathlib import Path

import factory
import pytest
import torch
from safetensors.torch import load_file, save_file

from minidepth.checkpoints import CheckpointError, build_on_meta, export_state_dict, load_weights
from minidepth.checkpoints.ldm_format import DEPTH_MODEL_KEYS as LDM_KEYS
from minidepth.checkpoints.ldm_format import MIDAS_KEYS
from minidepth.checkpoints.transformers_format import DPT_KEYS as TRANSFORMERS_KEYS
from minidepth.checkpoints.transformers_format import dpt_config_from_dict
from minidepth.models.dpt import DPTConfig, DPTDepthModel

KEYS = Path(__file__).parent / "data" / "keys"
OFFICIAL_PARAMETERS = 122_377_985
# Relative bound against transformers' DPT on the same input: our model calls the same torch kernels in the same order
# on the same shapes, so the outputs are bit-identical on any CPU (measured 0 with AVX-512 and AVX2 kernels).
EXACT = 0


def compare(ours: torch.Tensor, ref: torch.Tensor, rel_tol: float, what: str) -> float:
    """Assert max |ours - ref| <= rel_tol * max |ref|; returns the relative error. Prints max and mean differences."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    diff = (ours.double() - ref.double()).abs()
    scale = ref.double().abs().max().item()
    rel = diff.max().item() / scale
    print(f"{what}: max abs diff {diff.max().item():.3e}, mean abs diff {diff.mean().item():.3e}, "
          f"max |ref| {scale:.3e}, rel {rel:.3e}")
    assert rel <= rel_tol, f"{what}: relative max error {rel:.3e} > {rel_tol:.0e} (max abs {diff.max().item():.3e})"
    return rel


def photo_batch(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth colour gradients + noise in [-1, 1]: the kind of input the preprocessor produces."""
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(-1, 1, height)[:, None]
    x = torch.linspace(-1, 1, width)[None, :]
    base = torch.stack([torch.sin(3 * x + y), y.expand(height, width), (x * y)])  # (3, H, W)
    phase = torch.rand(n, 3, 1, 1, generator=g)
    return (base[None] * (0.5 + phase) + 0.2 * torch.randn(n, 3, height, width, generator=g)).clamp(-1, 1)


def reference_features(ref, pixels: torch.Tensor) -> list[torch.Tensor]:
    """transformers' hybrid features the neck consumes: embeddings (position embeddings interpolated) + encoder."""
    emb = ref.dpt.embeddings(pixels, interpolate_pos_encoding=True)
    feats, h = list(emb.intermediate_activations), emb.last_hidden_states
    for i, layer in enumerate(ref.dpt.encoder.layer):
        h = layer(h)
        if i in ref.config.backbone_out_indices[2:]:
            feats.append(h)
    return feats


def load_pair(folder: Path):
    from transformers import DPTForDepthEstimation
    return DPTDepthModel.from_pretrained(folder), DPTForDepthEstimation.from_pretrained(folder).eval()


# ------------------------------------------------------------------------------------------------ config
def test_from_dict_of_the_official_config_is_the_preset():
    cfg = dpt_config_from_dict(factory.official_config("depth_estimator_config.json"))
    assert cfg == DPTConfig.sd2_depth()
    assert cfg.layer_norm_eps == 1e-12 and cfg.vit_out_indices == (8, 11) and cfg.stage_widths == (256, 512, 1024)


def test_from_dict_of_the_tiny_config():
    cfg = dpt_config_from_dict(factory.depth_estimator_config("tiny"))
    assert (cfg.stem_width, cfg.stage_widths, cfg.stage_depths, cfg.num_groups) == (8, (16, 32, 64), (1, 1, 1), 8)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.mlp_size) == (32, 4, 4, 37)
    assert cfg.vit_out_indices == (2, 3) and cfg.neck_sizes == (16, 32, 32, 32) and cfg.fusion_size == 16


@pytest.mark.parametrize("key, value", [("readout_type", "add"), ("is_hybrid", False),
                                        ("use_batch_norm_in_fusion_residual", True), ("hidden_act", "relu")])
def test_from_dict_rejects_what_it_does_not_implement(key, value):
    d = factory.official_config("depth_estimator_config.json")
    d[key] = value
    with pytest.raises(ValueError, match=key):
        dpt_config_from_dict(d)


def test_config_rejects_inconsistent_neck_sizes():
    with pytest.raises(ValueError, match="neck_sizes"):
        DPTConfig(neck_sizes=(128, 512, 768, 768))


# ------------------------------------------------------------------------------------------------ tiny parity
@pytest.fixture(scope="module")
def tiny_pair():
    return load_pair(factory.component_folder("tiny", "depth_estimator"))


def test_tiny_depth_matches_transformers_at_384(tiny_pair):
    ours, ref = tiny_pair
    pixels = photo_batch(2, 384, 384)
    with torch.no_grad():
        expected = ref(pixels).predicted_depth
        got = ours(pixels)
    assert (expected > 0).float().mean() > 0.5 and expected.std() > 1e-3, "degenerate reference depth"
    compare(got, expected, EXACT, "tiny predicted_depth 384x384")
    assert ours.num_parameters() == sum(p.numel() for p in ref.parameters())


def test_tiny_backbone_features_non_square(tiny_pair):
    ours, ref = tiny_pair
    pixels = photo_batch(1, 384, 512, seed=1)
    with torch.no_grad():
        with pytest.raises(ValueError, match="doesn't match"):  # transformers' hybrid only takes 384x384 ...
            ref.dpt.embeddings(pixels)
        expected = reference_features(ref, pixels)  # ... unless asked to interpolate the position embeddings
        features, grid = ours.backbone(pixels)
        depth = ours(pixels)
    assert grid == (24, 32)
    names = ["BiT stage 1", "BiT stage 2", "ViT block 2", "ViT block 3"]
    for name, got, exp in zip(names, features, expected):
        compare(got, exp, EXACT, f"tiny {name} 384x512")
    assert depth.shape == (1, 384, 512) and torch.isfinite(depth).all()


def test_fp16_variant_loads(tiny_pair):
    ours, _ = tiny_pair
    folder = factory.component_folder("tiny", "depth_estimator")
    half = DPTDepthModel.from_pretrained(folder, variant="fp16")
    assert half.dtype == torch.float16
    upcast = DPTDepthModel.from_pretrained(folder, variant="fp16", dtype=torch.float32)
    pixels = photo_batch(1, 384, 384, seed=2)
    with torch.no_grad():
        compare(upcast(pixels), ours(pixels), 2e-2, "fp16 weights upcast vs fp32 weights")


@pytest.mark.parametrize("shape", [(1, 3, 384), (1, 4, 384, 384), (1, 3, 380, 384)])
def test_bad_pixel_values(tiny_pair, shape):
    with pytest.raises(ValueError, match="pixel_values"):
        tiny_pair[0](torch.zeros(shape))


# ------------------------------------------------------------------------------------------------ key maps
def test_transformers_export_reproduces_the_hub_file(tiny_pair):
    path = factory.component_folder("tiny", "depth_estimator") / "model.safetensors"
    stored = load_file(str(path))
    exported = export_state_dict(tiny_pair[0], TRANSFORMERS_KEYS)
    assert sorted(exported) == sorted(stored)
    assert all(torch.equal(exported[k], stored[k]) for k in stored)


def test_loading_is_strict(tiny_pair, tmp_path):
    stored = export_state_dict(tiny_pair[0], TRANSFORMERS_KEYS)
    cfg = tiny_pair[0].config
    missing = dict(stored)
    del missing["neck.fusion_stage.layers.0.residual_layer1.convolution1.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="residual_layer1"):
        load_weights(build_on_meta(lambda: DPTDepthModel(cfg)), tmp_path / "missing.safetensors", TRANSFORMERS_KEYS)
    extra = dict(stored, **{"dpt.pooler.dense.weight": torch.zeros(2, 2)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="pooler"):
        load_weights(build_on_meta(lambda: DPTDepthModel(cfg)), tmp_path / "extra.safetensors", TRANSFORMERS_KEYS)


def test_midas_named_files_round_trip(tiny_pair, tmp_path):
    ours = tiny_pair[0]
    midas = export_state_dict(ours, MIDAS_KEYS)
    assert "pretrained.act_postprocess4.4.weight" in midas and "scratch.refinenet4.out_conv.bias" in midas
    classifier = {"pretrained.model.head.weight": torch.randn(10, 32), "pretrained.model.head.bias": torch.randn(10)}
    save_file({**midas, **classifier}, str(tmp_path / "dpt_hybrid_midas.safetensors"))
    save_file({f"depth_model.model.{k}": v for k, v in {**midas, **classifier}.items()},
              str(tmp_path / "single_file.safetensors"))
    pixels = photo_batch(1, 384, 384, seed=3)
    with torch.no_grad():
        expected = ours(pixels)
    for name, keymap in (("dpt_hybrid_midas", MIDAS_KEYS), ("single_file", LDM_KEYS)):
        model = load_weights(build_on_meta(lambda: DPTDepthModel(ours.config)),
                             tmp_path / f"{name}.safetensors", keymap).eval()
        with torch.no_grad():
            assert torch.equal(model(pixels), expected), name


def _tsv(name: str) -> dict[str, list[int]]:
    rows = (line.rstrip("\n").split("\t") for line in (KEYS / name).read_text().splitlines() if line.strip())
    return {r[0]: [int(s) for s in r[1].strip("[]").split(",") if s.strip()] for r in rows}


def test_official_names_shapes_and_parameter_count_on_meta():
    model = build_on_meta(lambda: DPTDepthModel(DPTConfig.sd2_depth()))
    assert model.num_parameters() == OFFICIAL_PARAMETERS
    for keymap, tsv in ((TRANSFORMERS_KEYS, "transformers_dpt_hybrid.tsv"),
                        (MIDAS_KEYS, "midas_dpt_hybrid_original.tsv")):
        expected = {k: v for k, v in _tsv(tsv).items() if not keymap.is_ignored(k)}
        exported = {k: list(v.shape) for k, v in export_state_dict(model, keymap).items()}
        assert exported == expected, keymap.name
    assert len(_tsv("transformers_dpt_hybrid.tsv")) == 414 and len(_tsv("midas_dpt_hybrid_original.tsv")) == 368


# ------------------------------------------------------------------------------------------------ official tier
@pytest.fixture(scope="module")
def official():
    """transformers' outputs at the official size, computed once and its model freed; then our model (one
    official-size model in memory at a time)."""
    from transformers import DPTForDepthEstimation
    folder = factory.cached_checkpoint("official", ("depth_estimator",)) / "depth_estimator"
    square, wide = photo_batch(1, 384, 384, seed=4), photo_batch(1, 384, 512, seed=5)
    ref = DPTForDepthEstimation.from_pretrained(folder).eval()
    with torch.no_grad():
        want = dict(depth=ref(square).predicted_depth, features=reference_features(ref, wide),
                    parameters=sum(p.numel() for p in ref.parameters()))
    del ref
    gc.collect()
    ours = DPTDepthModel.from_pretrained(folder)
    yield ours, dict(square=square, wide=wide, **want)
    del ours
    gc.collect()


@pytest.mark.official
def test_official_depth_matches_transformers_at_384(official):
    ours, ref = official
    assert ours.num_parameters() == OFFICIAL_PARAMETERS == ref["parameters"]
    expected = ref["depth"]
    with torch.no_grad():
        got = ours(ref["square"])
    assert (expected > 0).float().mean() > 0.5 and expected.std() > 1e-3, "degenerate reference depth"
    compare(got, expected, EXACT, "official predicted_depth 384x384")


@pytest.mark.official
def test_official_backbone_features_non_square(official):
    ours, ref = official
    with torch.no_grad():
        features, grid = ours.backbone(ref["wide"])
    assert grid == (24, 32)
    names = ["BiT stage 1", "BiT stage 2", "ViT block 8", "ViT block 11"]
    for name, got, exp in zip(names, features, ref["features"]):
        compare(got, exp, EXACT, f"official {name} 384x512")


@pytest.mark.parametrize("shape", [(1, 3, 384, 384), (2, 3, 100, 132)])
def test_bit_resnet_equals_timm_resnetv2(shape):
    """Our BiT ResNet against timm's ResNetV2 as the original MiDaS code builds it: same names (strict load), same
    numbers (0 difference) after the stem and every stage, "SAME" padding on odd sizes included."""
    from functools import partial

    from timm.layers import GroupNormAct, StdConv2dSame
    from timm.models.resnetv2 import ResNetV2

    from minidepth.models.bit_resnet import BiTResNet
    torch.manual_seed(0)
    ref = ResNetV2(layers=(2, 2, 2), channels=(32, 64, 128), stem_chs=16, num_classes=0, global_pool="",
                   preact=False, stem_type="same", conv_layer=partial(StdConv2dSame, eps=1e-8),
                   norm_layer=partial(GroupNormAct, num_groups=8)).eval()
    for p in ref.parameters():
        p.data.normal_(0, 0.5)
    ours = BiTResNet((2, 2, 2), (32, 64, 128), 16, 8).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(*shape)
    with torch.no_grad():
        a, b = ref.stem(x), ours.stem(x)
        diffs = [(a - b).abs().max().item()]
        for ref_stage, our_stage in zip(ref.stages, ours.stages):
            a, b = ref_stage(a), our_stage(b)
            diffs.append((a - b).abs().max().item())
    assert diffs == [0.0] * 4, f"max abs diff after the stem and each stage: {diffs}"
