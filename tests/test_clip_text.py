"""minidepth's CLIPTextModel against the live transformers CLIPTextModel on the same weights and token ids.

Default tier: the tiny test checkpoint. `official`: the real SD2-depth architecture (random weights), once per module.
Key-map tests check our name tables against the tensor lists of the real hub file and the original single file
(`tests/data/keys/`, copied from the project's reference notes) at official size, on the meta device.
"""

from __future__ import annotations

import functools
import gc
import json
from pathlib import Path

import pytest
import torch

from factory import cached_checkpoint, component_folder, text_encoder_config
from minidepth.checkpoints import CheckpointError, build_on_meta, export_state_dict, mapped_state_dict
from minidepth.checkpoints.ldm_format import OPENCLIP_KEYS as OPENCLIP_LDM_KEYS
from minidepth.checkpoints.ldm_format import openclip_keymap as openclip_keys
from minidepth.checkpoints.transformers_format import CLIP_TEXT_KEYS as TRANSFORMERS_KEYS
from minidepth.checkpoints.transformers_format import CLIP_TEXT_V5_KEYS as TRANSFORMERS_V5_KEYS
from minidepth.checkpoints.transformers_format import clip_text_config_from_dict
from minidepth.models.clip_text import CLIPTextConfig, CLIPTextModel
from minidepth.tokenizer import CLIPTokenizer

transformers = pytest.importorskip("transformers")
KEYS = Path(__file__).parent / "data" / "keys"
# Relative max error max|ours - ref| / max|ref|. Our model calls the same torch kernels as transformers' in the same
# order on the same shapes: bit-identical on any CPU (measured 0 with AVX-512 and AVX2 kernels).
TOL = 0
PROMPTS = ["a photograph of an astronaut riding a horse!!", "",
           "a cozy cabin in a snowy forest, warm light, " * 8,  # truncated
           "東京タワーの夜景 🗼 &amp; <b>neon</b>"]
OFFICIAL_PARAMS = 340_387_840


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str, tol: float = TOL) -> float:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    diff = (ours.double() - ref.double()).abs()
    rel = (diff.max() / ref.double().abs().max().clamp_min(1e-30)).item()
    assert rel <= tol, (f"{what}: relative max error {rel:.3e} > {tol:.0e} "
                        f"(max abs diff {diff.max().item():.3e}, mean abs diff {diff.mean().item():.3e})")
    return rel


