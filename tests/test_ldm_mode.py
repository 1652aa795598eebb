"""mode="ldm": the rules of Stability's original depth2img script, one test each, and an end-to-end check against a
step-by-step reference written here from those rules (tiny random-weight checkpoint, CPU)."""

from __future__ import annotations

import math

import factory
import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from test_pipeline import photo

from minidepth import StableDiffusionDepth2ImgPipeline, cli
from minidepth.ldm_mode import (
    LDMSchedule,
    ddim_timesteps,
    depth_condition,
    midas_input,
    midas_layer_norms,
    midas_size,
    pad_image,
    padded_size,
    t_enc_for,
)


@pytest.fixture(scope="module")
def pipe():
    p = StableDiffusionDepth2ImgPipeline.from_pretrained(factory.cached_checkpoint("tiny"))
    p.set_progress_bar_config(disable=True)
    p.set_exact(True)  # compared with references built from the same models, called directly (exact kernels)
    return p


# ------------------------------------------------------------------------------------------------ the rules
@pytest.mark.parametrize("n, step, length, last", [(50, 20, 50, 981), (25, 40, 25, 961), (10, 100, 10, 901),
                                                    (30, 33, 31, 991), (7, 142, 8, 995), (1, 1000, 1, 1),
                                                    (1000, 1, 1000, 1000)])
def test_timestep_grid(n, step, length, last):
    """make_ddim_timesteps("uniform"): range(0, 1000, 1000 // N) + 1 -- not always N entries."""
    ts = ddim_timesteps(n)
    assert ts[0] == 1 and ts[-1] == last and len(ts) == length
    assert (np.diff(ts) == step).all()


@pytest.mark.parametrize("n", [3, 9, 27, 36, 37, 101, 1000])
def test_grids_that_reach_1000_are_refused(n):
    """range(0, 1000, 1000 // N) + 1 ends at 1000 when 1000 // N divides 999: the original fails with IndexError."""
    assert ddim_timesteps(n)[-1] == 1000
    with pytest.raises(ValueError, match="grid"):
        LDMSchedule.make(torch.linspace(0.99, 0.01, 1000), n)
    assert [m for m in range(1, 51) if ddim_timesteps(m)[-1] == 1000] == [3, 9, 27, 36, 37]  # the script's 1-50


@pytest.mark.parametrize("strength, n, t_enc", [(0.9, 50, 45), (1.0, 50, 49), (0.8, 50, 40), (0.75, 2, 1),
                                                (0.5, 1, 0), (0.3, 10, 3), (0.7, 10, 7), (0.29, 100, 28),
                                                (0.05, 10, 0), (1.0, 2, 1), (0.99, 7, 6)])
def test_t_enc(strength, n, t_enc):
    """t_enc = min(int(strength * steps), steps - 1); 0.29 * 100 is 28.999999999999996 in floats."""
    assert t_enc_for(strength, n) == t_enc


@pytest.mark.parametrize("size, expected", [((768, 512), (576, 384)), ((512, 512), (384, 384)),
                                            ((512, 768), (384, 576)), ((640, 448), (544, 384)),
                                            ((128, 128), (384, 384)), ((1024, 256), (1536, 384)),
                                            ((256, 768), (128, 384)),   # a tie: the height's scale
                                            ((400, 384), (384, 384)),   # 12.5 -> 12 (half to even)
                                            ((432, 384), (448, 384)),   # 13.5 -> 14
                                            ((128, 192), (256, 384))])
def test_midas_sizes(size, expected):
    """Resize(384, 384, keep_aspect_ratio=True, ensure_multiple_of=32, resize_method="minimal")."""
    assert midas_size(*size) == expected


@pytest.mark.parametrize("size, expected", [((100, 68), (128, 128)), ((512, 512), (512, 512)),
                                            ((513, 64), (576, 128)), ((768, 520), (768, 576)),
                                            ((64, 200), (128, 256)), ((1, 1), (128, 128)), ((129, 640), (192, 640))])
def test_padding_sizes(size, expected):
    """pad_image: max(2, ceil(side / 64)) * 64."""
    assert padded_size(*size) == expected


def test_padding_repeats_the_edge_pixels():
    img = photo(100, 68, 3)
    a, padded = np.asarray(img), pad_image(img)
    assert padded.shape == (128, 128, 3) and padded.dtype == np.uint8
    assert (padded[:68, :100] == a).all()
    assert (padded[:68, 100:] == a[:, -1:]).all()      # right: the last column repeated
    assert (padded[68:, :100] == a[-1:]).all()         # bottom: the last row repeated
    assert (padded[68:, 100:] == a[-1, -1]).all()      # corner: the corner pixel


