"""minidepth.models.attention against diffusers' Attention on identical weights, and the backends against each other."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from minidepth.models.attention import (Attention, CaptureAttentionMaps, attention_probs, set_attention_backend,
                                        set_attention_processor)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """(max |d| / max |ref|, max |d|, mean |d|)"""
    d = (ours.double() - ref.double()).abs()
    return (d.max() / ref.double().abs().max()).item(), d.max().item(), d.mean().item()


def assert_close(ours, ref, tol, what=""):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    rel, mx, mean = rel_err(ours, ref)
    assert rel <= tol, f"{what}: relative max error {rel:.3e} > {tol:.0e} (max |d| {mx:.3e}, mean |d| {mean:.3e})"


def diffusers_pair(query_dim, heads, head_dim, context_dim=None, qkv_bias=False, seed=0):
    from diffusers.models.attention_processor import Attention as RefAttention
    torch.manual_seed(seed)
    ref = RefAttention(query_dim, cross_attention_dim=context_dim, heads=heads, dim_head=head_dim, bias=qkv_bias).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = Attention(query_dim, heads, head_dim, context_dim, qkv_bias).eval()
    state = {k.replace("to_out.0.", "to_out."): v for k, v in ref.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    return ours, ref


@pytest.mark.parametrize("context_dim,qkv_bias", [(None, False), (24, False), (None, True)])
def test_matches_diffusers(context_dim, qkv_bias):
    ours, ref = diffusers_pair(32, 4, 8, context_dim, qkv_bias)
    torch.manual_seed(1)
    x = torch.randn(2, 37, 32)
    ctx = torch.randn(2, 11, context_dim) if context_dim else None
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=ctx)
        for backend, slice_size in [("sdpa", None), ("math", None), ("sliced", "auto"), ("sliced", "max"),
                                    ("sliced", 3)]:
            ours.set_backend(backend, slice_size)
            assert_close(ours(x, ctx), want, 1e-6, f"{backend}/{slice_size}")


def test_upcast_in_half_precision():
    ours, _ = diffusers_pair(32, 2, 16)
    torch.manual_seed(2)
    x = torch.randn(1, 20, 32)
    with torch.no_grad():
        want = ours(x)
        ours.to(torch.bfloat16)
        for backend in ("math", "sliced"):
            ours.set_backend(backend, upcast=True)
            got = ours(x.bfloat16())
            assert got.dtype == torch.bfloat16
            assert_close(got.float(), want, 3e-2, f"bf16 {backend} upcast")


def test_sliced_slice_sizes():
    attn = Attention(16, heads=5, head_dim=4)
    attn.set_backend("sliced")
    assert attn.slice_size == 2  # "auto" = heads // 2, like diffusers
    attn.set_backend("sliced", "max")
    assert attn.slice_size == 1
    one_head = Attention(16, heads=1, head_dim=16)
    one_head.set_backend("sliced", "auto")
    assert one_head.slice_size == 1  # diffusers would use 0 here and crash


@pytest.mark.parametrize("kwargs,match", [
    (dict(backend="flash"), "backend"),
    (dict(backend="sdpa", slice_size=2), "slice_size"),
    (dict(backend="sliced", slice_size=0), "slice_size"),
    (dict(backend="sliced", slice_size="half"), "slice_size"),
    (dict(backend="sdpa", upcast=True), "upcast"),
])
def test_bad_backend_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Attention(16, 2, 8).set_backend(**kwargs)


def test_xformers_missing_is_a_clear_error():
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install xformers"):
            Attention(16, 2, 8).set_backend("xformers")
    else:  # xformers present: it must agree with SDPA
        attn = Attention(16, 2, 8)
        x = torch.randn(1, 9, 16)
        want = attn(x)
        attn.set_backend("xformers")
        assert_close(attn(x), want, 1e-5, "xformers")


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="heads"):
        Attention(16, 0, 8)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Attention(16, 2, 8), Attention(16, 2, 8, context_dim=12)])

    def forward(self, x, ctx, cross_attention_kwargs=None):
        x = x + self.blocks[0](x, cross_attention_kwargs=cross_attention_kwargs)
        return x + self.blocks[1](x, ctx, cross_attention_kwargs=cross_attention_kwargs)


@pytest.mark.filterwarnings("ignore:cross_attention_kwargs")  # blocks.0 has no processor: expected
def test_processor_hook_selects_and_receives_kwargs():
    torch.manual_seed(3)
    toy, x, ctx = _Toy().eval(), torch.randn(2, 10, 16), torch.randn(2, 5, 12)
    with torch.no_grad():
        want = toy(x, ctx)
        seen = []

        def spy(attn, q, k, v, **kwargs):
            seen.append((attn.name, attn.is_cross_attention, kwargs))
            return attn.attend(q, k, v)

        names = set_attention_processor(toy, spy, filter=lambda a: a.is_cross_attention)
        assert names == ["blocks.1"]
        got = toy(x, ctx, cross_attention_kwargs={"token_weight": 2.0})
        assert_close(got, want, 0.0, "observer processor changed the output")
        assert seen == [("blocks.1", True, {"token_weight": 2.0})]
        assert set_attention_processor(toy, None, filter="blocks.*") == ["blocks.0", "blocks.1"]

        capture = CaptureAttentionMaps()
        set_attention_processor(toy, capture, filter="*.1")
        assert_close(toy(x, ctx), want, 1e-6, "CaptureAttentionMaps output")
        (probs,) = capture.maps["blocks.1"]
        assert probs.shape == (2, 2, 10, 5)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 10))


def test_unused_cross_attention_kwargs_warn():
    toy, x, ctx = _Toy().eval(), torch.randn(1, 4, 16), torch.randn(1, 3, 12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        toy(x, ctx, cross_attention_kwargs={"foo": 1})
    assert any("['foo'] are ignored" in str(w.message) for w in caught)


def test_set_attention_backend_walks_the_model():
    toy = _Toy()
    set_attention_backend(toy, "sliced", slice_size="max", upcast=True)
    assert all(a.backend == "sliced" and a.slice_size == 1 and a.upcast for a in toy.blocks)
    with pytest.raises(ValueError, match="no minidepth Attention"):
        set_attention_backend(nn.Linear(2, 2), "math")
    with pytest.raises(TypeError, match="filter"):
        set_attention_processor(toy, lambda *a: None, filter=3)


def test_attention_probs_is_softmax_of_scaled_scores():
    q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8)
    want = torch.softmax(torch.einsum("bhld,bhsd->bhls", q, k) / 8 ** 0.5, dim=-1)
    assert_close(attention_probs(q, k), want, 1e-6, "attention_probs")


# ------------------------------------------------------------------------------------------------ one attention path
def _tiny(model: str) -> nn.Module:
    """A tiny random-weight text encoder or DPT, built from the test factory's tiny configs."""
    import factory
    from minidepth.checkpoints.transformers_format import clip_text_config_from_dict, dpt_config_from_dict
    from minidepth.models.clip_text import CLIPTextModel
    from minidepth.models.dpt import DPTDepthModel
    torch.manual_seed(0)
    if model == "clip":
        net = CLIPTextModel(clip_text_config_from_dict(factory.text_encoder_config("tiny")))
    else:
        net = DPTDepthModel(dpt_config_from_dict(factory.depth_estimator_config("tiny")))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return net.eval()


