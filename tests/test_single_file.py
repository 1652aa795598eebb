"""The original single file (`512-depth-ema.safetensors` / `.ckpt`): loading the whole pipeline from it, `convert` both
ways, and the errors for files that are not SD2-depth, corrupt, or have unknown / missing tensors (issue #14).

The official-size test builds a hub-faithful single file (the 1,610 names, shapes and dtypes of
`keys/ldm_512-depth-ema_ALL_1610_keys_sorted.tsv`) from the random-weight diffusers checkpoint, using the shared
reference maps `keys/map_*.tsv` -- independent of minidepth's own key maps -- so a wrong rule cannot cancel out."""

import gc
import json
import re
import shutil
import struct
from pathlib import Path

import factory
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_pipeline import assert_close, photo

from minidepth import StableDiffusionDepth2ImgPipeline
from minidepth.checkpoints import CheckpointError, TensorFile, export_state_dict
from minidepth.checkpoints.ldm_format import MIDAS_KEYS
from minidepth.checkpoints.single_file import PACKAGED_CONFIGS, convert, ddpm_buffers, write_tensors

KEYS = Path(__file__).parent / "data" / "keys"
# minidepth in exact mode against diffusers on the same weights: diffusers' kernels in diffusers' order, bit-identical
# images on any CPU (measured 0 with AVX-512 and AVX2 kernels).
TOL = 0
RUN = dict(prompt="a red house by the sea", num_inference_steps=2, output_type="np")


def image_of(pipe, seed=0, size=64):
    """The image of a fixed call; minidepth in exact mode (diffusers' kernels), for comparisons with diffusers."""
    pipe.set_progress_bar_config(disable=True)
    if isinstance(pipe, StableDiffusionDepth2ImgPipeline):
        pipe.set_exact(True)
    return pipe(image=photo(size, size, 21), generator=torch.Generator().manual_seed(seed), **RUN).images


def reference_pipeline(folder, **kwargs):
    from diffusers import StableDiffusionDepth2ImgPipeline as Reference
    return Reference.from_pretrained(folder, **kwargs)


# ------------------------------------------------------------------------------------------------ tiny fixtures
@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, tmp_path_factory):
    """(the tiny diffusers folder, its single file written by `convert`, diffusers' image on the folder)."""
    path = convert(tiny_checkpoint, tmp_path_factory.mktemp("single") / "tiny-depth.safetensors")
    return tiny_checkpoint, path, image_of(reference_pipeline(tiny_checkpoint))


def variant_of(path: Path, tmp_path: Path, edit) -> Path:
    """A copy of the single file at `path` with its tensor dict changed by `edit(dict)`."""
    tensors = dict(load_file(str(path)))
    edit(tensors)
    out = tmp_path / "edited.safetensors"
    save_file(tensors, str(out))
    return out


def load_error(path, config) -> str:
    with pytest.raises(CheckpointError) as e:
        StableDiffusionDepth2ImgPipeline.from_single_file(path, config=config)
    return str(e.value)


# ------------------------------------------------------------------------------------------------ tiny tests
def test_from_single_file_gives_diffusers_image_safetensors_and_ckpt(tiny, tmp_path):
    folder, path, expected = tiny
    ours = StableDiffusionDepth2ImgPipeline.from_single_file(path, config=folder)
    got = image_of(ours)
    assert_close(got, expected, tol=TOL, what="tiny single file vs diffusers folder")
    ckpt = write_tensors(dict(TensorFile(path)), tmp_path / "tiny-depth.ckpt")  # {"state_dict": ...} as LDM saves
    again = image_of(StableDiffusionDepth2ImgPipeline.from_single_file(ckpt, config=folder))
    assert_close(again, got, tol=0, what="tiny .ckpt vs .safetensors")


