"""minidepth.models.unet against diffusers' UNet2DConditionModel on the same checkpoint files and inputs."""

from __future__ import annotations

import copy
import gc
import json
import warnings

from pathlib import Path

import pytest
import torch

from factory import cached_checkpoint, component_folder, unet_config
from minidepth.checkpoints import CheckpointError, build_on_meta, export_state_dict
from minidepth.models.attention import CaptureAttentionMaps, set_attention_backend, set_attention_processor
from minidepth.checkpoints.diffusers_format import UNET_KEYS as DIFFUSERS_KEYS
from minidepth.checkpoints.diffusers_format import unet_config_from_dict
from minidepth.checkpoints.ldm_format import UNET_KEYS as LDM_KEYS
from minidepth.checkpoints.ldm_format import unet_keymap as ldm_keymap
from minidepth.models.unet import UNet, UNetConfig

KEYS = Path(__file__).parent / "data" / "keys"  # copies of the reference name tables (official checkpoint layout)
OFFICIAL_PARAMS = 865_913_604
# Relative max errors. Against diffusers' UNet on the same input: our model calls the same torch kernels in the same
# order on the same shapes, so the output is bit-identical on any CPU (measured 0 with AVX-512 and AVX2 kernels).
TOL = 0
# Two computations of the same maths in another summation order (attention math vs SDPA, sliced, explicit attention
# maps, other-aligned weights that make the CPU pick other kernels): fp32 rounding of each K-term sum differs by
# ~sqrt(K) eps (eps 1.2e-7; K up to 9 * 64 here: ~3e-6 relative) and compounds over the ~20 layers. Measured <= 3e-6
# (AVX-512 and AVX2 kernels); a wrong formula (scale, softmax axis, slice bounds) changes the output by > 1e-2.
ORDER = 1e-4


