"""minidepth's CLIPTokenizer against the live transformers 5 CLIPTokenizer loaded from the same tokenizer folder.

Prompts: hand-written edge cases plus a deterministic, category-built random set (several hundred in all). Every
comparison is an exact equality of token ids (and attention masks / decoded text).
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from factory import component_folder
from minidepth.tokenizer import CLIPTokenizer

transformers = pytest.importorskip("transformers")

# ------------------------------------------------------------------------------------------------ prompts
EDGE_CASES = [
    "", " ", "   ", "\t", "\n", "\r\n", " \t \n ", "\u00a0", "\u3000", "\u200b",
    "!", "!!", "!!!", "hello!world", "hello !world", "a!b!c", "wow!!!", "?!", "!?!?", "...", "---", "***", "(!)",
    "a photograph of an astronaut riding a horse", "A PHOTOGRAPH OF AN ASTRONAUT", "MiXeD CaSe PrOmPt",
    "it's", "don't", "we're", "I've", "I'm", "we'll", "she'd", "IT'S", "rock'n'roll", "the cat’s hat", "''s", "!'ll",
    "café", "cafe\u0301", "naïve crème brûlée", "Ångström", "São Paulo", "Zürich", "Ελληνικά", "ß ẞ",
    "東京タワーの夜景", "中文提示词", "한국어 문장", "日本の桜", "Москва ночью", "красная машина", "مرحبا بالعالم",
    "שלום עולם", "नमस्ते दुनिया", "สวัสดีครับ",
    "🐱", "🔥🔥🔥", "👍🏽", "👍🏿 👍🏻", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️", "🧑🏿‍🚀 in space", "a cat 😺 on a mat",
    "&amp;", "&lt;b&gt;bold&lt;/b&gt;", "<b>bold</b>", "<br/>", "&quot;quoted&quot;", "&#39;", "fish &amp; chips",
    "1234", "3.14159", "1,000,000", "2nd place", "4k uhd", "8K", "٣ ٤", "½ ²", "0x1F", "1990s",
    "<|startoftext|>", "<|endoftext|>", "<|ENDOFTEXT|>", "<|endoftext", "a<|endoftext|>b", "<|startoftext|>a cat",
    "a\tcat\non  a\r\nmat", "trailing space ", " leading space", "tab\tseparated\tvalues",
    " ".join(["very"] * 100) + " long", "word " * 80, "!" * 90, "a, " * 60, "東京" * 50,
]

WORDS = ("a photo of cat dog house tree river mountain city night sunset portrait oil painting watercolor "
         "highly detailed 4k cinematic lighting trending on artstation by greg rutkowski red blue green golden "
         "hour fantasy castle cyberpunk street rain neon reflections ultra realistic octane render").split()
POOLS = {
    "words": WORDS,
    "case": ["Photo", "CAT", "HiGhLy", "ArtStation", "Greg", "NEON"],
    "punct": ["!", "!!", "!!!", "?", "?!", "...", ",", ".", ";", ":", "--", "***", "()", "[x]", "{}", "#", "@", "~",
              "/", "\\", "|", "^", "%", "$", "&", "+", "=", "<", ">", "`", '"', "'"],
    "accents": ["café", "naïve", "crème", "brûlée", "Ångström", "São", "Zürich", "façade", "e\u0301", "piñata"],
    "cjk": ["東京", "タワー", "中文", "提示词", "한국어", "桜", "の", "ラーメン"],
    "cyrillic": ["Москва", "ночью", "красная", "машина", "Ёж"],
    "arabic": ["مرحبا", "بالعالم", "سلام", "٣"],
    "other_scripts": ["שלום", "नमस्ते", "สวัสดี", "Ελλάδα", "ქართული"],
    "emoji": ["🐱", "🔥", "👍🏽", "👍🏿", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️", "🧑🏿‍🚀", "😺", "🎉🎉", "✨"],
    "html": ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "<b>", "</b>", "<br/>", "<div class='x'>", "&nbsp;"],
    "numbers": ["1", "42", "3.14", "1,000", "2nd", "4k", "1990s", "100%", "x2", "007"],
    "contractions": ["it's", "don't", "we're", "I've", "I'm", "we'll", "she'd", "IT'S", "can't", "they're"],
    "specials": ["<|startoftext|>", "<|endoftext|>", "<|EndOfText|>"],
}
SEPARATORS = [" ", " ", " ", "", ", ", "\t", "\n", "  ", "!", " - "]


def generated_prompts(n: int = 320, seed: int = 1234) -> list[str]:
    """Random prompts built from the category pools: mostly words, salted with 0-3 other categories."""
    rng = random.Random(seed)
    categories = [c for c in POOLS if c != "words"]
    prompts = []
    for i in range(n):
        chosen = rng.sample(categories, k=rng.randint(0, 3))
        pool = WORDS + [item for c in chosen for item in POOLS[c]] * 3
        n_pieces = rng.choice([1, 2, 3, 5, 8, 12, 20]) if i % 10 else rng.randint(60, 120)  # every 10th is long
        pieces = [rng.choice(pool) for _ in range(n_pieces)]
        prompts.append("".join(p + rng.choice(SEPARATORS) for p in pieces).rstrip(rng.choice([" ", ""])))
    return prompts


PROMPTS = EDGE_CASES + generated_prompts()


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def folder():
    return component_folder("tiny", "tokenizer")


@pytest.fixture(scope="module")
def ours(folder):
    return CLIPTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def ref(folder):
    return transformers.CLIPTokenizer.from_pretrained(folder)


def _batches(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def _first_diff(a: list, b: list, prompts: list[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"first mismatch at prompt {i} {prompts[i]!r}:\n  ours {x}\n  ref  {y}"
    return f"lengths differ: {len(a)} vs {len(b)}"


# ------------------------------------------------------------------------------------------------ parity
def test_prompt_set_is_large_and_covers_truncation(ref):
    assert len(PROMPTS) >= 300, len(PROMPTS)
    long = [p for p in PROMPTS if len(ref(p).input_ids) > 77]
    assert len(long) >= 20, f"only {len(long)} prompts exceed 77 tokens"


def test_diffusers_call_max_length(ours, ref):
    """The call diffusers makes, one prompt at a time and as one batch."""
    kwargs = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    for p in PROMPTS:
        a, b = ours(p, **kwargs), ref(p, **kwargs)
        assert a.input_ids.dtype == b.input_ids.dtype == torch.long
        assert torch.equal(a.input_ids, b.input_ids), f"{p!r}:\n ours {a.input_ids.tolist()}\n ref  {b.input_ids.tolist()}"
        assert torch.equal(a.attention_mask, b.attention_mask), p
    a, b = ours(PROMPTS, **kwargs), ref(PROMPTS, **kwargs)
    assert a.input_ids.shape == (len(PROMPTS), 77)
    assert torch.equal(a.input_ids, b.input_ids), _first_diff(a.input_ids.tolist(), b.input_ids.tolist(), PROMPTS)


@pytest.mark.parametrize("truncation", [None, True], ids=["untruncated", "truncated"])
def test_padding_longest_batches(ours, ref, truncation):
    """diffusers' second, untruncated `padding="longest"` call, and the truncated variant, in batches of 7."""
    kwargs = dict(padding="longest", return_tensors="pt")
    if truncation:
        kwargs.update(truncation=True, max_length=77)
    for batch in _batches(PROMPTS, 7):
        a, b = ours(batch, **kwargs), ref(batch, **kwargs)
        assert a.input_ids.shape == b.input_ids.shape, (batch, a.input_ids.shape, b.input_ids.shape)
        assert torch.equal(a.input_ids, b.input_ids), _first_diff(a.input_ids.tolist(), b.input_ids.tolist(), batch)
        assert torch.equal(a.attention_mask, b.attention_mask), batch


