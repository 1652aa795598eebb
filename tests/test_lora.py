"""LoRA: every file format against diffusers + peft (the references), on the tiny checkpoint.

The LoRA files are written by tests/lora_files.py (independent code, random weights) or by peft + diffusers'
own `save_lora_weights`; both pipelines load the same file and must give the same image.
"""

import factory
import lora_files
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_pipeline import assert_close, photo

from minidepth.adapters import lora
from minidepth.adapters.formats import LoRAFormatError

# minidepth in exact mode (factory.pipeline_pair) against diffusers + peft with the same LoRA: diffusers' kernels in
# diffusers' order, bit-identical images on any CPU (measured 0 with AVX-512 and AVX2 kernels).
TOL = 0
CALL = {"prompt": "a red house by the sea", "negative_prompt": "blurry", "num_inference_steps": 3, "output_type": "np"}


@pytest.fixture(scope="module")
def pipes(tiny_checkpoint):
    return factory.pipeline_pair(tiny_checkpoint)


@pytest.fixture(scope="module")
def image():
    return photo(64, 64, seed=3)


def run(pipe, image, **kwargs):
    out = pipe(image=image, generator=torch.Generator().manual_seed(0), **{**CALL, **kwargs}).images
    if hasattr(pipe, "_lora_scale"):  # diffusers keeps the last call's scale and applies it to LoRAs loaded later
        del pipe._lora_scale
    return out


@pytest.fixture
def clean(pipes):
    """Both pipelines without adapters after the test, whatever it did."""
    yield pipes
    for p in pipes:
        p.unfuse_lora() if hasattr(p, "_lora_models") else p.unfuse_lora(components=["unet", "text_encoder"])
        p.unload_lora_weights()


@pytest.fixture(scope="module")
def base_image(pipes, image):
    return run(pipes[0], image)


@pytest.fixture(scope="module")
def kohya_file(pipes, tmp_path_factory):
    ref = pipes[1]
    path = tmp_path_factory.mktemp("lora") / "locon.safetensors"
    save_file(lora_files.kohya_lora(ref.unet, ref.text_encoder, seed=0), str(path))
    return path


def load_both(pipes, source, **kwargs):
    for p in pipes:
        p.load_lora_weights(source, **kwargs)


def weights_snapshot(pipe):
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder")
            for k, v in getattr(pipe, c).state_dict().items()}


# ------------------------------------------------------------------------------------------------ parity
def test_kohya_locon_and_text_encoder(clean, image, base_image, kohya_file):
    load_both(clean, kohya_file)
    ours, ref = (run(p, image) for p in clean)
    assert np.abs(ours - base_image).max() > 1e-2, "the LoRA should change the image"
    assert_close(ours, ref, TOL, "kohya LoCon + text encoder")
    ours, ref = (run(p, image, cross_attention_kwargs={"scale": 0.5}) for p in clean)
    assert_close(ours, ref, TOL, "kohya at scale 0.5")


def test_kohya_ldm_names_equal_diffusers_names(clean, image, kohya_file, tmp_path):
    from safetensors.torch import load_file
    ours = clean[0]
    ours.load_lora_weights(kohya_file)
    want = run(ours, image)
    ours.unload_lora_weights()
    ldm = lora_files.to_ldm_names(load_file(str(kohya_file)), dict(clean[1].unet.config))
    assert any("input_blocks" in k for k in ldm)
    ours.load_lora_weights(ldm)
    assert_close(run(ours, image), want, 0, "LDM-named kohya file")


def test_fused_and_back(clean, image, base_image, kohya_file, tiny_checkpoint):
    from diffusers import StableDiffusionDepth2ImgPipeline as Reference
    ours = clean[0]
    ref = Reference.from_pretrained(tiny_checkpoint)  # its own: peft's unfuse subtracts, and rounds the weights
    ref.set_progress_bar_config(disable=True)
    load_both((ours, ref), kohya_file)
    ours.fuse_lora(lora_scale=0.7)
    ref.fuse_lora(components=["unet", "text_encoder"], lora_scale=0.7)
    a, b = run(ours, image), run(ref, image)
    assert_close(a, b, TOL, "fused at 0.7")
    ours.unfuse_lora()
    ours.unload_lora_weights()
    assert_close(run(ours, image), base_image, 0, "unfuse + unload = original")


