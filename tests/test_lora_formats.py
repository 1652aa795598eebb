# ruff: noqa: F811  (pytest fixtures imported from test_lora.py are test arguments by the same names)
"""LoRA files and options diffusers + peft read (issue #26 point 4), each against them on the tiny checkpoint:

    kohya text-encoder names without transformers 4's `text_model` level (lora_te_encoder_layers_0_...)
    a Hub repo id with weight_name=, cached like the checkpoints (an offline Hub cache laid out as huggingface_hub does)
    block-wise adapter weights {"unet": {"down": ..., "mid": ..., "up": {"block_1": [...]}}}
    rsLoRA (peft's use_rslora: scale alpha / sqrt(r))
    LoRA with bias (peft's lora_bias=True: lora_B.bias)

minidepth runs in exact mode (factory.pipeline_pair), so the two pipelines compute with the same kernels; the bound
is test_lora.py's TOL (1e-5): the LoRA update is added in the same order as peft, and what remains is the rounding of
the same float32 products summed by the same kernels.
"""

from __future__ import annotations

import json

import lora_files
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_lora import TOL, base_image, clean, image, load_both, pipes, run  # noqa: F401  (fixtures)
from test_pipeline import assert_close

from minidepth.adapters.formats import LoRAFormatError
from minidepth.adapters.pipeline import unet_block_weights


def _kohya(pipes, **kwargs) -> dict:
    ref = pipes[1]
    return lora_files.kohya_lora(ref.unet, ref.text_encoder, seed=5, **kwargs)


def test_kohya_text_encoder_names_without_text_model(clean, image, base_image, tmp_path):
    sd = _kohya(clean)
    v5 = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in sd.items()}  # transformers-5 tools write these
    assert any(k.startswith("lora_te_encoder_layers_0_") for k in v5) and v5.keys() != sd.keys()
    save_file(v5, str(tmp_path / "v5.safetensors"))
    load_both(clean, tmp_path / "v5.safetensors")
    ours, ref = (run(p, image) for p in clean)
    assert np.abs(ours - base_image).max() > 1e-2, "the LoRA should change the image"
    assert_close(ours, ref, TOL, "kohya TE names without text_model")
    clean[0].unload_lora_weights()
    save_file(sd, str(tmp_path / "v4.safetensors"))
    clean[0].load_lora_weights(tmp_path / "v4.safetensors")
    assert_close(run(clean[0], image), ours, 0, "both spellings: the same layers")


