"""Attention maps per word against an independent computation from diffusers' attention probabilities.

diffusers' pipeline runs on the same tiny checkpoint with a diffusers attention processor on every `attn2` layer that
records softmax(QK^T/sqrt(d)) (diffusers' own `get_attention_scores`); the test then applies the documented rules
itself (conditional half, mean over heads, layers with a map side >= 1/32 of the image side, bicubic upsampling, clamp
at 0, mean over layers and calls, mean over a word's tokens, min-max normalisation) and compares with
`record_attention(pipe)`. The image is 96x64 (latents 12x8), so the 2x1 grid of the tiny UNet's lowest level (its mid
block) is left out by the 1/32 rule while the 3x2 grid is kept.
"""

from __future__ import annotations

import numpy as np
import parity
import pytest
import torch
import torch.nn.functional as F
from test_pipeline import photo

from minidepth.inside.attention_maps import record_attention

PROMPT = "a marble statue of a cat, photorealistic"
WORDS = ["statue", "cat", "photorealistic"]  # "photorealistic" is two BPE tokens
KW = dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=7.5, output_type="np")
GRIDS = {96: (8, 12), 24: (4, 6), 6: (2, 3), 2: (1, 2)}  # positions -> (h, w) for 12x8 latents, written out
H, W = 64, 96