def test_midas_input_values_and_size():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (512, 768, 3), dtype=np.uint8)
    x = torch.from_numpy(a).float().permute(2, 0, 1)[None] / 127.5 - 1.0
    m = midas_input(x)
    assert m.shape == (1, 3, 384, 576) and m.dtype == torch.float32
    unit = (x + 1.0) * 0.5                                                   # AddMiDaS.pt2np
    resized = F.interpolate(unit, size=(384, 576), mode="bicubic", align_corners=False, antialias=False)
    assert torch.equal(m, (resized.double() - 0.5).div(0.5).float())        # NormalizeImage in float64, then float32
    square = torch.from_numpy(a[:384, :384]).float().permute(2, 0, 1)[None] / 127.5 - 1.0
    assert torch.equal(midas_input(square), ((square + 1.0) * 0.5 - 0.5) / 0.5)  # 384x384: no resize


def test_midas_resize_close_to_opencv():
    """We resize with torch's bicubic; cv2.INTER_CUBIC is the same kernel (measured difference ~5e-5 at most)."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    a = rng.random((512, 768, 3), dtype=np.float32)
    ours = midas_input(torch.from_numpy(a * 2 - 1).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    theirs = (cv2.resize(a, (576, 384), interpolation=cv2.INTER_CUBIC) - 0.5) / 0.5
    assert np.abs(ours - theirs).max() < 2e-4


def test_depth_condition():
    depth = torch.rand(2, 96, 64) * 5
    cc = depth_condition(depth, (96, 64), (16, 12))
    assert cc.shape == (2, 1, 16, 12)
    for i in range(2):
        assert cc[i].min() == -1 and cc[i].max() == 1
    up = F.interpolate(depth[:, None], size=(16, 12), mode="bicubic", align_corners=False)
    lo, hi = up.amin(dim=(1, 2, 3), keepdim=True), up.amax(dim=(1, 2, 3), keepdim=True)
    assert torch.equal(cc, 2 * (up - lo) / (hi - lo) - 1)  # the first (same-size) resize is the identity
    flat = torch.ones(1, 64, 64)
    assert torch.equal(depth_condition(flat, (64, 64), (8, 8)), torch.zeros(1, 1, 8, 8))
    assert torch.isnan(depth_condition(flat, (64, 64), (8, 8), nan_safe=False)).all()


def test_schedule_from_the_ldm_buffers(pipe):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0).float()                  # register_schedule: float64 maths, float32 buffer
    s = LDMSchedule.make(ac, 50, eta=0.0)
    ts = np.arange(0, 1000, 20) + 1
    assert (s.timesteps == ts).all()
    assert torch.equal(s.alphas, ac[ts]) and s.alphas_prev[0] == ac[0]
    assert torch.equal(s.alphas_prev[1:], ac[ts[:-1]])
    assert torch.equal(s.sqrt_one_minus_alphas, (1 - ac[ts]).sqrt()) and (s.sigmas == 0).all()
    eta1 = LDMSchedule.make(ac, 50, eta=1.0).sigmas
    a, ap = ac[ts].double(), s.alphas_prev.double()
    assert torch.equal(eta1, torch.sqrt((1 - ap) / (1 - a) * (1 - a / ap)).float())


def test_layer_norm_eps_during_the_depth_model(pipe):
    norms = [m for m in pipe.depth_estimator.modules() if isinstance(m, torch.nn.LayerNorm)]
    before = [m.eps for m in norms]
    with midas_layer_norms(pipe.depth_estimator):
        assert all(m.eps == 1e-6 for m in norms)
    assert [m.eps for m in norms] == before


# ------------------------------------------------------------------------------------------------ the reference
def reference(pipe, prompt, image, *, steps, strength, scale, seed, negative=""):
    """depth2img.py predict -> paint, written out step by step from the rules (fp32, CPU, one image)."""
    gen = torch.Generator().manual_seed(seed)
    # pad_image: edge pixels to max(2, ceil(side / 64)) * 64
    a = np.asarray(image.convert("RGB"))
    H, W = (max(2, math.ceil(s / 64)) * 64 for s in a.shape[:2])
    a = np.pad(a, ((0, H - a.shape[0]), (0, W - a.shape[1]), (0, 0)), mode="edge")
    jpg = torch.from_numpy(a).to(torch.float32) / 127.5 - 1.0                         # make_batch_sd
    # AddMiDaS: (x + 1) / 2, Resize "minimal" (multiple of 32), NormalizeImage 0.5 / 0.5
    sh, sw = 384 / H, 384 / W
    sc = sw if abs(1 - sw) < abs(1 - sh) else sh
    h32, w32 = (int(np.round(sc * v / 32) * 32) for v in (H, W))
    m = ((jpg + 1.0) * 0.5).permute(2, 0, 1)[None]
    if (h32, w32) != (H, W):
        m = F.interpolate(m, size=(h32, w32), mode="bicubic", align_corners=False, antialias=False)
    m = ((m.double() - 0.5) / 0.5).float()
    # z = scale_factor * posterior sample (draw 1)
    moments = pipe.vae.encode(jpg.permute(2, 0, 1)[None])
    z = 0.18215 * (moments.mean + moments.std * torch.randn(moments.mean.shape, generator=gen))
    # text
    def embed(text):
        ids = pipe.tokenizer([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return pipe.text_encoder(ids.input_ids).last_hidden_state
    c, uc = embed(prompt), embed(negative)
    # depth: the DPT with LayerNorm eps 1e-6, bicubic to the MiDaS size, bicubic to z's size, min/max to [-1, 1]
    norms = [mod for mod in pipe.depth_estimator.modules() if isinstance(mod, torch.nn.LayerNorm)]
    saved = [mod.eps for mod in norms]
    for mod in norms:
        mod.eps = 1e-6
    try:
        cc = pipe.depth_estimator(m)[:, None]
    finally:
        for mod, eps in zip(norms, saved):
            mod.eps = eps
    cc = F.interpolate(cc, size=(h32, w32), mode="bicubic", align_corners=False)
    cc = F.interpolate(cc, size=z.shape[2:], mode="bicubic", align_corners=False)
    lo, hi = torch.amin(cc, dim=[1, 2, 3], keepdim=True), torch.amax(cc, dim=[1, 2, 3], keepdim=True)
    cc = 2.0 * (cc - lo) / (hi - lo) - 1.0
    # make_schedule
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0).float()
    grid = np.asarray(list(range(0, 1000, 1000 // steps))) + 1
    alphas = ac[grid]
    alphas_prev = torch.cat([ac[:1], ac[grid[:-1]]])
    t_enc = min(int(strength * steps), steps - 1)
    # stochastic_encode (draw 2), or pure noise at strength 1
    noise = torch.randn(z.shape, generator=gen)
    x = noise if strength == 1 else alphas.sqrt()[t_enc] * z + (1.0 - alphas).sqrt()[t_enc] * noise
    # decode: grid[:t_enc] flipped, index = t_enc - i - 1
    used = []
    for i, step in enumerate(np.flip(grid[:t_enc])):
        index = t_enc - i - 1
        used.append(int(step))
        if scale != 1:
            x_in = torch.cat([torch.cat([x, x]), torch.cat([cc, cc])], dim=1)
            t_in = torch.full((2,), int(step), dtype=torch.long)
            e_u, e_c = pipe.unet(x_in, t_in, encoder_hidden_states=torch.cat([uc, c])).chunk(2)
            e_t = e_u + scale * (e_c - e_u)
        else:
            e_t = pipe.unet(torch.cat([x, cc], dim=1), torch.full((1,), int(step), dtype=torch.long),
                            encoder_hidden_states=c)
        a_t, a_prev = alphas[index], alphas_prev[index]
        pred_x0 = (x - (1.0 - alphas).sqrt()[index] * e_t) / a_t.sqrt()
        x = a_prev.sqrt() * pred_x0 + (1.0 - a_prev - 0.0 ** 2).sqrt() * e_t
    out = pipe.vae.decode((1.0 / 0.18215) * x)
    out = torch.clamp((out + 1.0) / 2.0, min=0.0, max=1.0)
    return out, used


@pytest.mark.parametrize("size, steps, strength, scale", [((100, 68), 6, 0.9, 9.0), ((64, 136), 5, 1.0, 9.0),
                                                          ((130, 64), 7, 0.5, 1.0)])
def test_end_to_end_equals_the_step_by_step_reference(pipe, size, steps, strength, scale):
    image = photo(*size, seed=5)
    with torch.no_grad():
        ref, used = reference(pipe, "a red house by the sea", image, steps=steps, strength=strength, scale=scale,
                              seed=7)
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(int(args[1][0])))
    try:
        ours = pipe("a red house by the sea", image, mode="ldm", num_inference_steps=steps, strength=strength,
                    guidance_scale=scale, output_type="pt", generator=torch.Generator().manual_seed(7)).images
    finally:
        hook.remove()
    assert seen == used
    assert ours.shape == ref.shape == (1, 3, *(max(2, math.ceil(s / 64)) * 64 for s in size[::-1]))
    assert torch.equal(ours, ref), f"max difference {(ours - ref).abs().max():.3g}"


def test_off_by_one_timesteps_and_defaults(pipe):
    """N = 10, defaults strength 0.9 / guidance 9.0: noised at grid[9] = 901, denoised from grid[8] = 801 down."""
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: seen.append((int(args[1][0]), args[0].shape[0])))
    image = photo(64, 64, 2)
    try:
        default = pipe("a cat", image, mode="ldm", num_inference_steps=10, output_type="np",
                       generator=torch.Generator().manual_seed(1)).images
    finally:
        hook.remove()
    assert [t for t, _ in seen] == list(range(801, 0, -100)) and all(b == 2 for _, b in seen)  # 9 steps, CFG
    explicit = pipe("a cat", image, mode="ldm", num_inference_steps=10, strength=0.9, guidance_scale=9.0,
                    output_type="np", generator=torch.Generator().manual_seed(1)).images
    assert np.array_equal(default, explicit)


def test_pil_output_truncates_and_crop_padding(pipe):
    image = photo(100, 68, 4)
    run = lambda **k: pipe("a boat", image, mode="ldm", num_inference_steps=2,
                           generator=torch.Generator().manual_seed(2), **k).images
    pt, pil, cropped = run(output_type="pt"), run()[0], run(crop_padding=True)[0]
    assert pil.size == (128, 128) and cropped.size == (100, 68)
    expected = (pt[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)   # astype(uint8): truncation, not rounding
    assert np.array_equal(np.asarray(pil), expected)
    assert np.array_equal(np.asarray(cropped), expected[:68, :100])
    assert run(output_type="latent").shape == (1, 4, 16, 16)


def test_batch_and_generator_list(pipe):
    image = photo(64, 64, 6)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    two = pipe("a tree", image, mode="ldm", num_inference_steps=2, num_images_per_prompt=2, output_type="np",
               generator=gens).images
    one = pipe("a tree", image, mode="ldm", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(4)).images
    assert two.shape == (2, 128, 128, 3) and np.abs(two[1] - one[0]).max() < 1e-5
    assert np.abs(two[0] - two[1]).max() > 1e-3


def test_bad_input(pipe):
    image = photo(64, 64)
    with pytest.raises(ValueError, match="mode"):
        pipe("x", image, mode="LDM")
    with pytest.raises(ValueError, match="depth_map"):
        pipe("x", image, mode="ldm", depth_map=torch.rand(1, 64, 64))
    with pytest.raises(ValueError, match="t_enc"):
        pipe("x", image, mode="ldm", num_inference_steps=1, strength=1.0)
    with pytest.raises(ValueError, match="one image"):
        pipe(["x", "y"], [image, image], mode="ldm")
    with pytest.raises(TypeError, match="PIL"):
        pipe("x", torch.rand(1, 3, 64, 64), mode="ldm")


# ------------------------------------------------------------------------------------------------ the CLI
def test_cli_mode_ldm(pipe, tmp_path, capsys):
    src = tmp_path / "in.png"
    photo(100, 68, 8).save(src)
    base = ["generate", "--image", str(src), "--prompt", "a red house", "--model",
            str(factory.cached_checkpoint("tiny")), "--steps", "4", "--seed", "5", "--quiet", "--device", "cpu"]
    assert cli.main(base + ["--crop-padding", "--out", str(tmp_path / "x.png")]) == 2      # diffusers mode: no pad
    assert cli.main(base + ["--mode", "ldm", "--depth-map", str(src), "--out", str(tmp_path / "y.png")]) == 2
    assert cli.main(base + ["--mode", "ldm", "--steps", "1", "--out", str(tmp_path / "z.png")]) == 2
    assert cli.main(base + ["--mode", "ldm", "--steps", "9", "--out", str(tmp_path / "z.png")]) == 2
    assert "--mode ldm" in capsys.readouterr().err
    assert cli.main(base + ["--mode", "ldm", "--filmstrip", "--out", str(tmp_path / "f.png")]) == 2
    assert "--filmstrip: not available with --mode ldm" in capsys.readouterr().err
    assert not (tmp_path / "f.png").exists()
    out = tmp_path / "ldm.png"
    assert cli.main(base + ["--mode", "ldm", "--crop-padding", "--exact", "--out", str(out)]) == 0  # as `pipe`
    expected = pipe("a red house", photo(100, 68, 8), mode="ldm", num_inference_steps=4, crop_padding=True,
                    generator=torch.Generator().manual_seed(5)).images[0]
    with PIL.Image.open(out) as img:
        assert img.size == (100, 68)
        assert np.array_equal(np.asarray(img), np.asarray(expected))     # guidance 9.0, strength 0.9 by default
    from minidepth.cli.png_metadata import read_settings
    settings, _ = read_settings(out)
    assert settings["mode"] == "ldm" and settings["guidance"] == 9.0 and settings["strength"] == 0.9
