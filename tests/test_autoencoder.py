"""KL autoencoder: live parity with diffusers' AutoencoderKL on identical weights (tiny tier by default, the real
architecture behind `@pytest.mark.official`), key maps against the reference tensor lists, random draws, switches."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.utils.torch_utils import randn_tensor as diffusers_randn_tensor
from safetensors.torch import save_file

from factory import cached_checkpoint, component_folder, vae_config
from minidepth.checkpoints import CheckpointError, build_on_meta, export_state_dict
from minidepth.models.attention import set_attention_backend
from minidepth.checkpoints.diffusers_format import VAE_KEYS as DIFFUSERS_KEYS
from minidepth.checkpoints.diffusers_format import VAE_LEGACY_KEYS as DIFFUSERS_LEGACY_KEYS
from minidepth.checkpoints.diffusers_format import vae_config_from_dict, vae_config_to_dict
from minidepth.checkpoints.ldm_format import VAE_KEYS as LDM_KEYS
from minidepth.models.autoencoder import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian, randn_tensor

KEYS = Path(__file__).parent / "data" / "keys"
# Relative max errors. Against diffusers' AutoencoderKL on the same input: our model calls the same torch kernels in
# the same order on the same shapes, so the output is bit-identical on any CPU (measured 0 with AVX-512 and AVX2).
REL = 0
# Two computations of the same maths in another summation order (attention math vs SDPA, one image at a time vs a
# batch, which other kernel blocking): fp32 rounding of each K-term sum differs by ~sqrt(K) eps (eps 1.2e-7, K up to
# 9 * 64: ~3e-6 relative) and compounds over the layers. Measured <= 3.9e-6 (AVX-512 and AVX2 kernels); a wrong
# formula or a tile/slice put back in the wrong place changes the output by > 1e-2.
ORDER = 1e-4


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str, rel: float = REL) -> float:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    d = (ours.double() - ref.double()).abs()
    err = rel_error(ours, ref)
    assert err <= rel, (f"{what}: relative max error {err:.3e} > {rel:g} "
                        f"(max abs diff {d.max().item():.3e}, mean abs diff {d.mean().item():.3e})")
    return err


def images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def latents(batch: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(seed))


def load_pair(folder, **kwargs):
    ours = AutoencoderKL.from_pretrained(folder, **kwargs)
    ref = DiffusersAutoencoderKL.from_pretrained(folder, **kwargs).eval()
    return ours, ref


@pytest.fixture(scope="module")
def tiny_folder() -> Path:
    return component_folder("tiny", "vae")


@pytest.fixture()
def pair(tiny_folder):
    """Fresh models per test, since tests flip the slicing / tiling / attention switches."""
    return load_pair(tiny_folder)


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("size", [(64, 96), (72, 40), (37, 53)])
@torch.no_grad()
def test_encoder_matches_diffusers(pair, size):
    ours, ref = pair
    x = images(2, *size)
    p, q = ours.encode(x), ref.encode(x).latent_dist
    assert_close(p.mean, q.mean, f"posterior mean at {size}")
    assert_close(p.logvar, q.logvar, f"posterior logvar at {size}")
    assert_close(p.std, q.std, f"posterior std at {size}")
    assert_close(p.var, q.var, f"posterior var at {size}")


@pytest.mark.parametrize("size", [(8, 12), (9, 5)])
@torch.no_grad()
def test_decoder_matches_diffusers(pair, size):
    ours, ref = pair
    z = latents(2, *size)
    out = ours.decode(z)
    assert out.shape == (2, 3, 8 * size[0], 8 * size[1])
    assert_close(out, ref.decode(z).sample, f"decoded image from latents {size}")
    assert_close(ours(images(1, 32, 48)), ref(images(1, 32, 48)).sample, "forward (reconstruction via the mode)")


@torch.no_grad()
def test_posterior_sample_draws_diffusers_noise(pair):
    """Same moments + same generator(s) -> bit-identical samples, for every way the pipeline draws."""
    ours, ref = pair
    x = images(2, 64, 96)
    q = ref.encode(x).latent_dist
    p = DiagonalGaussian(q.parameters)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (7, 8)]  # noqa: E731
    assert torch.equal(p.sample(torch.Generator().manual_seed(3)), q.sample(torch.Generator().manual_seed(3)))
    assert torch.equal(p.sample(gens()), q.sample(gens()))  # a list: one (1, ...) draw per sample
    assert torch.equal(p.sample([torch.Generator().manual_seed(5)]), q.sample([torch.Generator().manual_seed(5)]))
    assert torch.equal(p.mode(), q.mode())
    # end to end from images: single generator, and the pipeline's per-sample encode with a generator list
    ours_z = ours.encode(x).sample(torch.Generator().manual_seed(3))
    assert_close(ours_z, ref.encode(x).latent_dist.sample(torch.Generator().manual_seed(3)), "sample(generator)")
    ours_z = torch.cat([ours.encode(x[i:i + 1]).sample(g) for i, g in enumerate(gens())])
    ref_z = torch.cat([ref.encode(x[i:i + 1]).latent_dist.sample(g) for i, g in enumerate(gens())])
    assert_close(ours_z, ref_z, "per-sample encode + sample(generator[i])")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_randn_tensor_matches_diffusers(dtype):
    shape = (3, 4, 5, 6)
    for make in (lambda: None, lambda: torch.Generator().manual_seed(11),
                 lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)],
                 lambda: [torch.Generator().manual_seed(4)]):
        torch.manual_seed(0)  # generator=None draws from the global generator
        ours = randn_tensor(shape, generator=make(), device="cpu", dtype=dtype)
        torch.manual_seed(0)
        ref = diffusers_randn_tensor(shape, generator=make(), device=torch.device("cpu"), dtype=dtype)
        assert ours.dtype == dtype and torch.equal(ours, ref)
    with pytest.raises(ValueError, match="list of 2 generators for a batch of 3"):
        randn_tensor(shape, generator=[torch.Generator(), torch.Generator()])


# ------------------------------------------------------------------------------------------------ memory switches
@torch.no_grad()
def test_slicing_matches_diffusers_slicing(pair):
    ours, ref = pair
    x, z = images(3, 40, 24), latents(3, 5, 3)
    plain = ours.encode(x).mean
    ours.enable_slicing()
    ref.enable_slicing()
    assert_close(ours.encode(x).mean, ref.encode(x).latent_dist.mean, "sliced encode")
    assert_close(ours.encode(x).mean, plain, "sliced vs batched encode", ORDER)
    assert_close(ours.decode(z), ref.decode(z).sample, "sliced decode")
    ours.disable_slicing()
    assert not ours.use_slicing


@pytest.mark.parametrize("size", [(64, 96), (80, 56)])
@torch.no_grad()
def test_tiling_matches_diffusers_tiling(pair, size):
    ours, ref = pair
    assert ours.tile_sample_size == ref.tile_sample_min_size == 32  # tiny config: sample_size 32, latent tile 4
    assert ours.tile_latent_size == ref.tile_latent_min_size == 4
    x = images(2, *size)
    z = latents(2, size[0] // 8, size[1] // 8)
    untiled_moments, untiled_image = ours.encode(x).moments, ours.decode(z)
    ours.enable_tiling()
    ref.enable_tiling()
    tiled_moments, tiled_image = ours.encode(x).moments, ours.decode(z)
    # tiling really kicked in (its output differs from the plain pass) ...
    assert (tiled_moments - untiled_moments).abs().max() > 1e-3 and (tiled_image - untiled_image).abs().max() > 1e-3
    # ... and equals diffusers' tiled output
    assert_close(tiled_moments, ref.encode(x).latent_dist.parameters, f"tiled encode at {size}")
    assert_close(tiled_image, ref.decode(z).sample, f"tiled decode at {size}")
    ours.enable_slicing()  # both switches at once: slices first, then tiles
    ref.enable_slicing()
    assert_close(ours.decode(z), ref.decode(z).sample, "sliced + tiled decode")
    ours.disable_tiling()
    assert_close(ours.decode(z), untiled_image, "after disable_tiling", ORDER)  # still sliced: one image at a time


@torch.no_grad()
def test_attention_backends_agree(pair):
    ours, _ = pair
    x, z = images(1, 64, 48), latents(1, 8, 6)
    enc, dec = ours.encode(x).mean, ours.decode(z)
    for backend, kwargs in (("math", {}), ("math", {"upcast": True}), ("sliced", {})):
        set_attention_backend(ours, backend, **kwargs)
        assert_close(ours.encode(x).mean, enc, f"{backend} {kwargs} encode vs sdpa", ORDER)
        assert_close(ours.decode(z), dec, f"{backend} {kwargs} decode vs sdpa", ORDER)


# ------------------------------------------------------------------------------------------------ loading
@torch.no_grad()
def test_fp16_variant_and_dtypes(tiny_folder):
    ours, ref = load_pair(tiny_folder, variant="fp16")
    assert next(ours.parameters()).dtype == torch.float32  # like diffusers: the fp16 file is upcast by default
    x = images(1, 32, 40)
    assert_close(ours.encode(x).mean, ref.encode(x).latent_dist.mean, "fp16-variant weights, fp32 compute")
    half = AutoencoderKL.from_pretrained(tiny_folder, variant="fp16", dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in half.parameters())
    moved = AutoencoderKL.from_pretrained(tiny_folder, variant="fp16").to("cpu", torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in moved.parameters())


@torch.no_grad()
def test_bf16_on_cpu_runs(pair, record_property):
    ours, ref = pair
    x, z = images(1, 64, 48), latents(1, 8, 6)
    enc32, dec32 = ref.encode(x).latent_dist.mean, ref.decode(z).sample
    ours.to(dtype=torch.bfloat16)
    enc16, dec16 = ours.encode(x.bfloat16()).mean, ours.decode(z.bfloat16())
    assert enc16.dtype == dec16.dtype == torch.bfloat16
    assert torch.isfinite(enc16).all() and torch.isfinite(dec16).all()
    e_enc, e_dec = rel_error(enc16, enc32), rel_error(dec16, dec32)
    record_property("bf16_rel_error_encode", e_enc)
    record_property("bf16_rel_error_decode", e_dec)
    print(f"bf16 vs fp32 relative max error: encode mean {e_enc:.3e}, decode {e_dec:.3e}")
    assert e_enc < 0.1 and e_dec < 0.1, (e_enc, e_dec)


@torch.no_grad()
def test_current_names_bin_and_save_pretrained_round_trip(pair, tmp_path):
    ours, ref = pair
    x, z = images(1, 32, 40), latents(1, 4, 5)
    # diffusers writes today's names (to_q/...); as .bin pickle too
    ref.save_pretrained(tmp_path / "current", safe_serialization=True)
    ref.save_pretrained(tmp_path / "bin", safe_serialization=False)
    for sub in ("current", "bin"):
        loaded = AutoencoderKL.from_pretrained(tmp_path / sub)
        assert torch.equal(loaded.decode(z), ours.decode(z)), sub
    # our save_pretrained is a diffusers folder
    ours.save_pretrained(tmp_path / "ours")
    back = DiffusersAutoencoderKL.from_pretrained(tmp_path / "ours").eval()
    assert torch.equal(back.encode(x).latent_dist.parameters, ref.encode(x).latent_dist.parameters)
    assert torch.equal(AutoencoderKL.from_pretrained(tmp_path / "ours").decode(z), ours.decode(z))


def test_a_missing_tensor_is_refused(pair, tmp_path):
    ours, _ = pair
    state = export_state_dict(ours, DIFFUSERS_LEGACY_KEYS)
    del state["decoder.mid_block.attentions.0.query.bias"]
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text((component_folder("tiny", "vae") / "config.json").read_text())
    save_file(state, str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match="query.bias"):
        AutoencoderKL.from_pretrained(tmp_path / "vae")


# ------------------------------------------------------------------------------------------------ key maps
def read_tsv(name: str) -> list[list[str]]:
    return [line.split("\t") for line in (KEYS / name).read_text().splitlines() if line.strip()]


def test_key_maps_at_official_size_match_reference_lists():
    """No weights needed: build on meta, export under each map, compare names and shapes with the real files' lists."""
    model = build_on_meta(lambda: AutoencoderKL(AutoencoderKLConfig.sd2_depth()))
    assert sum(p.numel() for p in model.parameters()) == 83_653_863

    def exported(keymap):
        return {name: list(t.shape) for name, t in export_state_dict(model, keymap).items()}

    for keymap, listing, prefix in ((LDM_KEYS, "ldm_512-depth-ema_first_stage_model_keys.tsv", "first_stage_model."),
                                    (DIFFUSERS_LEGACY_KEYS, "diffusers_vae_legacy_names_as_on_hub.tsv", ""),
                                    (DIFFUSERS_KEYS, "diffusers_vae_current_names.tsv", "")):
        expected = {name: eval(shape) for name, shape, _ in read_tsv(listing)}
        assert all(name.startswith(prefix) for name in expected)
        got = exported(keymap)
        assert set(got) == set(expected), (keymap.name, sorted(set(got) ^ set(expected))[:10])
        bad = {n: (got[n], expected[n]) for n in got if got[n] != expected[n]}
        assert not bad, (keymap.name, bad)
    # the same parameter goes to the tsv's (diffusers target, LDM source) pair
    pairs = set()
    for name in model.state_dict():
        (diffusers_name,) = DIFFUSERS_KEYS.rule_for(name)[1]
        (ldm_name,) = LDM_KEYS.rule_for(name)[1]
        pairs.add((diffusers_name, ldm_name))
    rows = read_tsv("map_vae_ldm_to_diffusers.tsv")
    assert rows[0][:2] == ["target_key", "source_key"]
    assert pairs == {(target, source) for target, source, _ in rows[1:]}
    squeezed = {target for target, _, transform in rows[1:] if transform.startswith("squeeze")}
    assert squeezed == {n for n in (DIFFUSERS_KEYS.rule_for(p)[1][0] for p in model.state_dict()
                                    if LDM_KEYS.rule_for(p)[0].transform == "squeeze") if n.endswith("weight")}