def compare(ours: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> float:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    d = (ours.double() - ref.double()).abs()
    rel = (d.max() / ref.double().abs().max()).item()
    print(f"{what}: relative max error {rel:.3e} (max |d| {d.max().item():.3e}, mean |d| {d.mean().item():.3e})")
    assert rel <= tol, f"{what}: relative max error {rel:.3e} > {tol:.0e} (max |d| {d.max().item():.3e}, " \
                       f"mean |d| {d.mean().item():.3e})"
    return rel


def inputs(batch: int, h: int, w: int, context_dim: int, tokens: int = 77, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 5, h, w, generator=g), torch.randn(batch, tokens, context_dim, generator=g)


# ------------------------------------------------------------------------------------------------ tiny tier
@pytest.fixture(scope="module")
def tiny_folder():
    return component_folder("tiny", "unet")


@pytest.fixture(scope="module")
def ours(tiny_folder):
    return UNet.from_pretrained(tiny_folder)


@pytest.fixture(scope="module")
def ref(tiny_folder):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(tiny_folder).eval()


@pytest.mark.parametrize("h,w", [(16, 24), (12, 20), (9, 13)])
def test_matches_diffusers_any_latent_size(ours, ref, h, w):
    sample, ctx = inputs(2, h, w, 32)
    with torch.no_grad():
        compare(ours(sample, 981, ctx), ref(sample, 981, ctx).sample, TOL, f"tiny {h}x{w}")


@pytest.mark.parametrize("timestep", [1, 500.5, torch.tensor(981), torch.tensor([981]), torch.tensor([981, 1])],
                         ids=["int", "float", "0-d", "(1,)", "(B,)"])
def test_matches_diffusers_timestep_forms(ours, ref, timestep):
    sample, ctx = inputs(2, 16, 24, 32, seed=1)
    with torch.no_grad():
        compare(ours(sample, timestep, ctx), ref(sample, timestep, ctx).sample, TOL, f"timestep {timestep!r}")


def test_parameters_match_diffusers(ours, ref):
    theirs = ref.state_dict()
    mine = export_state_dict(ours, DIFFUSERS_KEYS)
    assert set(mine) == set(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("backend,slice_size,upcast", [("math", None, False), ("math", None, True),
                                                       ("sliced", "auto", False), ("sliced", "max", False),
                                                       ("sliced", 2, True)])
def test_backends_agree(ours, backend, slice_size, upcast):
    sample, ctx = inputs(2, 9, 13, 32, seed=2)
    with torch.no_grad():
        want = ours(sample, 10, ctx)
        model = copy.deepcopy(ours)
        set_attention_backend(model, backend, slice_size, upcast)
        compare(model(sample, 10, ctx), want, ORDER, f"{backend}/{slice_size}/upcast={upcast} vs sdpa")


def test_sliced_matches_diffusers_sliced(ours, ref):
    sample, ctx = inputs(2, 12, 20, 32, seed=3)
    model, theirs = copy.deepcopy(ours), copy.deepcopy(ref)
    set_attention_backend(model, "sliced", "max")
    theirs.set_attention_slice("max")
    with torch.no_grad():
        compare(model(sample, 3, ctx), theirs(sample, 3, ctx).sample, ORDER,  # diffusers slices with baddbmm
                "sliced 'max' vs diffusers sliced 'max'")


def test_bfloat16_on_cpu(tiny_folder, ours):
    model = UNet.from_pretrained(tiny_folder, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in model.parameters())
    sample, ctx = inputs(2, 16, 24, 32, seed=4)
    with torch.no_grad():
        got = model(sample.bfloat16(), 500, ctx.bfloat16())
        assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
        # .to(dtype) on a loaded model gives the same numbers as loading in that dtype
        converted = copy.deepcopy(ours).to("cpu", torch.bfloat16)
        assert torch.equal(converted(sample.bfloat16(), 500, ctx.bfloat16()), got)
        compare(got.float(), ours(sample, 500, ctx), 5e-2, "bf16 vs fp32 (tiny)")


def test_fp16_variant_and_bin_files(tiny_folder, ours, tmp_path):
    half = UNet.from_pretrained(tiny_folder, variant="fp16")
    assert half.dtype == torch.float16
    assert all(torch.equal(a, b.half()) for a, b in zip(half.state_dict().values(), ours.state_dict().values()))
    as_fp32 = UNet.from_pretrained(tiny_folder, variant="fp16", dtype=torch.float32)
    assert as_fp32.dtype == torch.float32

    (tmp_path / "config.json").write_text((tiny_folder / "config.json").read_text())
    torch.save(export_state_dict(ours, DIFFUSERS_KEYS), tmp_path / "diffusion_pytorch_model.bin")
    from_bin = UNet.from_pretrained(tmp_path)
    sample, ctx = inputs(1, 8, 8, 32, seed=5)
    with torch.no_grad():  # same weights, but safetensors tensors are not 64-byte aligned, pickled ones are: the CPU
        compare(from_bin(sample, 7, ctx), ours(sample, 7, ctx), ORDER, ".bin vs .safetensors")  # other kernels


def test_missing_tensor_is_an_error(tiny_folder, ours, tmp_path):
    (tmp_path / "config.json").write_text((tiny_folder / "config.json").read_text())
    state = export_state_dict(ours, DIFFUSERS_KEYS)
    del state["mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.bias"]
    torch.save(state, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="attn2.to_out.0.bias"):
        UNet.from_pretrained(tmp_path)


def test_ldm_single_file(ours, tmp_path):
    from safetensors.torch import save_file
    cfg = ours.config
    tensors = export_state_dict(ours, ldm_keymap(cfg))
    assert all(k.startswith("model.diffusion_model.") for k in tensors)
    assert "model.diffusion_model.input_blocks.0.0.weight" in tensors  # conv_in
    # the rest of an LDM file is skipped: VAE, text encoder, schedule buffers, EMA bookkeeping
    tensors |= {"first_stage_model.decoder.conv_in.weight": torch.zeros(2), "betas": torch.zeros(10),
                "model_ema.num_updates": torch.tensor(3, dtype=torch.int32), "posterior_mean_coef1": torch.zeros(1)}
    save_file(tensors, str(tmp_path / "tiny-depth.safetensors"))
    loaded = UNet.from_single_file(tmp_path / "tiny-depth.safetensors", cfg)
    sample, ctx = inputs(2, 9, 13, 32, seed=6)
    with torch.no_grad():
        compare(loaded(sample, 5, ctx), ours(sample, 5, ctx), TOL, "LDM single file vs diffusers folder")


def _official_meta():
    return build_on_meta(lambda: UNet(UNetConfig.sd2_depth()))


def _tsv(name):
    return [line.split("\t") for line in (KEYS / name).read_text().splitlines() if line]


def test_official_layout_names_shapes_and_ldm_map():
    """At the official size, on the meta device (no weights): diffusers names + shapes, and every (diffusers, LDM) name
    pair our two maps produce is exactly a row of map_unet_ldm_to_diffusers.tsv."""
    model = _official_meta()
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS
    shapes = {name: json.loads(shape) for name, shape, *_ in _tsv("diffusers_unet.tsv")}
    exported = export_state_dict(model, DIFFUSERS_KEYS)
    assert {k: list(v.shape) for k, v in exported.items()} == shapes
    rows = _tsv("map_unet_ldm_to_diffusers.tsv")
    assert rows[0] == ["target_key", "source_key", "transform"]
    want = {(target, source) for target, source, transform in rows[1:]}
    got = {(DIFFUSERS_KEYS.rule_for(n)[1][0], LDM_KEYS.rule_for(n)[1][0]) for n in model.state_dict()}
    assert len(got) == len(want) == 686
    assert got == want, f"missing {sorted(want - got)[:5]}, extra {sorted(got - want)[:5]}"
    assert set(export_state_dict(model, LDM_KEYS)) == {source for _, source in want}


# -- the research hook on the real UNet --------------------------------------------------------------------------------
def _diffusers_capture(ref, store):
    """A diffusers processor that records the cross-attention probabilities the way its classic processor computes
    them (get_attention_scores), then returns the usual SDPA output."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    class Capture(AttnProcessor2_0):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
            q = attn.head_to_batch_dim(attn.to_q(hidden_states))
            k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
            probs = attn.get_attention_scores(q, k)  # ((B h), L, S)
            store[self.name] = probs.reshape(-1, attn.heads, *probs.shape[1:])
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)

    procs = {name: Capture(name.removesuffix(".processor")) if name.endswith("attn2.processor") else AttnProcessor2_0()
             for name in ref.attn_processors}
    ref.set_attn_processor(procs)


@pytest.mark.filterwarnings("ignore:cross_attention_kwargs")  # the self-attention layers have no processor: expected
def test_capture_cross_attention_maps(ours, ref):
    model, theirs = copy.deepcopy(ours), copy.deepcopy(ref)
    sample, ctx = inputs(2, 12, 20, 32, tokens=9, seed=7)
    capture = CaptureAttentionMaps()
    names = set_attention_processor(model, capture, filter=lambda attn: attn.is_cross_attention)
    assert len(names) == 10 and all(n.endswith("attn2") for n in names)
    want_maps = {}
    _diffusers_capture(theirs, want_maps)
    with torch.no_grad():
        out = model(sample, 300, ctx, cross_attention_kwargs={"step": 3})
        compare(out, ours(sample, 300, ctx), ORDER, "output with the capture processor")
        theirs(sample, 300, ctx)
    assert set(capture.maps) == set(names) == set(want_maps)
    for name in names:
        (probs,) = capture.maps[name]
        assert probs.shape[0] == 2 and probs.shape[-1] == 9
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
        compare(probs, want_maps[name], ORDER, f"attention map {name}")
    assert capture.maps["down_blocks.0.attentions.0.transformer_blocks.0.attn2"][0].shape == (2, 1, 12 * 20, 9)


def test_cross_attention_kwargs_without_processor(ours):
    sample, ctx = inputs(1, 8, 8, 32, seed=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            a = ours(sample, 1, ctx, cross_attention_kwargs={"scale": 1.0})  # LoRA scale 1: silently dropped
            assert not caught
            b = ours(sample, 1, ctx, cross_attention_kwargs={"foo": 1})
    assert torch.equal(a, b)
    assert any("['foo'] are ignored" in str(w.message) for w in caught)


# -- bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,exc,match", [
    (lambda s, c: (s[:, :4], 1, c), ValueError, "sample"),
    (lambda s, c: (s, 1, c[..., :16]), ValueError, "encoder_hidden_states"),
    (lambda s, c: (s, 1, c[:1]), ValueError, "batch"),
    (lambda s, c: (s.double(), 1, c.double()), ValueError, "dtype"),
    (lambda s, c: (s, torch.tensor([1, 2, 3]), c), ValueError, "timestep"),
    (lambda s, c: (s, "1", c), TypeError, "timestep"),
    (lambda s, c: (s, float("nan"), c), ValueError, "timestep"),
])
def test_bad_input(ours, make, exc, match):
    sample, ctx = inputs(2, 8, 8, 32, seed=9)
    with pytest.raises(exc, match=match):
        ours(*make(sample, ctx))


def test_config_from_dict_traps():
    cfg = unet_config_from_dict(unet_config("official"))
    assert cfg == UNetConfig.sd2_depth()
    assert cfg.attention_heads == (5, 10, 20, 20)  # "attention_head_dim" is a head count
    assert unet_config_from_dict(unet_config("tiny")).attention_heads == (1, 2, 2, 2)
    sd1_like = dict(unet_config("official"), attention_head_dim=8)
    assert unet_config_from_dict(sd1_like).attention_heads == (8, 8, 8, 8)
    for key, value in [("upcast_attention", True), ("num_class_embeds", 10), ("act_fn", "gelu")]:
        with pytest.raises(ValueError, match=key):
            unet_config_from_dict(dict(unet_config("official"), **{key: value}))
    with pytest.raises(ValueError, match="mirror"):
        unet_config_from_dict(dict(unet_config("official"), up_block_types=["UpBlock2D"] * 4))
    with pytest.raises(ValueError, match="divisible"):
        UNetConfig(attention_heads=(3, 10, 20, 20))


# ------------------------------------------------------------------------------------------------ official tier
@pytest.fixture(scope="module")
def official():
    """Reference output of diffusers at the official size, computed once; the diffusers model is freed afterwards."""
    from diffusers import UNet2DConditionModel
    folder = cached_checkpoint("official", ("unet",)) / "unet"
    sample, ctx = inputs(2, 16, 24, 1024, seed=10)
    ref = UNet2DConditionModel.from_pretrained(folder).eval()
    with torch.no_grad():
        want = ref(sample, torch.tensor([981, 21]), ctx).sample
    ref_params = sum(p.numel() for p in ref.parameters())
    del ref
    gc.collect()
    yield dict(folder=folder, sample=sample, ctx=ctx, want=want, ref_params=ref_params)
    gc.collect()


@pytest.mark.official
def test_official_matches_diffusers(official):
    model = UNet.from_pretrained(official["folder"])
    try:
        n = sum(p.numel() for p in model.parameters())
        assert n == official["ref_params"] == OFFICIAL_PARAMS
        with torch.no_grad():
            got = model(official["sample"], torch.tensor([981, 21]), official["ctx"])
        compare(got, official["want"], TOL, "official 16x24")
    finally:
        del model
        gc.collect()