def test_convert_to_folder_loads_in_diffusers_with_same_image(tiny, tmp_path):
    folder, path, expected = tiny
    out = convert(path, tmp_path / "converted", fp16=True, config=folder)
    assert_close(image_of(reference_pipeline(out)), expected, tol=TOL, what="tiny convert -> diffusers")
    half = reference_pipeline(out, variant="fp16", dtype=torch.float16)  # the variant files load too
    assert next(half.unet.parameters()).dtype == torch.float16
    assert (out / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()


def test_folder_to_file_to_folder_to_file_keeps_every_tensor(tiny, tmp_path):
    folder, path, _ = tiny
    back = convert(path, tmp_path / "back", config=folder)
    again = convert(back, tmp_path / "again.safetensors")
    first, second = load_file(str(path)), load_file(str(again))
    assert sorted(first) == sorted(second)
    assert all(torch.equal(first[k], second[k]) for k in first)
    from minidepth.checkpoints.components import load_components
    a, b = load_components(folder), load_components(back)
    for name in ("unet", "vae", "text_encoder", "depth_estimator"):
        sa, sb = a[name].state_dict(), b[name].state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_cli_convert_both_ways(tiny, tmp_path, capsys):
    from minidepth.cli import main
    folder, path, _ = tiny
    assert main(["convert", str(path), "--out", str(tmp_path / "f"), "--config", str(folder), "-q"]) == 0
    assert (tmp_path / "f" / "model_index.json").is_file()
    assert main(["convert", str(tmp_path / "f"), "--out", str(tmp_path / "x.ckpt"), "-q"]) == 0
    assert sorted(TensorFile(tmp_path / "x.ckpt")) == sorted(TensorFile(path))
    assert main(["convert", str(tmp_path / "f"), "--out", str(tmp_path / "x.png")]) == 2  # bad target name
    assert main(["convert", str(path), "--out", str(tmp_path / "f")]) == 2  # folder exists and is not empty
    assert main(["convert", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "*.safetensors or *.ckpt" in err and "not an empty folder" in err and "does not exist" in err


def _tiny_extras(tensors):
    """The known extras at the tiny configs' shapes: OpenCLIP's extra block and head, the MiDaS classifier, DDPM
    buffers, EMA counters and an EMA shadow."""
    d = tensors["cond_stage_model.model.token_embedding.weight"].shape[1]
    n = max(int(m.group(1)) for k in tensors for m in [re.search(r"resblocks\.(\d+)\.", k)] if m) + 1
    block = f"cond_stage_model.model.transformer.resblocks.{n}."
    for name, t in list(tensors.items()):
        if name.startswith("cond_stage_model.model.transformer.resblocks.0."):
            tensors[block + name[len("cond_stage_model.model.transformer.resblocks.0."):]] = t.clone()
    width = tensors["depth_model.model.pretrained.model.cls_token"].shape[-1]
    tensors.update({"cond_stage_model.model.text_projection": torch.randn(d, 16),
                    "cond_stage_model.model.logit_scale": torch.tensor(4.6),
                    "depth_model.model.pretrained.model.head.weight": torch.randn(1000, width),
                    "depth_model.model.pretrained.model.head.bias": torch.randn(1000),
                    "model_ema.decay": torch.tensor(0.9999),
                    "model_ema.num_updates": torch.tensor(7, dtype=torch.int32),
                    "model_ema.diffusion_modelout2bias": tensors["model.diffusion_model.out.2.bias"].clone(),
                    **ddpm_buffers(factory.official_config("scheduler_config.json"))})


def test_known_extras_are_accepted_and_shape_checked(tiny, tmp_path):
    folder, path, expected = tiny
    with_extras = variant_of(path, tmp_path, _tiny_extras)
    got = image_of(StableDiffusionDepth2ImgPipeline.from_single_file(with_extras, config=folder))
    assert_close(got, expected, tol=TOL, what="tiny single file with all known extras")

    def bad_extra(t):
        _tiny_extras(t)
        t["cond_stage_model.model.logit_scale"] = torch.ones(2)
        t["betas"] = torch.ones(999)
    message = load_error(variant_of(path, tmp_path, bad_extra), folder)
    assert "cond_stage_model.model.logit_scale: [2], expected []" in message
    assert "betas: [999], expected [1000]" in message


def test_unknown_and_missing_tensors_are_named(tiny, tmp_path):
    folder, path, _ = tiny

    def edit(t):
        t["first_stage_model.encoder.extra.weight"] = torch.zeros(3)
        del t["model.diffusion_model.out.2.bias"]
    message = load_error(variant_of(path, tmp_path, edit), folder)
    assert "unknown tensors" in message and "first_stage_model.encoder.extra.weight" in message
    assert "missing tensors" in message and "model.diffusion_model.out.2.bias" in message
    assert str(tmp_path / "edited.safetensors") in message


@pytest.mark.parametrize("kind", ["sd1", "sd2-v", "inpainting", "no-depth", "midas", "sdxl"])
def test_a_file_that_is_not_sd2_depth_says_what_it_looks_like(tiny, tmp_path, kind):
    folder, path, _ = tiny

    def edit(t):
        conv_in = "model.diffusion_model.input_blocks.0.0.weight"
        if kind in ("sd1", "sd2-v", "inpainting", "no-depth"):
            for name in [n for n in t if n.startswith("depth_model.")]:
                del t[name]
        if kind in ("sd1", "sd2-v"):
            t[conv_in] = t[conv_in][:, :4].contiguous()
        if kind == "inpainting":
            t[conv_in] = torch.cat([t[conv_in]] * 2, 1)[:, :9].contiguous()
        if kind == "sd1":
            for name in [n for n in t if n.startswith("cond_stage_model.")]:
                t[name.replace("cond_stage_model.model.", "cond_stage_model.transformer.text_model.")] = t.pop(name)
        if kind == "midas":
            for name in list(t):
                value = t.pop(name)
                if name.startswith("depth_model.model."):
                    t[name[len("depth_model.model."):]] = value
        if kind == "sdxl":
            t["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.ones(3)
    message = load_error(variant_of(path, tmp_path, edit), folder)
    assert "is not a Stable Diffusion 2 depth checkpoint" in message
    assert str(tmp_path / "edited.safetensors") in message
    assert {"sd1": "Stable Diffusion 1.x text-to-image model (UNet conv_in takes 4 input channels; CLIP ViT-L",
            "sd2-v": "Stable Diffusion 2.x text-to-image (e.g. 2.0/2.1 base or 768-v) model",
            "inpainting": "inpainting model (UNet conv_in takes 9 input channels",
            "no-depth": "depth-to-image model (UNet conv_in takes 5 input channels; OpenCLIP under "
                        "cond_stage_model.model.*; no depth_model.*)",
            "midas": "MiDaS' own depth model file",
            "sdxl": "Stable Diffusion XL"}[kind] in message


def test_truncated_and_corrupt_files_name_the_file(tiny, tmp_path):
    folder, path, _ = tiny
    data = path.read_bytes()
    for name, content in (("truncated.safetensors", data[:len(data) // 2]), ("garbage.safetensors", b"\x00" * 64),
                          ("garbage.ckpt", b"not a pickle at all"), ("truncated.ckpt", None)):
        target = tmp_path / name
        if content is None:
            write_tensors(dict(TensorFile(path)), target)
            content = target.read_bytes()[:5000]
        target.write_bytes(content)
        with pytest.raises(CheckpointError, match=re.escape(str(target))):
            StableDiffusionDepth2ImgPipeline.from_single_file(target, config=folder)
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        StableDiffusionDepth2ImgPipeline.from_single_file(tmp_path / "nowhere.safetensors", config=folder)


def test_original_midas_file_loads_into_the_depth_estimator(tiny, tmp_path):
    from minidepth.models.dpt import DPTDepthModel
    folder, _, _ = tiny
    ours = DPTDepthModel.from_pretrained(folder / "depth_estimator")
    tensors = export_state_dict(ours, MIDAS_KEYS)  # MiDaS' names, no prefix
    tensors["pretrained.model.head.weight"] = torch.randn(1000, ours.config.hidden_size)
    tensors["pretrained.model.head.bias"] = torch.randn(1000)
    torch.save(tensors, tmp_path / "dpt_hybrid-midas-501f0c75.pt")
    loaded = DPTDepthModel.from_single_file(tmp_path / "dpt_hybrid-midas-501f0c75.pt", ours.config)
    a, b = ours.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_packaged_configs_and_vocabulary():
    """The weight-less SD2-depth folder shipped in the package: the reference configs and the hub tokenizer."""
    from minidepth.tokenizer import CLIPTokenizer
    configs = factory.CONFIGS
    pairs = {"unet/config.json": "unet_config.json", "vae/config.json": "vae_config.json",
             "text_encoder/config.json": "text_encoder_config.json",
             "depth_estimator/config.json": "depth_estimator_config.json",
             "scheduler/scheduler_config.json": "scheduler_config.json", "model_index.json": "model_index.json",
             "feature_extractor/preprocessor_config.json": "feature_extractor_preprocessor_config.json",
             "tokenizer/special_tokens_map.json": "tokenizer_special_tokens_map.json",
             "tokenizer/tokenizer_config.json": "tokenizer_tokenizer_config.json"}
    for packaged, reference in pairs.items():
        assert (PACKAGED_CONFIGS / packaged).read_bytes() == (configs / reference).read_bytes(), packaged
    ours = CLIPTokenizer.from_pretrained(PACKAGED_CONFIGS / "tokenizer")
    hub = CLIPTokenizer.from_pretrained(factory.component_folder("tiny", "tokenizer"))
    text = ["a photo of an astronaut riding a horse on mars!!", "Ünïcödé & 12345"]
    assert ours(text, padding="max_length", max_length=77).input_ids == \
        hub(text, padding="max_length", max_length=77).input_ids
    # pyproject's package-data globs cover every packaged file (so wheels and `pip install -e .` have them)
    import fnmatch

    import tomllib
    globs = tomllib.loads((factory.REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    data = [p.relative_to(factory.REPO / "minidepth").as_posix()
            for p in (factory.REPO / "minidepth" / "data").rglob("*") if p.is_file()]
    assert data and all(any(fnmatch.fnmatchcase(f, g) and f.count("/") == g.count("/") for g in globs["minidepth"])
                        for f in data)


def test_ddpm_buffers_match_the_scheduler():
    from diffusers import PNDMScheduler
    config = factory.official_config("scheduler_config.json")
    ours = ddpm_buffers(config)
    ref = PNDMScheduler.from_config(config)
    assert torch.allclose(ours["alphas_cumprod"], ref.alphas_cumprod, rtol=1e-5, atol=0)
    assert torch.allclose(ours["betas"], ref.betas, rtol=1e-5, atol=0)
    expected = ldm_ddpm_buffers(config)
    assert all(torch.equal(ours[k], expected[k]) for k in expected)


# ------------------------------------------------------------------------------------------------ official size
def ldm_ddpm_buffers(config) -> dict:
    """LDM's DDPM.register_schedule, transcribed (numpy float64, then float32)."""
    betas = np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, config["num_train_timesteps"],
                        dtype=np.float64) ** 2
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    pv = betas * (1.0 - ac_prev) / (1.0 - ac)
    values = {"betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
              "sqrt_alphas_cumprod": np.sqrt(ac), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
              "log_one_minus_alphas_cumprod": np.log(1.0 - ac), "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
              "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1), "posterior_variance": pv,
              "posterior_log_variance_clipped": np.log(np.maximum(pv, 1e-20)),
              "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
              "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)}
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}


class PlainSafetensors:
    """A .safetensors file read tensor by tensor with plain file reads: no memory map, whose pages would all count as
    resident memory once touched (two 5.5 GB official files compared through mmap: 11+ GB). Independent of minidepth's
    reader, and of the safetensors package."""
    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}

    def __init__(self, path: Path):
        self.file = open(path, "rb")
        size = struct.unpack("<Q", self.file.read(8))[0]
        self.header = json.loads(self.file.read(size))
        self.header.pop("__metadata__", None)
        self.start = 8 + size

    def __iter__(self):
        return iter(self.header)

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self.header[name]
        begin, end = info["data_offsets"]
        self.file.seek(self.start + begin)
        data = bytearray(self.file.read(end - begin))
        flat = torch.frombuffer(data, dtype=self.DTYPES[info["dtype"]]) if data else \
            torch.empty(0, dtype=self.DTYPES[info["dtype"]])
        return flat.reshape(info["shape"])

    def close(self):
        self.file.close()


def read_tsv(name: str) -> list[list[str]]:
    return [line.split("\t") for line in (KEYS / name).read_text().splitlines()[1:] if line.strip()]


def hub_faithful_single_file(folder: Path, path: Path) -> dict:
    """The 1,610-tensor `512-depth-ema.safetensors` of the diffusers checkpoint `folder`, built with the reference
    `keys/map_*.tsv` (not minidepth's key maps); tensors the folder lacks get random values of the listed shape.
    Returns {name: (shape, dtype)} as written."""
    lines = (KEYS / "ldm_512-depth-ema_ALL_1610_keys_sorted.tsv").read_text().splitlines()
    listed = {row[0]: row[1:] for row in (line.split("\t") for line in lines)}
    maps = {"map_unet_ldm_to_diffusers.tsv": folder / "unet" / "diffusion_pytorch_model.safetensors",
            "map_vae_ldm_to_diffusers.tsv": folder / "vae" / "diffusion_pytorch_model.safetensors",
            "map_openclip_ldm_to_transformers_clip.tsv": folder / "text_encoder" / "model.safetensors",
            "map_midas_to_transformers_dpt.tsv": folder / "depth_estimator" / "model.safetensors"}
    out, rows_of = {}, {}
    for map_name, weights in maps.items():
        tensors = load_file(str(weights))
        for new, old in factory.LEGACY_VAE_ATTENTION.items():  # the hub VAE's legacy names -> the map's
            tensors = {k.replace(f"attentions.0.{old}.", f"attentions.0.{new}."): v for k, v in tensors.items()}
        for target, source, transform in read_tsv(map_name):
            if target == "(dropped)":
                continue
            rows = re.match(r"rows \[(\d+):(\d+)\]", transform)
            if rows:
                rows_of.setdefault(source, {})[int(rows.group(1))] = tensors[target]
            elif transform.startswith("squeeze"):
                out[source] = tensors[target][:, :, None, None]
            else:
                assert transform == "copy", transform
                out[source] = tensors[target]
    for source, parts in rows_of.items():
        out[source] = torch.cat([parts[k] for k in sorted(parts)], 0)
    generator = torch.Generator().manual_seed(5)
    buffers = ldm_ddpm_buffers(factory.official_config("scheduler_config.json"))
    for name, (shape, dtype) in listed.items():
        if name not in out:
            dims = [int(x) for x in shape.strip("[]").split(",") if x.strip()]
            out[name] = buffers[name] if name in buffers else torch.tensor(0.9999) if name == "model_ema.decay" \
                else torch.tensor(1234, dtype=torch.int32) if name == "model_ema.num_updates" \
                else torch.randn(dims, generator=generator) * 0.02
    written = {k: (str(list(v.shape)).replace(" ", ""), str(v.dtype).replace("torch.", "")) for k, v in out.items()}
    listed = {k: (s.replace(" ", ""), d) for k, (s, d) in listed.items()}
    assert written == listed  # the 1,610 names, shapes and dtypes of the real file
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    return written


@pytest.mark.official
def test_official_hub_faithful_single_file(tmp_path, own_process):
    """At the real sizes: the hub-faithful file loads with the packaged configs and gives diffusers' image for the
    diffusers checkpoint of the same weights; `convert` -> diffusers loads -> same image; converted folder -> single
    file -> every tensor the folder can hold is identical to the original file's. (In a process of its own.)"""
    if own_process:
        return
    folder = factory.cached_checkpoint("official")
    path = tmp_path / "512-depth-ema.safetensors"
    listed = hub_faithful_single_file(folder, path)
    assert len(listed) == 1610

    ref = reference_pipeline(folder)
    expected = image_of(ref)
    del ref
    gc.collect()

    ours = StableDiffusionDepth2ImgPipeline.from_single_file(path)  # packaged configs, offline
    assert_close(image_of(ours), expected, tol=TOL, what="official single file vs diffusers folder")
    del ours
    gc.collect()

    converted = convert(path, tmp_path / "converted")
    again = reference_pipeline(converted)
    assert_close(image_of(again), expected, tol=TOL, what="official convert -> diffusers")
    del again
    gc.collect()

    back = convert(converted, tmp_path / "back.safetensors")
    shutil.rmtree(converted)
    original, written = PlainSafetensors(path), PlainSafetensors(back)  # one tensor of each in memory at a time
    not_in_a_folder = {n for n in original if n.startswith(("cond_stage_model.model.transformer.resblocks.23.",
                                                            "model_ema.", "depth_model.model.pretrained.model.head."))
                       or n in ("cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale")}
    assert len(not_in_a_folder) == 12 + 2 + 2 + 2
    assert sorted(written) == sorted(set(original) - not_in_a_folder)
    different = [n for n in written if not torch.equal(written[n], original[n])]
    original.close()
    written.close()
    assert not different, different[:5]
