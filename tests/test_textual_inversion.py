"""Textual inversion against diffusers: A1111 .pt, single-key safetensors, kohya emb_params, multi-vector tokens."""

import factory
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_lora import Evil
from test_pipeline import assert_close, photo

from minidepth import StableDiffusionDepth2ImgPipeline
from minidepth.adapters.textual_inversion import EmbeddingError

TOL = 1e-5
PROMPT = "a photo of <obj> in <style> style"


@pytest.fixture(scope="module")
def pipes(tiny_checkpoint):
    return factory.pipeline_pair(tiny_checkpoint)


def run(pipe, prompt=PROMPT, negative="blurry <style>"):
    return pipe(prompt=prompt, negative_prompt=negative, image=photo(64, 64, seed=4), num_inference_steps=3,
                output_type="np", generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def files(pipes, tmp_path_factory):
    width = pipes[0].text_encoder.config.width
    g = torch.Generator().manual_seed(0)
    folder = tmp_path_factory.mktemp("embeddings")
    a1111 = folder / "style.pt"  # what the webui writes: 3 vectors under "*", the token in "name"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(3, width, generator=g)},
                "name": "<style>", "step": 1500, "sd_checkpoint": "abc123", "sd_checkpoint_name": "sd2"}, a1111)
    single = folder / "learned_embeds.safetensors"  # diffusers' training script: {token: vector}
    save_file({"<obj>": torch.randn(width, generator=g)}, str(single))
    kohya = folder / "kohya.safetensors"  # sd-scripts: {"emb_params": vectors}, the token is given when loading
    save_file({"emb_params": torch.randn(2, width, generator=g)}, str(kohya))
    return a1111, single, kohya


def state(pipe):
    return pipe.text_encoder.token_embedding, len(pipe.tokenizer), dict(pipe.tokenizer.added_tokens_encoder)


def test_a1111_and_single_key_in_one_prompt(pipes, files):
    ours, ref = pipes
    a1111, single, kohya = files
    before = run(ours)
    original = state(ours)
    for p in pipes:
        p.load_textual_inversion(a1111)
        p.load_textual_inversion(single)
        p.load_textual_inversion(kohya, token="<k>")
    assert ours.tokenizer.added_tokens_encoder == {"<style>": 49408, "<style>_1": 49409, "<style>_2": 49410,
                                                   "<obj>": 49411, "<k>": 49412, "<k>_1": 49413}
    assert ours.maybe_convert_prompt("x <style> y") == "x <style> <style>_1 <style>_2 y"
    got, want = run(ours), run(ref)
    assert np.abs(got - before).max() > 1e-2, "the embeddings should change the image"
    assert_close(got, want, TOL, "A1111 .pt + safetensors")
    assert_close(run(ours, "<k> on a table"), run(ref, "<k> on a table"), TOL, "kohya emb_params")

    for p in pipes:  # diffusers renumbers the remaining tokens; so do we
        p.unload_textual_inversion("<obj>")
    assert ours.tokenizer.added_tokens_encoder["<k>"] == 49411
    assert_close(run(ours), run(ref), TOL, "after unloading one token")

    for p in pipes:
        p.unload_textual_inversion()
    assert state(ours)[0] is original[0] and state(ours)[1:] == original[1:]
    assert ours.text_encoder.config.vocab_size == original[0].num_embeddings
    assert_close(run(ours), before, 0, "after unload_textual_inversion")


def test_saved_pipeline_keeps_the_words(pipes, files, tmp_path):
    ours = pipes[0]
    ours.load_textual_inversion(files[1])
    try:
        want = run(ours, "<obj>")
        ours.save_pretrained(tmp_path)
        again = StableDiffusionDepth2ImgPipeline.from_pretrained(tmp_path)
        again.set_progress_bar_config(disable=True)
        again.set_exact(ours.exact)
        assert again.tokenizer.added_tokens_encoder == {"<obj>": 49408}
        assert_close(run(again, "<obj>"), want, 0, "saved and reloaded")
    finally:
        ours.unload_textual_inversion()


@pytest.mark.parametrize("make,token,match", [
    (lambda w: {"<sd1>": torch.zeros(768)}, None, "768 wide.*1024"),
    (lambda w: {"cat": torch.zeros(w)}, None, "already in the tokenizer"),
    (lambda w: torch.zeros(2, w), None, "pass the token"),
    (lambda w: {"a": torch.zeros(w), "b": torch.zeros(w)}, None, "not a textual-inversion embedding"),
    (lambda w: {"<x>": torch.zeros(2, 2, w)}, None, "must be a float tensor"),
])
def test_bad_embeddings(pipes, make, token, match):
    ours = pipes[0]
    before = state(ours)
    with pytest.raises(EmbeddingError, match=match):
        ours.load_textual_inversion(make(ours.text_encoder.config.width), token=token)
    after = state(ours)
    assert after[0] is before[0] and after[1:] == before[1:]


def test_token_added_twice_and_pickles(pipes, files, tmp_path):
    ours = pipes[0]
    ours.load_textual_inversion(files[1])
    try:
        before = state(ours)
        with pytest.raises(EmbeddingError, match="<obj>.*already"):
            ours.load_textual_inversion(files[1])
        assert state(ours)[0] is before[0] and state(ours)[1:] == before[1:]
    finally:
        ours.unload_textual_inversion()
    evil = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 4)}, "name": "<e>", "x": Evil()}, evil)
    with pytest.raises(EmbeddingError, match="weights_only"):
        ours.load_textual_inversion(evil)