def test_two_adapters_mixed(clean, image, kohya_file, tmp_path):
    ours, ref = clean
    second = tmp_path / "second.safetensors"
    save_file(lora_files.kohya_lora(ref.unet, ref.text_encoder, seed=1, alpha=4.0, conv_alpha=1.0, unet_only=True),
              str(second))
    load_both(clean, kohya_file, adapter_name="a")
    load_both(clean, second, adapter_name="b")
    # as in diffusers, a load makes its adapter the only active one in the components it touches
    assert next(lora.lora_layers(ours.unet))[1].lora.active == ["b"]
    assert next(lora.lora_layers(ours.text_encoder))[1].lora.active == ["a"]
    assert ours.get_active_adapters() == ref.get_active_adapters() == ["a"]
    for p in clean:
        p.set_adapters(["a", "b"], adapter_weights=[0.6, 0.9])
    assert_close(run(ours, image), run(ref, image), TOL, "set_adapters a 0.6 + b 0.9")
    for p in clean:
        p.set_adapters(["b", "a"], adapter_weights=[{"unet": 0.5}, {"unet": 1.2, "text_encoder": 0.3}])
    assert_close(run(ours, image, cross_attention_kwargs={"scale": 0.8}),
                 run(ref, image, cross_attention_kwargs={"scale": 0.8}), TOL, "per-component weights, scale 0.8")


@pytest.fixture(scope="module")
def peft_folder(pipes, tmp_path_factory):
    """A LoRA made with peft on the reference models and saved by diffusers itself (alpha != rank, in metadata)."""
    from diffusers import StableDiffusionDepth2ImgPipeline as Reference
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel
    checkpoint = factory.cached_checkpoint("tiny")
    unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet")
    text_encoder = CLIPTextModel.from_pretrained(checkpoint / "text_encoder")
    folder = tmp_path_factory.mktemp("peft")
    torch.manual_seed(0)
    unet_cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, rank_pattern={"conv1": 2},
                          target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1",
                                          "time_emb_proj"])
    te_cfg = LoraConfig(r=2, lora_alpha=1, init_lora_weights=False, target_modules=["q_proj", "v_proj", "fc1"])
    unet.add_adapter(unet_cfg, adapter_name="made")
    inject_adapter_in_model(te_cfg, text_encoder, adapter_name="made")  # transformers' add_adapter wants peft 0.22
    with torch.no_grad():
        for name, p in list(unet.named_parameters()) + list(text_encoder.named_parameters()):
            if "lora_B" in name:
                p.mul_(0.5)
    Reference.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet, adapter_name="made"),
                                text_encoder_lora_layers=get_peft_model_state_dict(text_encoder, adapter_name="made"),
                                unet_lora_adapter_metadata=unet_cfg.to_dict(),
                                text_encoder_lora_adapter_metadata=te_cfg.to_dict())
    return folder


def test_diffusers_saved_file(clean, image, base_image, peft_folder):
    load_both(clean, peft_folder)
    ours, ref = (run(p, image) for p in clean)
    assert np.abs(ours - base_image).max() > 1e-2
    assert_close(ours, ref, TOL, "diffusers-saved PEFT file")


def test_old_attention_processor_format(clean, image, peft_folder):
    from safetensors.torch import load_file
    sd = load_file(str(peft_folder / "pytorch_lora_weights.safetensors"))
    old = lora_files.old_format(sd)
    assert any("to_q_lora.down" in k for k in old) and any("lora_linear_layer" in k for k in old)
    # The old format has no alphas (scale 1). diffusers 0.42 reads its text-encoder part only when the file also has
    # `to_out_lora` keys, so compare the UNet part with diffusers, and the whole file with the same weights in PEFT
    # names (no metadata, scale 1 as well).
    unet_part = {k: v for k, v in old.items() if k.startswith("unet.")}
    load_both(clean, unet_part)
    assert_close(run(clean[0], image), run(clean[1], image), TOL, "old attention-processor format")
    ours = clean[0]
    ours.unload_lora_weights()
    ours.load_lora_weights(old)
    got = run(ours, image)
    ours.unload_lora_weights()
    ours.load_lora_weights(sd)  # a dict: no metadata, so alpha = rank as in the old file
    assert_close(got, run(ours, image), 0, "old format = PEFT names")