@functools.lru_cache
def _tokenizer(folder: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(folder)


def tokenize(folder: Path, prompts=PROMPTS, **kwargs):
    tok = _tokenizer(folder.parent / "tokenizer")
    kwargs = kwargs or dict(padding="max_length", max_length=77, truncation=True)
    return tok(prompts, return_tensors="pt", **kwargs)


def outputs(model, ids: torch.Tensor, mask=None) -> dict[str, torch.Tensor]:
    """last_hidden_state, every hidden state and the clip_skip recipe (ours or transformers' model)."""
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
        # clip_skip=1 as the pipeline does it: penultimate layer -> final_layer_norm
        skip = model.final_layer_norm(out.hidden_states[-2])
    return {"last_hidden_state": out.last_hidden_state,
            **{f"hidden_states[{i}]": h for i, h in enumerate(out.hidden_states)},
            "final_layer_norm(hidden_states[-2])": skip}


def compare_outputs(got: dict, want: dict) -> float:
    """assert_close on each output of `outputs`; returns the worst relative error."""
    assert list(got) == list(want)
    return max(assert_close(got[name], want[name], name) for name in want)


def compare_all(ours: CLIPTextModel, ref, ids: torch.Tensor, mask=None) -> float:
    """Both models on the same ids: every output of `outputs`; returns the worst relative error."""
    got = outputs(ours, ids, mask)
    assert len(got) == ours.config.num_layers + 3
    return compare_outputs(got, outputs(ref, ids, mask))


# ------------------------------------------------------------------------------------------------ tiny parity
@pytest.fixture(scope="module")
def folder():
    return component_folder("tiny", "text_encoder")


@pytest.fixture(scope="module")
def ref(folder):
    return transformers.CLIPTextModel.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def ours(folder):
    return CLIPTextModel.from_pretrained(folder)


def test_tiny_parity_every_hidden_state(ours, ref, folder):
    compare_all(ours, ref, tokenize(folder).input_ids)


def test_tiny_parity_with_attention_mask(ours, ref, folder):
    for kwargs in (dict(padding="longest", truncation=True, max_length=77),
                   dict(padding="max_length", max_length=77, truncation=True)):
        enc = tokenize(folder, **kwargs)
        compare_all(ours, ref, enc.input_ids, enc.attention_mask)


def test_tiny_parity_short_sequences(ours, ref):
    """Fewer than 77 positions (e.g. padding="longest"): positions are computed in forward."""
    ids = torch.tensor([[49406, 320, 1929, 49407], [49406, 0, 0, 49407]])
    compare_all(ours, ref, ids)


def test_config_from_dict(ours, ref):
    tiny = clip_text_config_from_dict(text_encoder_config("tiny"))
    assert tiny == ours.config
    assert (tiny.width, tiny.num_layers, tiny.num_heads, tiny.mlp_width) == (32, 3, 4, 37)
    official = json.loads((Path(__file__).parent / "data/sd2-depth-configs/text_encoder_config.json").read_text())
    assert clip_text_config_from_dict(official) == CLIPTextConfig.sd2_depth()
    assert CLIPTextConfig.sd2_depth() == CLIPTextConfig(vocab_size=49408, max_positions=77, width=1024, num_layers=23,
                                                        num_heads=16, mlp_width=4096, hidden_act="gelu", eps=1e-5)
    assert ours.num_parameters() == sum(p.numel() for p in ref.parameters())


def test_quick_gelu_matches_transformers():
    cfg = dict(text_encoder_config("tiny"), hidden_act="quick_gelu")
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg)).eval()
    ours = CLIPTextModel(clip_text_config_from_dict(cfg)).eval()
    ours.load_state_dict(mapped_state_dict(ours, ref.state_dict(), TRANSFORMERS_V5_KEYS))
    compare_all(ours, ref, torch.randint(0, 49408, (2, 77)))


def test_fp16_variant(folder):
    half = CLIPTextModel.from_pretrained(folder, variant="fp16")
    assert half.dtype == torch.float16
    ours = CLIPTextModel.from_pretrained(folder, variant="fp16", dtype=torch.float32)
    ref = transformers.CLIPTextModel.from_pretrained(folder, variant="fp16", dtype=torch.float32).eval()
    assert ours.dtype == torch.float32
    compare_all(ours, ref, tokenize(folder).input_ids)
    for (name, a), b in zip(half.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a.float(), b), name
    with torch.no_grad():  # an fp16 forward runs and stays close to the fp32 one on the same (fp16) weights
        out = half(tokenize(folder).input_ids).last_hidden_state
        full = ours(tokenize(folder).input_ids).last_hidden_state
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert_close(out.float(), full, "float16 forward vs float32 forward", tol=1e-2)


