"""`minidepth parity` / `minidepth.parity.compare`: the stage-by-stage parity report against diffusers (issue #15)."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image

import factory
from minidepth.cli import main
from minidepth.parity import compare
from minidepth.pipeline import StableDiffusionDepth2ImgPipeline
from test_pipeline import photo

CHANGED = "up_blocks.0.resnets.0.conv1"  # the UNet module whose weights the "changed" checkpoint alters


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("parity") / "photo.png"
    photo(64, 48, seed=20).save(path)
    return str(path)


def parity(*args, capsys=None):
    rc = main(["parity", "--quiet", *map(str, args)])
    out = capsys.readouterr().out if capsys else ""
    return rc, out


def test_tiny_checkpoint_every_stage_exact(tiny_checkpoint, photo_file, tmp_path, capsys):
    rc, out = parity("--model", tiny_checkpoint, "--image", photo_file, "--prompt", "a red house by the sea",
                     "--steps", 3, "--json", tmp_path / "parity.json", capsys=capsys)
    assert rc == 0, out
    data = json.loads((tmp_path / "parity.json").read_text())
    names = [s["name"] for s in data["stages"]]
    for expected in ("tokens (prompt)", "text embeddings", "depth estimate (DPT)", "depth channel",
                     "posterior sample (scaled)", "noised latents", "image"):
        assert expected in names
    assert sum(n.endswith(" unet") for n in names) == sum(n.endswith(" latents") and n.startswith("step")
                                                          for n in names) >= 2
    for stage in data["stages"]:
        assert stage["max_abs_diff"] == 0.0 and stage["max_rel_diff"] == 0.0 and stage["ok"], stage
        assert set(stage) == {"name", "shape", "max_abs_diff", "max_rel_diff", "tolerance", "ok"}
    assert data["ok"] and data["first_failure"] is None and data["drill"] is None
    assert "all " in out and "stage" in out.splitlines()[0]


def test_stochastic_scheduler_and_negative_prompt_exact(tiny_checkpoint, photo_file):
    """euler-a draws from the generator at every step: the draws line up too."""
    report = compare(tiny_checkpoint, image=photo_file, prompt="a castle", negative_prompt="blurry", steps=3,
                     strength=1.0, scheduler="euler-a", seed=7)
    assert report.ok, report.table()
    assert all(s.max_abs_diff == 0.0 for s in report.stages)


@pytest.fixture(scope="module")
def changed_checkpoint(tiny_checkpoint, tmp_path_factory):
    """A copy of the tiny checkpoint with a few weights of one UNet convolution changed."""
    from safetensors.torch import load_file, save_file
    folder = tmp_path_factory.mktemp("changed") / "sd2-depth-tiny-changed"
    shutil.copytree(tiny_checkpoint, folder)
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    tensors[f"{CHANGED}.weight"][0, :3, 1, 1] += 0.05
    save_file(tensors, str(path), metadata={"format": "pt"})
    return folder


def test_changed_unet_weights_are_found(changed_checkpoint, tiny_checkpoint, photo_file, tmp_path, capsys):
    rc, out = parity("--model", changed_checkpoint, "--reference-model", tiny_checkpoint, "--image", photo_file,
                     "--prompt", "a red house", "--steps", 3, "--json", tmp_path / "p.json",
                     "--save-diff", tmp_path / "diff.png", capsys=capsys)
    assert rc == 1, out
    data = json.loads((tmp_path / "p.json").read_text())
    stages = {s["name"]: s for s in data["stages"]}
    for name in ("tokens (prompt)", "text embeddings", "depth estimate (DPT)", "depth channel",
                 "posterior sample (scaled)", "noised latents"):
        assert stages[name]["max_abs_diff"] == 0.0, name
    first = data["first_failure"]
    assert first.startswith("step 1/") and first.endswith(" unet")
    assert data["drill"]["network"] == "unet" and data["drill"]["module"] == CHANGED
    assert f"unet: {CHANGED}" in out
    assert not stages["image"]["ok"]
    heat = Image.open(tmp_path / "diff.png")
    assert heat.size == (64, 48) and heat.mode == "RGB" and heat.getextrema()[0][1] > 0


class WrongGuidance(StableDiffusionDepth2ImgPipeline):
    """Our pipeline with a deliberate mistake in a step method, between the first UNet call and the first scheduler
    step: the denoising loop guides with a scale one too high."""

    def denoise(self, *args, guidance_scale=7.5, **kwargs):
        return super().denoise(*args, guidance_scale=guidance_scale + 1, **kwargs)


class CallWithWrongGuidance(StableDiffusionDepth2ImgPipeline):
    """The same mistake in `__call__` itself: every step method is right, `__call__` hands them a guidance scale one
    too high. A tool replaying the step methods would not see it; one running `__call__` does."""

    def __call__(self, *args, guidance_scale=7.5, **kwargs):
        return super().__call__(*args, guidance_scale=guidance_scale + 1, **kwargs)


def test_a_mistake_in_our_call_is_found_at_the_first_step(tiny_checkpoint, photo_file):
    """compare runs our real `__call__`: with a wrong guidance (in `denoise`, or in `__call__` itself) the first
    stage beyond tolerance is step 1's latents, and every earlier stage, step 1's UNet output included, is
    bit-identical; the same components in our own class pass."""
    from minidepth.parity import load_pipelines
    ours, ref = load_pipelines(tiny_checkpoint, None, "fp32", "cpu")
    settings = {"image": photo_file, "prompt": "a red house", "steps": 3}
    assert compare(ours, ref, **settings).ok

    for wrong in (WrongGuidance, CallWithWrongGuidance):
        report = compare(wrong(**ours.components), ref, **settings)
        assert not report.ok, wrong.__name__
        names = [s.name for s in report.stages]
        first = report.first_failure
        assert first.name.startswith("step 1/") and first.name.endswith(" latents"), report.table()
        earlier = report.stages[:names.index(first.name)]
        assert earlier[-1].name.startswith("step 1/") and earlier[-1].name.endswith(" unet")
        assert all(s.max_abs_diff == 0.0 and s.ok for s in earlier), report.table()
        assert first.network is None and report.drill is None  # the guidance runs between the networks
        assert "computed outside the networks" in report.summary()


def test_without_diffusers_one_line_and_exit_2(tiny_checkpoint, photo_file):
    blocker = textwrap.dedent("""
        import sys

        class Block:  # as if diffusers and transformers were not installed
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("diffusers", "transformers"):
                    raise ImportError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, Block())
        from minidepth.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    done = subprocess.run([sys.executable, "-c", blocker, "parity", "--model", str(tiny_checkpoint), "--image",
                           photo_file, "--prompt", "x"], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert 'pip install "minidepth[parity]"' in lines[0] and "diffusers" in lines[0]


def test_bad_usage_exits_2(tiny_checkpoint, photo_file, tmp_path):
    base = ["--model", tiny_checkpoint, "--prompt", "x"]
    assert parity(*base, "--image", tmp_path / "missing.png")[0] == 2
    assert parity(*base, "--image", photo_file, "--strength", 0)[0] == 2
    assert parity(*base, "--image", photo_file, "--scheduler", "nope")[0] == 2
    assert parity("--model", tmp_path / "nowhere", "--prompt", "x", "--image", photo_file)[0] == 2
    (tmp_path / "taken.json").write_text("{}")
    assert parity(*base, "--image", photo_file, "--json", tmp_path / "taken.json")[0] == 2
    with pytest.raises(SystemExit) as e:
        main(["parity", "--model", str(tiny_checkpoint), "--image", photo_file])  # no --prompt
    assert e.value.code == 2


@pytest.mark.official
def test_official_size_every_stage_exact():
    folder = factory.cached_checkpoint("official")
    report = compare(folder, image=photo(64, 64, seed=21), prompt="a red house", steps=2, strength=1.0)
    assert report.ok, report.table()
    assert all(s.max_abs_diff == 0.0 for s in report.stages)
    assert torch.isfinite(report.images[0]).all()


def test_drill_down_names_modules_in_transformers_networks(tiny_checkpoint, photo_file):
    """The key maps also match the DPT's and the text encoder's modules to transformers' names."""
    from minidepth.parity import load_pipelines
    ours, ref = load_pipelines(tiny_checkpoint, None, "fp32", "cpu")
    cases = [("depth_estimator", "backbone.blocks.2.attn.to_v", "dpt.encoder.layer.2.attention.attention.value",
              "depth estimate (DPT)"),
             ("text_encoder", "layers.1.mlp.fc1", "encoder.layers.1.mlp.fc1", "text embeddings")]
    for network, ours_name, ref_name, stage in cases:
        weight = getattr(ours, network).get_submodule(ours_name).weight
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.view(-1)[:3] += 0.05
        try:
            report = compare(ours, ref, image=photo_file, prompt="a house", steps=2)
        finally:
            with torch.no_grad():
                weight.copy_(saved)
        assert report.first_failure.name == stage
        assert (report.drill.network, report.drill.module, report.drill.our_module) == (network, ref_name, ours_name)