def test_save_lora_weights_loads_in_diffusers(clean, image, kohya_file, tmp_path):
    ours, ref = clean
    ours.load_lora_weights(kohya_file, adapter_name="k")
    want = run(ours, image, cross_attention_kwargs={"scale": 0.7})
    ours.save_lora_weights(tmp_path)
    ref.load_lora_weights(tmp_path)
    assert_close(run(ref, image, cross_attention_kwargs={"scale": 0.7}), want, TOL, "save_lora_weights -> diffusers")
    ours.unload_lora_weights()
    ours.load_lora_weights(tmp_path)
    assert_close(run(ours, image, cross_attention_kwargs={"scale": 0.7}), want, 0, "save_lora_weights -> minidepth")


# ------------------------------------------------------------------------------------------------ the model stays itself
def test_names_hooks_and_unload(clean, image, base_image, kohya_file):
    ours = clean[0]
    keys = {c: list(getattr(ours, c).state_dict()) for c in ("unet", "text_encoder")}
    modules = {c: dict(getattr(ours, c).named_modules()) for c in ("unet", "text_encoder")}
    ours.load_lora_weights(kohya_file)
    for c in ("unet", "text_encoder"):
        assert list(getattr(ours, c).state_dict()) == keys[c], "state dict names must not change"
    ours.disable_lora()
    assert_close(run(ours, image), base_image, 0, "disable_lora")
    ours.enable_lora()
    assert np.abs(run(ours, image) - base_image).max() > 1e-2
    ours.unload_lora_weights()
    for c in ("unet", "text_encoder"):
        now = dict(getattr(ours, c).named_modules())
        assert now.keys() == modules[c].keys() and all(now[k] is modules[c][k] for k in now)
        assert not any(m._forward_hooks or hasattr(m, "lora") for m in now.values())
    assert_close(run(ours, image), base_image, 0, "after unload")


def test_scale_without_lora_warns(pipes, image):
    with pytest.warns(UserWarning, match="no LoRA layers"):
        run(pipes[0], image, cross_attention_kwargs={"scale": 0.5})
    with pytest.warns(UserWarning, match="lora_scale"):  # a direct UNet call: the strength is the pipeline's (or lora_scale)
        pipes[0].unet(torch.zeros(1, 5, 8, 8), 1, torch.zeros(1, 77, 32), cross_attention_kwargs={"scale": 0.5})