def test_hub_layout_round_trip(ours, ref, folder, tmp_path):
    """save_pretrained writes the hub's `text_model.*` names; both we and transformers load it back exactly."""
    ours.save_pretrained(tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert all(n.startswith("text_model.") for n in names) and len(names) == len(ours.state_dict()), sorted(names)
    again = CLIPTextModel.from_pretrained(tmp_path)
    ref_again = transformers.CLIPTextModel.from_pretrained(tmp_path).eval()
    ids = tokenize(folder).input_ids
    compare_all(again, ref, ids, None)
    compare_all(ours, ref_again, ids, None)


def test_openclip_ldm_names_load_identically(ours, folder, tmp_path):
    """A synthetic single-file checkpoint: fused q/k/v, OpenCLIP names under cond_stage_model.model., one extra
    (dropped) block, text_projection and logit_scale; it must load to the same weights and outputs."""
    from safetensors.torch import load_file, save_file
    ref_tensors = load_file(str(folder / "model.safetensors"))
    n = ours.config.num_layers
    hub = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in ref_tensors.items()}
    ldm = {}
    for line in (KEYS / "map_openclip_ldm_to_transformers_clip.tsv").read_text().splitlines()[1:]:
        target, source, transform = line.split("\t")
        if target == "(dropped)" or source in ldm:
            continue
        layer = target.split(".")[3] if ".layers." in target else None
        if layer is not None and int(layer) >= n:
            continue
        if source.endswith(("in_proj_weight", "in_proj_bias")):  # fuse q, k, v (rows q, k, v)
            base = target.rsplit(".", 2)[0]
            kind = target.rsplit(".", 1)[1]
            ldm[source] = torch.cat([hub[f"{base}.{p}_proj.{kind}"] for p in "qkv"])
        else:
            ldm[source] = hub[target]
    prefix = "cond_stage_model.model."
    extra = {k.replace("resblocks.0.", f"resblocks.{n}."): torch.randn_like(v) for k, v in ldm.items()
             if ".resblocks.0." in k}
    ldm.update(extra)
    ldm[prefix + "text_projection"] = torch.randn(ours.config.width, ours.config.width)
    ldm[prefix + "logit_scale"] = torch.tensor(4.6052)
    save_file(ldm, str(tmp_path / "ldm.safetensors"))

    from minidepth.checkpoints import load_weights
    model = build_on_meta(lambda: CLIPTextModel(ours.config))
    load_weights(model, tmp_path / "ldm.safetensors", openclip_keys(num_layers=n)).eval()
    for (name, a), b in zip(model.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), name
    ids = tokenize(folder).input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, ours(ids).last_hidden_state)
    # the inverse map writes the same fused tensors back
    exported = export_state_dict(model, openclip_keys(num_layers=n))
    assert set(exported) == set(ldm) - set(extra) - {prefix + "text_projection", prefix + "logit_scale"}
    for k, v in exported.items():
        assert torch.equal(v, ldm[k]), k
    # nothing silently skipped: an extra block beyond the dropped one is an error
    ldm[prefix + f"transformer.resblocks.{n + 1}.ln_1.weight"] = torch.ones(ours.config.width)
    save_file(ldm, str(tmp_path / "ldm_bad.safetensors"))
    with pytest.raises(CheckpointError, match=f"resblocks.{n + 1}"):
        load_weights(build_on_meta(lambda: CLIPTextModel(ours.config)), tmp_path / "ldm_bad.safetensors",
                     openclip_keys(num_layers=n))


def test_missing_tensor_is_an_error(folder, tmp_path):
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["text_model.encoder.layers.1.mlp.fc2.bias"]  # the hub names every tensor text_model.*
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="layers.1.mlp.fc2.bias"):
        CLIPTextModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("make, error, words", [
    (lambda: [[49406, 49407]], TypeError, "must be a torch.Tensor"),
    (lambda: torch.zeros(1, 5), TypeError, "integer tensor"),
    (lambda: torch.zeros(5, dtype=torch.long), ValueError, r"shape \(B, L\)"),
    (lambda: torch.zeros(1, 78, dtype=torch.long), ValueError, "at most 77"),
    (lambda: torch.full((1, 3), 49408), ValueError, r"\[0, 49408\)"),
    (lambda: torch.full((1, 3), -1), ValueError, r"\[0, 49408\)"),
], ids=["list", "float", "1d", "too-long", "too-big", "negative"])
def test_bad_input_ids(ours, make, error, words):
    with pytest.raises(error, match=words):
        ours(make())


def test_bad_attention_mask(ours):
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask shape"):
        ours(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="left padding"):
        ours(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]))


def test_bad_config():
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="divisible"):
        CLIPTextConfig(width=1000, num_heads=16)