def test_no_attention_product_outside_attention_py():
    """Every softmax(QK^T)V in the package goes through models/attention.py (so the backend switch, the processor
    hook and capture reach all of them)."""
    from pathlib import Path
    import minidepth
    root = Path(minidepth.__file__).parent
    import re
    code = re.compile(r"(?<!\w)(\w+\.softmax|(\w+\.)?scaled_dot_product_attention|"
                      r"(\w+\.)?memory_efficient_attention)\(")
    offenders = [f"{p.relative_to(root)}: {m.group(0)}" for p in root.rglob("*.py") if p.name != "attention.py"
                 for m in code.finditer(p.read_text())]
    assert offenders == []


@pytest.mark.parametrize("model", ["clip", "dpt"])
def test_capture_records_the_text_encoder_and_the_dpt(model):
    net = _tiny(model)
    x = torch.randint(0, 1000, (2, 7)) if model == "clip" else torch.randn(2, 3, 64, 96)
    run = (lambda: net(x).last_hidden_state) if model == "clip" else (lambda: net(x))
    with torch.no_grad():
        want = run()
        capture = CaptureAttentionMaps()
        names = set_attention_processor(net, capture)
        got = run()
        set_attention_processor(net, None)
    layers = [m for m in net.modules() if isinstance(m, Attention)]
    assert names == [m.name for m in layers] and len(capture.maps) == len(layers) > 0
    probs = capture.maps[names[0]][0]  # (B, h, L, L)
    tokens = x.shape[1] if model == "clip" else 1 + (64 // 16) * (96 // 16)
    assert probs.shape == (2, layers[0].heads, tokens, tokens)
    assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)), 1e-6, "rows of the attention weights sum to 1")
    if model == "clip":  # causal: no query sees a later key
        assert probs.triu(diagonal=1).abs().max().item() == 0.0
        assert all(m.causal for m in layers)
    # the captured probabilities reproduce the SDPA output (float rounding only)
    assert_close(got, want, 1e-5, f"{model} with capture vs SDPA")


@pytest.mark.parametrize("backend", ["math", "sliced"])
def test_text_encoder_backends_with_causal_and_padding_masks(backend):
    net = _tiny("clip")
    ids = torch.randint(0, 1000, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        want = [net(ids).last_hidden_state, net(ids, attention_mask=mask).last_hidden_state]
        set_attention_backend(net, backend)
        got = [net(ids).last_hidden_state, net(ids, attention_mask=mask).last_hidden_state]
    assert_close(got[0], want[0], 1e-5, f"{backend} causal")
    assert_close(got[1], want[1], 1e-5, f"{backend} causal + padding mask")