def _hub_cache(root, repo_id: str, files: dict) -> str:
    """A Hub cache as huggingface_hub lays it out (models--owner--name/snapshots/<commit>/, refs/main)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, write in files.items():
        write(snapshot / name)
    return str(root)


def test_hub_repo_id_with_weight_name(clean, image, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sd = _kohya(clean)
    width = clean[0].text_encoder.config.width
    embedding = {"<hub>": torch.randn(width, generator=torch.Generator().manual_seed(1))}
    cache = _hub_cache(tmp_path, "someone/style", {"style.safetensors": lambda p: save_file(sd, str(p))})
    _hub_cache(tmp_path, "someone/concept", {"learned_embeds.safetensors": lambda p: save_file(embedding, str(p))})
    options = {"weight_name": "style.safetensors", "cache_dir": cache, "local_files_only": True}
    load_both(clean, "someone/style", **options)
    for p in clean:
        p.load_textual_inversion("someone/concept", cache_dir=cache, local_files_only=True)
    ours, ref = (run(p, image, prompt="a <hub> house") for p in clean)
    assert_close(ours, ref, TOL, "LoRA + embedding from a Hub repo id")
    for p in clean:
        p.unload_textual_inversion()
    with pytest.raises(FileNotFoundError, match=r"LoRA 'someone/style': missing\.safetensors not in the local Hub "
                                                r"cache and downloading is off"):
        clean[0].load_lora_weights("someone/style", weight_name="missing.safetensors", cache_dir=cache,
                                   local_files_only=True)


BLOCKWISE = {"unet": {"down": 0.3, "mid": 1.7, "up": {"block_1": [0.2, 1.5], "block_3": 0.6}}, "text_encoder": 0.4}


def test_block_wise_adapter_weights(clean, image, tmp_path):
    # diffusers' block-wise rule fails (IndexError) for layers outside the blocks (time_embedding, conv_in): a LoRA of
    # the blocks' attention and ResNets only, as block-wise users load
    sd = {k: v for k, v in _kohya(clean).items()
          if k.startswith(("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_", "lora_te_"))}
    save_file(sd, str(tmp_path / "blocks.safetensors"))
    load_both(clean, tmp_path / "blocks.safetensors", adapter_name="style")
    for p in clean:
        p.set_adapters(["style"], [BLOCKWISE])
    ours, ref = (run(p, image) for p in clean)
    assert_close(ours, ref, TOL, "block-wise adapter weights")
    clean[0].set_adapters(["style"], [1.0])
    assert np.abs(run(clean[0], image) - ours).max() > 1e-3, "the block weights should change the image"


def test_block_wise_weights_expand_like_diffusers(pipes):
    from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales
    ours = unet_block_weights(pipes[0].unet, BLOCKWISE["unet"])
    (ref,) = _maybe_expand_lora_scales(pipes[1].unet, [BLOCKWISE["unet"]])
    assert ours == ref
    with pytest.raises(ValueError, match="up.block_1 takes 2 weights"):
        unet_block_weights(pipes[0].unet, {"up": {"block_1": [1, 2, 3]}})
    with pytest.raises(ValueError, match="keys down, mid, up"):
        unet_block_weights(pipes[0].unet, {"middle": 1})


@pytest.fixture(scope="module")
def peft_made(tmp_path_factory):
    """peft's own LoRA layers (rsLoRA, and LoRA with a bias on B), saved by diffusers' save_lora_weights."""
    import factory
    from diffusers import StableDiffusionDepth2ImgPipeline as Reference
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    checkpoint = factory.cached_checkpoint("tiny")
    made = {}
    for kind, options in {"rslora": {"use_rslora": True}, "bias": {"lora_bias": True}}.items():
        unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet")
        torch.manual_seed(3)
        config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                            target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"], **options)
        unet.add_adapter(config, adapter_name=kind)
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.5)
        folder = tmp_path_factory.mktemp(kind)
        Reference.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet, adapter_name=kind),
                                    unet_lora_adapter_metadata=config.to_dict())
        made[kind] = folder / "pytorch_lora_weights.safetensors"
    return made


def test_rslora(clean, image, base_image, peft_made):
    metadata = json.loads(__import__("safetensors").safe_open(str(peft_made["rslora"]), "pt").metadata()
                          ["lora_adapter_metadata"])
    assert metadata["unet.use_rslora"] is True
    load_both(clean, peft_made["rslora"])
    ours, ref = (run(p, image, cross_attention_kwargs={"scale": 0.7}) for p in clean)
    assert np.abs(ours - base_image).max() > 1e-2
    assert_close(ours, ref, TOL, "rsLoRA (alpha / sqrt(r))")
    scales = {a.scaling() for m in (clean[0].unet,) for _, layer in __import__("minidepth").adapters.lora.lora_layers(m)
              for a in layer.lora.values()}
    assert scales == {8 / 4 ** 0.5}


def test_lora_with_bias(clean, image, base_image, peft_made, tmp_path):
    sd = load_file(str(peft_made["bias"]))
    assert any(k.endswith("lora_B.bias") for k in sd)
    load_both(clean, peft_made["bias"])
    ours, ref = (run(p, image) for p in clean)
    assert np.abs(ours - base_image).max() > 1e-2
    assert_close(ours, ref, TOL, "LoRA with bias (lora_B.bias)")
    # peft put a bias on B of layers without a bias (to_q): that cannot be fused (peft refuses to merge it too)
    with pytest.raises(ValueError, match="cannot be fused; nothing fused"):
        clean[0].fuse_lora()
    assert_close(run(clean[0], image), ours, 0, "unchanged after the refused fuse")
    # saved by us, read by diffusers: the biases and lora_bias=true travel along
    clean[0].save_lora_weights(tmp_path / "ours")
    clean[1].unload_lora_weights()
    clean[1].load_lora_weights(tmp_path / "ours")
    assert_close(run(clean[1], image), ours, TOL, "our save -> diffusers")
    # a PEFT file without metadata (alpha = rank then): diffusers turns lora_bias on from the keys alone; so do we
    plain = tmp_path / "plain.safetensors"
    save_file(sd, str(plain))
    for p in clean:
        p.unload_lora_weights()
    load_both(clean, plain)
    assert_close(*(run(p, image) for p in clean), TOL, "lora_B.bias without metadata")


def test_kohya_bias_stays_refused(clean, tmp_path):
    sd = _kohya(clean)
    up = next(k for k in sd if k.endswith("lora_up.weight"))
    sd[up.replace("lora_up.weight", "lora_up.bias")] = torch.zeros(sd[up].shape[0])
    save_file(sd, str(tmp_path / "bias.safetensors"))
    with pytest.raises(LoRAFormatError, match="kohya LoRA with bias"):
        clean[0].load_lora_weights(tmp_path / "bias.safetensors")