# ------------------------------------------------------------------------------------------------ bad files
def _kohya_small(pipes):
    sd = lora_files.kohya_lora(pipes[1].unet, pipes[1].text_encoder, seed=2)
    return {k: v for k, v in sd.items() if "down_blocks_0" in k or "lora_te_" in k}


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("spoil,match", [
    (lambda sd: {**sd, "lora_unet_down_blocks_0_nonsense.lora_down.weight": torch.zeros(4, 32),
                 "lora_unet_down_blocks_0_nonsense.lora_up.weight": torch.zeros(32, 4)},
     "(?s)match no layer.*lora_unet_down_blocks_0_nonsense"),
    (lambda sd: {**sd, "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.zeros(2, 7, 3, 3)},
     r"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight: shape \[2, 7, 3, 3\]"),
    (lambda sd: {**sd, "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 3)},
     "(?s)rank mismatch.*proj_in"),
    (lambda sd: {**sd, "lora_unet_down_blocks_0_attentions_0_proj_out.weird": torch.zeros(1)},
     "(?s)no LoRA format.*proj_out.weird"),
    (lambda sd: {**sd, "lora_unet_x.hada_w1_a": torch.zeros(1)}, "LoHa"),
    (lambda sd: {**sd, "lora_unet_x.lokr_w1": torch.zeros(1)}, "LoKr"),
    (lambda sd: {**sd, "lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale": torch.zeros(1)}, "DoRA"),
    (lambda sd: {k: v for k, v in sd.items() if not k.endswith("proj_out.lora_up.weight")}, "(?s)up weight.*missing"),
])
def test_bad_lora_files(pipes, spoil, match):
    ours = pipes[0]
    before = weights_snapshot(ours)
    with pytest.raises(LoRAFormatError, match=match):
        ours.load_lora_weights(spoil(_kohya_small(pipes)))
    assert ours.get_list_adapters() == {}
    after = weights_snapshot(ours)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_pickles_only_weights_only(pipes, tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"lora_unet_conv_in.lora_down.weight": torch.zeros(1), "x": Evil()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        pipes[0].load_lora_weights(path)
    assert pipes[0].get_list_adapters() == {}
    good = tmp_path / "good.bin"
    torch.save(_kohya_small(pipes), good)
    pipes[0].load_lora_weights(good)
    assert pipes[0].get_list_adapters() == {"unet": ["default_0"], "text_encoder": ["default_0"]}
    pipes[0].unload_lora_weights()


# ------------------------------------------------------------------------------------------------ official size
@pytest.mark.official
def test_official_size_kohya_locon_text_encoder_and_fuse(tmp_path, own_process):
    """The real SD2-depth architecture (random weights): a kohya LoCon file on every UNet Linear / ResNet conv and the
    text encoder's attention and MLP gives diffusers' image, at scale 1 and 0.5 and fused at 0.7; unfuse + unload give
    back the original image exactly. One pipeline in memory at a time (~5.5 GB each in float32): diffusers' images
    first, then minidepth's. A given depth map: the DPT (which the LoRA does not touch) is never run, so its weights
    are never read into memory. (minidepth's fuse keeps the unfused weights for an exact unfuse: +4.2 GB here.)"""
    if own_process:  # (in a process of its own: tests/conftest.py)
        return
    import gc

    from diffusers import StableDiffusionDepth2ImgPipeline as Reference

    from minidepth import StableDiffusionDepth2ImgPipeline
    folder = factory.cached_checkpoint("official")
    picture = photo(64, 64, seed=3)
    depth = torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(4))
    call = {**CALL, "num_inference_steps": 2, "depth_map": depth}
    half = {**call, "cross_attention_kwargs": {"scale": 0.5}}
    path = tmp_path / "locon.safetensors"

    ref = Reference.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    save_file(lora_files.kohya_lora(ref.unet, ref.text_encoder, seed=0), str(path))
    ref.load_lora_weights(path)
    want = {"scale 1": run(ref, picture, **call), "scale 0.5": run(ref, picture, **half)}
    ref.fuse_lora(components=["unet", "text_encoder"], lora_scale=0.7)
    want["fused at 0.7"] = run(ref, picture, **call)
    del ref
    gc.collect()

    ours = StableDiffusionDepth2ImgPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    ours.set_exact(True)
    base = run(ours, picture, **call)
    ours.load_lora_weights(path)
    a = run(ours, picture, **call)
    assert np.abs(a - base).max() > 1e-2, "the LoRA should change the image"
    assert_close(a, want["scale 1"], TOL, "official kohya LoCon + text encoder")
    assert_close(run(ours, picture, **half), want["scale 0.5"], TOL, "official kohya at scale 0.5")
    ours.fuse_lora(lora_scale=0.7)
    assert_close(run(ours, picture, **call), want["fused at 0.7"], TOL, "official fused at 0.7")
    ours.unfuse_lora()
    ours.unload_lora_weights()
    assert_close(run(ours, picture, **call), base, 0, "official unfuse + unload = original")
    del ours
    gc.collect()


def test_fast_kernels_with_lora(clean, kohya_file):
    """The default fast kernels with a LoCon LoRA attached (forward hooks on convs and Linears, the upsampler convs
    included, which then skip the folded upsampling) and fused: within 1e-3 of exact mode. At 128x128, like the
    scheduler tests in test_fast_kernels.py (measured ~1e-5); at 64x64 the tiny random-weight model amplifies any
    rounding difference to ~4e-3, with or without a LoRA."""
    ours, image = clean[0], photo(128, 128, seed=3)
    ours.load_lora_weights(kohya_file)
    try:
        for fused in (False, True):
            if fused:
                ours.fuse_lora(lora_scale=0.7)
            out = {}
            for exact in (True, False):
                ours.set_exact(exact)
                out[exact] = run(ours, image)
            assert_close(out[False], out[True], tol=1e-3, what=f"fast vs exact, kohya LoCon{', fused' if fused else ''}")
    finally:
        ours.set_exact(True)  # the module's pipelines compare with diffusers