# ------------------------------------------------------------------------------------------------ key maps vs the real files
def _meta_tensors(tsv: Path) -> dict[str, torch.Tensor]:
    """name -> a meta tensor of the listed shape, for every line `name<TAB>[shape]<TAB>dtype`."""
    out = {}
    for line in tsv.read_text().splitlines():
        name, shape, dtype = line.split("\t")
        out[name] = torch.empty(json.loads(shape), dtype=getattr(torch, dtype), device="meta")
    return out


def test_transformers_keys_cover_the_hub_file():
    """All 373 tensors of the hub's text_encoder/model.safetensors map onto the official-size model (names and shapes)."""
    model = build_on_meta(lambda: CLIPTextModel(CLIPTextConfig.sd2_depth()))
    assert model.num_parameters() == OFFICIAL_PARAMS
    tensors = _meta_tensors(KEYS / "transformers_clip_text_AS_ON_HUB_373_keys_sorted.tsv")
    assert len(tensors) == 373
    state = mapped_state_dict(model, tensors, TRANSFORMERS_KEYS)  # raises on any missing/extra/mis-shaped tensor
    assert len(state) == len(model.state_dict()) == 372


def test_openclip_ldm_keys_cover_the_single_file():
    """All 294 `cond_stage_model.model.*` tensors of 512-depth-ema.safetensors: used or deliberately skipped, and each
    parameter's source and row block agree with the reference table map_openclip_ldm_to_transformers_clip.tsv."""
    model = build_on_meta(lambda: CLIPTextModel(CLIPTextConfig.sd2_depth()))
    tensors = _meta_tensors(KEYS / "ldm_512-depth-ema_cond_stage_model_keys.tsv")
    assert len(tensors) == 294
    mapped_state_dict(model, tensors, OPENCLIP_LDM_KEYS)
    table, dropped = {}, set()
    for line in (KEYS / "map_openclip_ldm_to_transformers_clip.tsv").read_text().splitlines()[1:]:
        target, source, transform = line.split("\t")
        if target == "(dropped)":
            dropped.add(source)
        else:
            table[target] = (source, transform)
    assert dropped == {n for n in tensors if OPENCLIP_LDM_KEYS.is_ignored(n)}
    width = model.config.width
    for name in model.state_dict():
        _, (hub_name,) = TRANSFORMERS_KEYS.rule_for(name)
        rule, (source,) = OPENCLIP_LDM_KEYS.rule_for(name)
        want_source, want_transform = table.pop(hub_name)
        assert source == want_source, (name, source, want_source)
        if rule.transform.startswith("chunk:"):
            k = int(rule.transform[len("chunk:"):].split("/")[0])
            assert want_transform.startswith(f"rows [{k * width}:{(k + 1) * width}]"), (name, want_transform)
        else:
            assert want_transform == "copy", (name, want_transform)
    assert not table, f"reference rows not produced by our map: {sorted(table)[:5]}"


# ------------------------------------------------------------------------------------------------ official size
@pytest.mark.official
def test_official_parity_and_size():
    """One official-size model in memory at a time (1.4 GB each): transformers' outputs first, then ours."""
    folder = cached_checkpoint("official", ("text_encoder",)) / "text_encoder"
    ids = tokenize(folder, PROMPTS[:2]).input_ids  # batch of 2, (2, 77)
    assert ids.shape == (2, 77)
    ref = transformers.CLIPTextModel.from_pretrained(folder).eval()
    want, ref_params = outputs(ref, ids), sum(p.numel() for p in ref.parameters())
    del ref
    gc.collect()
    ours = CLIPTextModel.from_pretrained(folder)
    assert ours.config == CLIPTextConfig.sd2_depth()
    assert ours.num_parameters() == OFFICIAL_PARAMS == ref_params
    worst = compare_outputs(outputs(ours, ids), want)
    del ours
    gc.collect()
    print(f"official CLIP text encoder: worst relative max error {worst:.3e} over 24 hidden states + output")