@pytest.fixture(scope="module")
def ours(tiny_checkpoint):
    from minidepth import StableDiffusionDepth2ImgPipeline
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class RecordingProcessor:
    """diffusers attention processor: the usual SDPA output, plus the probabilities for the record."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch = hidden_states.shape[0]
        q = attn.to_q(hidden_states)
        k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        probs = attn.get_attention_scores(attn.head_to_batch_dim(q), attn.head_to_batch_dim(k), None)
        self.store.append(probs.reshape(batch, attn.heads, *probs.shape[1:]))  # (B, heads, L, S)
        split = lambda t: t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1])
        return attn.to_out[1](attn.to_out[0](out))


def reference_maps(checkpoint, image):
    from diffusers import StableDiffusionDepth2ImgPipeline as Reference
    ref = Reference.from_pretrained(checkpoint)
    ref.set_progress_bar_config(disable=True)
    store = []
    ref.unet.set_attn_processor({name: RecordingProcessor(store) if name.endswith("attn2.processor") else proc
                                 for name, proc in ref.unet.attn_processors.items()})
    ref(image=image, generator=torch.Generator().manual_seed(0), **KW)
    total, count = None, 0
    for probs in store:
        h, w = GRIDS[probs.shape[2]]
        if h * 32 < H or w * 32 < W:
            continue
        cond = probs[probs.shape[0] // 2:].double().mean(dim=1)              # (B, L, S)
        maps = cond.permute(0, 2, 1).reshape(cond.shape[0], -1, h, w)       # (B, S, h, w)
        maps = F.interpolate(maps.float(), size=(H, W), mode="bicubic", align_corners=False).clamp(min=0)
        total = maps.double() if total is None else total + maps.double()
        count += 1
    raw = (total / count)[0]                                                 # (S, H, W)
    ids = ref.tokenizer(PROMPT).input_ids
    out = {}
    for word in WORDS:
        pieces = ref.tokenizer(word).input_ids[1:-1]
        positions = [i + j for i in range(len(ids)) if ids[i:i + len(pieces)] == pieces for j in range(len(pieces))]
        m = raw[positions].mean(dim=0)
        out[word] = (m, (m - m.min()) / (m.max() - m.min()))
    return out, count


def test_word_maps_equal_an_independent_computation_from_diffusers(ours, tiny_checkpoint):
    image = photo(W, H)
    with record_attention(ours, WORDS) as rec:
        ours(image=image, generator=torch.Generator().manual_seed(0), **KW)
    expected, count = reference_maps(tiny_checkpoint, image)
    assert rec.count == count == 9 * 4  # 9 attn2 layers on the 8x12, 4x6 and 3x2 grids; 4 UNet calls (PNDM)
    assert not any(name.startswith("mid_block") for name in rec.layers_used)
    normalised, raw = rec.word_maps(WORDS), rec.word_maps(WORDS, normalize=False)
    worst = 0.0
    for word in WORDS:
        assert normalised[word].shape == (H, W)
        assert float(normalised[word].min()) == 0 and float(normalised[word].max()) == 1
        worst = max(worst, float((raw[word].double() - expected[word][0]).abs().max()),
                    float((normalised[word].double() - expected[word][1]).abs().max()))
    parity.record("attention maps per word", worst, worst)
    assert worst <= 1e-5, f"attention maps differ from the diffusers-based reference by {worst:.3g}"


@pytest.mark.parametrize("backend", ["sliced"])  # any backend: the processor returns the layer's own product
def test_recording_leaves_the_image_bit_identical(ours, backend):
    from minidepth.models.attention import set_attention_backend
    set_attention_backend(ours.unet, backend)
    try:
        image = photo(W, H)
        run = lambda: ours(image=image, generator=torch.Generator().manual_seed(1), **KW).images
        plain = run()
        with record_attention(ours, ["cat"]) as rec:
            recorded = run()
        assert np.array_equal(plain, recorded)
        assert rec.sums.shape == (1, 11, H, W)  # only the prompt's own tokens (BOS ... EOS) are summed
        assert all(layer.processor is None for layer in ours.unet.modules() if hasattr(layer, "processor"))
    finally:
        set_attention_backend(ours.unet, "sdpa")


def test_word_not_in_prompt_fails_before_any_work(ours):
    calls = []
    hook = ours.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="'dog' not in the prompt"), record_attention(ours, ["cat", "dog"]):
            ours(image=photo(W, H), **KW)
        assert calls == []
    finally:
        hook.remove()


def test_batches_and_saved_overlays(ours, tmp_path):
    with record_attention(ours) as rec:
        out = ours(image=photo(W, H), prompt=["a cat", "a marble statue"], num_images_per_prompt=2,
                   num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert rec.prompts == ["a cat", "a cat", "a marble statue", "a marble statue"]
    assert rec.word_maps("statue", index=3)["statue"].shape == (H, W)
    with pytest.raises(ValueError, match="not in the prompt"):
        rec.word_maps("statue", index=0)
    paths = rec.save(tmp_path, out.images[2], ["marble", "statue"], index=2)
    assert [p.name for p in paths] == ["attn-marble.png", "attn-statue.png"]
    assert all(p.is_file() for p in paths)


def test_steps_called_one_by_one_are_recorded_as_a_whole_call(ours):
    """A notebook that runs the pipeline's steps itself: the recorder learns the prompt from `prompt_encoded` (there is
    no `generation_started`) and records the same maps as for `pipe(...)`."""
    image, steps, strength = photo(W, H), KW["num_inference_steps"], 0.8
    with record_attention(ours, ["cat"]) as whole:
        ours(image=image, strength=strength, generator=torch.Generator().manual_seed(0), **KW)
    with record_attention(ours, ["cat"]) as by_hand:
        embeds, negative = ours.encode_prompt(PROMPT, 1, True)
        embeds = torch.cat([negative, embeds])
        depth = ours.prepare_depth_map(image, None, 1, True, embeds.dtype)
        timesteps, n = ours.get_timesteps(steps, strength)
        latents = ours.prepare_latents(ours.preprocess(image), timesteps[:1], 1, 1, embeds.dtype,
                                       torch.Generator().manual_seed(0))
        ours.denoise(latents, timesteps, embeds, depth, guidance_scale=KW["guidance_scale"], num_inference_steps=n)
    assert by_hand.prompts == whole.prompts == [PROMPT] and by_hand.count == whole.count > 0
    assert torch.equal(by_hand.sums, whole.sums)
    assert torch.equal(by_hand.word_maps("cat")["cat"], whole.word_maps("cat")["cat"])