@torch.no_grad()
def test_ldm_single_file_round_trip(pair, tmp_path):
    ours, _ = pair
    tensors = export_state_dict(ours, LDM_KEYS)
    assert tensors["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # stored as a 1x1 conv
    tensors["model.diffusion_model.out.0.bias"] = torch.zeros(3)  # other components of the single file are skipped
    save_file(tensors, str(tmp_path / "512-depth-ema.safetensors"))
    config = vae_config_from_dict(vae_config("tiny"))
    loaded = AutoencoderKL.from_single_file(tmp_path / "512-depth-ema.safetensors", config)
    x, z = images(1, 40, 32), latents(1, 5, 4)
    assert torch.equal(loaded.encode(x).moments, ours.encode(x).moments)
    assert torch.equal(loaded.decode(z), ours.decode(z))


# ------------------------------------------------------------------------------------------------ config and errors
def test_config_from_dict():
    official = vae_config_from_dict(vae_config("official"))
    assert official == AutoencoderKLConfig.sd2_depth()
    assert official.scaling_factor == 0.18215  # absent from SD2-depth's config.json
    tiny = vae_config_from_dict(vae_config("tiny"))
    assert vae_config_from_dict(vae_config_to_dict(tiny)) == tiny
    sdxl_like = {**vae_config("official"), "scaling_factor": 0.13025}
    assert vae_config_from_dict(sdxl_like).scaling_factor == 0.13025
    # keys left out mean diffusers' defaults (sample_size 32), not SD2's
    no_size = {k: v for k, v in vae_config("official").items() if k != "sample_size"}
    reference_tile = DiffusersAutoencoderKL.from_config(no_size).tile_sample_min_size
    assert vae_config_from_dict(no_size).sample_size == reference_tile == 32
    with pytest.raises(ValueError, match="down_block_types"):
        vae_config_from_dict({**vae_config("official"), "down_block_types": ["DownBlock2D"] * 4})
    with pytest.raises(ValueError, match="unknown config keys"):
        vae_config_from_dict({**vae_config("official"), "latent_chanels": 4})
    with pytest.raises(ValueError, match="shift_factor"):
        vae_config_from_dict({**vae_config("official"), "shift_factor": 0.1159})


def test_bad_inputs_raise_clear_errors(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match=r"x must be images .* 3 channels, got shape \(1, 4, 16, 16\)"):
        ours.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"got shape \(3, 16, 16\)"):
        ours.encode(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match=r"z must be latents .* 4 channels, got shape \(1, 3, 2, 2\)"):
        ours.decode(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="floating-point"):
        ours.decode(torch.zeros(1, 4, 2, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        ours.encode([[0.0]])
    with pytest.raises(ValueError, match="tile_sample_size"):
        ours.enable_tiling(tile_sample_size=0)
    with pytest.raises(ValueError, match="overlap_factor"):
        ours.enable_tiling(overlap_factor=1.0)
    with pytest.raises(ValueError, match="dtype"):
        AutoencoderKL.from_pretrained(component_folder("tiny", "vae"), dtype=torch.int8)


# ------------------------------------------------------------------------------------------------ official size
@pytest.mark.official
@torch.no_grad()
def test_official_parity():
    """One official-size model in memory at a time: diffusers' outputs first (its model freed), then ours."""
    folder = cached_checkpoint("official", ("vae",)) / "vae"
    x, z = images(1, 64, 96), latents(1, 8, 12)
    ref = DiffusersAutoencoderKL.from_pretrained(folder).eval()
    q = ref.encode(x).latent_dist
    want = dict(parameters=sum(p.numel() for p in ref.parameters()), decoded=ref.decode(z).sample,
                sample=q.sample(torch.Generator().manual_seed(0)))
    del ref
    gc.collect()
    assert torch.equal(DiagonalGaussian(q.parameters).sample(torch.Generator().manual_seed(0)), want["sample"])
    ours = AutoencoderKL.from_pretrained(folder)
    assert sum(p.numel() for p in ours.parameters()) == want["parameters"] == 83_653_863
    p = ours.encode(x)
    e_mean = assert_close(p.mean, q.mean, "official posterior mean 64x96")
    e_logvar = assert_close(p.logvar, q.logvar, "official posterior logvar 64x96")
    e_dec = assert_close(ours.decode(z), want["decoded"], "official decode 8x12")
    print(f"official VAE relative max errors: mean {e_mean:.3e}, logvar {e_logvar:.3e}, decode {e_dec:.3e}")
    assert_close(p.sample(torch.Generator().manual_seed(0)), want["sample"], "official posterior sample")
    del ours
    gc.collect()