@pytest.mark.parametrize("kwargs", [
    {}, {"padding": True}, {"padding": "max_length", "max_length": 20}, {"max_length": 10},
    {"truncation": True}, {"padding": "longest", "truncation": True, "max_length": 16}, {"padding": "do_not_pad"},
], ids=str)
def test_list_outputs_and_other_arguments(ours, ref, kwargs):
    """return_tensors=None (lists), single strings and batches, and transformers' defaulting rules."""
    for p in PROMPTS[::3]:
        a, b = ours(p, **kwargs), ref(p, **kwargs)
        assert a.input_ids == b.input_ids, (p, kwargs)
        assert a.attention_mask == b.attention_mask, (p, kwargs)
    for batch in _batches(PROMPTS, 11):
        a, b = ours(batch, **kwargs), ref(batch, **kwargs)
        assert a.input_ids == b.input_ids, _first_diff(a.input_ids, b.input_ids, batch)
        assert a["attention_mask"] == b["attention_mask"], batch


def test_decode_round_trip(ours, ref):
    ids = ours(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    for skip in (False, True):
        got = ours.batch_decode(ids, skip_special_tokens=skip)
        want = ref.batch_decode(ids, skip_special_tokens=skip)
        assert got == want, _first_diff(got, want, PROMPTS)
        for row, p in zip(ids[:40], PROMPTS):
            assert ours.decode(row, skip_special_tokens=skip) == ref.decode(row, skip_special_tokens=skip), p
            assert ours.decode(row.tolist(), skip_special_tokens=skip) == ref.decode(row.tolist(),
                                                                                     skip_special_tokens=skip), p
    assert ours.decode(320) == ref.decode(320)
    assert ours.decode(ours("a red car!").input_ids, skip_special_tokens=True) == "a red car"


def test_special_token_attributes(ours, ref):
    for name in ("model_max_length", "pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id",
                 "pad_token", "bos_token", "eos_token", "vocab_size"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert (ours.model_max_length, ours.pad_token_id, ours.bos_token_id, ours.eos_token_id) == (77, 0, 49406, 49407)
    assert len(ours) == len(ref)


def test_backend_pipeline_matches_transformers(ours, ref):
    """Same normaliser, pre-tokeniser, post-processor, decoder, BPE options and special tokens as transformers."""
    a, b = json.loads(ours.backend.to_str()), json.loads(ref.backend_tokenizer.to_str())
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert a[key] == b[key], key
    strip = lambda m: {k: v for k, v in m.items() if k not in ("vocab", "merges")}  # noqa: E731
    assert strip(a["model"]) == strip(b["model"])
    assert a["model"]["vocab"] == b["model"]["vocab"] and a["model"]["merges"] == b["model"]["merges"]
    key = lambda t: t["id"]  # noqa: E731
    assert sorted(a["added_tokens"], key=key) == sorted(b["added_tokens"], key=key)


# ------------------------------------------------------------------------------------------------ the "!" quirk
def test_exclamation_quirk_default(ours):
    assert ours("!").input_ids == [49406, 0, 49407]
    assert ours("!!").input_ids == [49406, 0, 0, 49407]


def test_pad_token_not_special_matches_openclip(folder):
    """pad_token_is_special=False is OpenCLIP's tokenisation: "!" = 256, "!!" = 748, padding with zeros."""
    open_clip = pytest.importorskip("open_clip")
    plain = CLIPTokenizer.from_pretrained(folder, pad_token_is_special=False)
    assert plain("!").input_ids == [49406, 256, 49407]
    assert plain("!!").input_ids == [49406, 748, 49407]
    assert plain.pad_token_id == 0
    reference = open_clip.tokenizer.SimpleTokenizer()
    # OpenCLIP also runs ftfy + html.unescape and names its specials <start_of_text>: stick to prompts where those
    # steps do nothing (ASCII, no '&' / '<').
    prompts = [p for p in PROMPTS if p.isascii() and not any(c in p for c in "&<>")]
    assert len(prompts) >= 100
    want = reference(prompts, context_length=77)
    got = plain(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(got, want), _first_diff(got.tolist(), want.tolist(), prompts)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call, error, words", [
    (lambda t: t(5), TypeError, "text must be"),
    (lambda t: t(None), TypeError, "text must be"),
    (lambda t: t(["a", 3]), TypeError, "not strings"),
    (lambda t: t([]), ValueError, "empty"),
    (lambda t: t("a", padding="maximum"), ValueError, "padding must be"),
    (lambda t: t("a", padding=1), ValueError, "padding must be"),
    (lambda t: t("a", truncation="yes"), TypeError, "truncation must be"),
    (lambda t: t("a", max_length=1), ValueError, "max_length must be"),
    (lambda t: t("a", max_length=7.0), ValueError, "max_length must be"),
    (lambda t: t("a", return_tensors="tf"), ValueError, "return_tensors must be"),
    (lambda t: t(["a", "b c"], return_tensors="pt"), ValueError, "different lengths"),
    (lambda t: t.decode("abc"), TypeError, "ids must be"),
    (lambda t: t.batch_decode([1, 2]), TypeError, "batch_decode expects"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_raises(ours, call, error, words):
    with pytest.raises(error, match=words):
        call(ours)


def test_numpy_tensors(ours, ref):
    a = ours(PROMPTS[:20], padding="max_length", truncation=True, return_tensors="np")
    b = ref(PROMPTS[:20], padding="max_length", truncation=True, return_tensors="np")
    assert a.input_ids.dtype == b.input_ids.dtype and (a.input_ids == b.input_ids).all()
