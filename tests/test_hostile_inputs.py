"""Hostile inputs at every entry point but the page (tests/test_web_safety.py has the page): the Python API
(`load_image`, `read_depth_map`, the pipeline's `__call__`, generation.check), `minidepth generate`, `depth`,
`batch` and `train-lora`.

  - files too large (the size policy of minidepth/image_files.py): a PNG whose header claims 12000 x 12000 pixels
    without the data (`claimed_png`: a refusal that decoded anything would fail differently), a .npy header claiming
    (12000, 12000), and a real decompression bomb (`bomb_png`: 400 Mpx of zeros in 49 KB) for PIL's own error;
  - numbers that are no numbers of the kind (NaN, inf, 2.5 steps, text, true) on the command line, in --from PNGs
    and in batch job files; depth maps that are no depth maps (1 bit, booleans, complex numbers, 3-D arrays).
Each refusal's message is asserted; `test_refusals_are_quick_and_decode_nothing` measures them in a subprocess: time
of the refusing call and its peak-RSS growth over the same call refusing a tiny bad file (printed: run with -s).
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from minidepth.cli import batch_jobs, command
from minidepth.image_files import MAX_PIXELS, TooLarge, read_depth_map
from minidepth.image_processing import load_image

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ hostile files
def claimed_png(path: Path, width: int, height: int, mode: str = "RGB", pnginfo=None) -> Path:
    """A valid 8x8 PNG whose IHDR claims width x height (its CRC recomputed): PIL reads that size from the header,
    and decoding would fail on the missing data. A 17 KB file of this kind made the server grow by 3.3 GB (#26)."""
    buffer = io.BytesIO()
    PIL.Image.new(mode, (8, 8)).save(buffer, "PNG", pnginfo=pnginfo)
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def bomb_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A real decompression bomb: a 1-bit grey PNG of width x height zeros (400 Mpx), compressed row by row."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    packer, row = zlib.compressobj(9), bytes(1 + (width + 7) // 8)  # filter byte + the row's bits
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


def claimed_npy(path: Path, shape: tuple, dtype: str = "<f4") -> Path:
    """A .npy header claiming `shape`, without the data."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": shape})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hostile")
    PIL.Image.new("RGB", (64, 48), (120, 90, 60)).save(d / "small.png")
    PIL.Image.new("RGB", (4000, 3000), (90, 120, 200)).save(d / "phone.png")  # a 12 Mpx photo, 42 KB
    PIL.Image.new("1", (64, 48)).save(d / "bits.png")
    (d / "bad.png").write_text("not an image")  # the tiny bad file the measurements compare with
    (d / "bad.npy").write_text("not an array")
    return {"small": d / "small.png", "phone": d / "phone.png", "bits": d / "bits.png", "bad": d / "bad.png",
            "bad_npy": d / "bad.npy", "huge": claimed_png(d / "huge.png", 12000, 12000),
            "huge_grey": claimed_png(d / "huge-grey.png", 12000, 12000, "L"),
            "huge_npy": claimed_npy(d / "huge.npy", (12000, 12000)), "bomb": bomb_png(d / "bomb.png"), "dir": d}


# ------------------------------------------------------------------------------------------------ the Python API
def test_files_too_large_are_refused_from_the_header(files):
    with pytest.raises(TooLarge, match=r"^image file .*huge.png is 12000x12000 pixels \(144.0 Mpx\): a file may "
                                       r"have at most 67.1 Mpx \(16 x the largest image, 4.2 Mpx \(2048x2048\)\) "
                                       r"before it is decoded.*432 MB; make it smaller first, or raise `max_pixels`"):
        load_image(files["huge"])
    with pytest.raises(TooLarge, match=r"huge.npy holds an array of shape \(12000, 12000\) \(144.0 Mpx\).*576 MB"):
        read_depth_map(files["huge_npy"])
    with pytest.raises(TooLarge, match=r"huge-grey.png is 12000x12000 pixels"):
        read_depth_map(files["huge_grey"])
    assert isinstance(TooLarge("x"), ValueError)  # code that reports ValueErrors reports these
    # the limit is the gate: raised, the header passes and the missing data is what fails
    with pytest.raises(ValueError, match="could not be read"):
        load_image(files["huge"], max_pixels=10_000_000)
    with pytest.raises(ValueError, match="not a readable .npy array"):
        read_depth_map(files["huge_npy"], max_pixels=10_000_000)
    assert load_image(files["phone"]).size == (4000, 3000)  # a 12 Mpx photo is read (generating it needs a resize)


def test_a_decompression_bomb_is_refused_naming_the_file(files, capsys):
    assert files["bomb"].stat().st_size < 60_000
    with pytest.raises(TooLarge, match=r"bomb.png claims 400,000,000 pixels, which PIL refuses as a possible "
                                       r"decompression bomb \(400.0 Mpx\): a file may have at most 67.1 Mpx"):
        load_image(files["bomb"])
    with pytest.raises(TooLarge, match=r"PIL refuses to open it as a possible decompression bomb .*whatever "
                                       r"`max_pixels` says"):  # above PIL's own limit (179 Mpx), not ours
        read_depth_map(files["bomb"], max_pixels=30_000_000)
    assert cli(["generate", "--image", str(files["bomb"]), "--prompt", "x"], capsys) == \
        (1, f"minidepth generate: error: --image {files['bomb']} claims 400,000,000 pixels")
    assert cli(["generate", "--image", str(files["small"]), "--prompt", "x", "--depth-map", str(files["bomb"])],
               capsys) == (1, f"minidepth generate: error: --depth-map: {files['bomb']} claims 400,000,000 pixels")


def test_depth_maps_that_are_no_depth_maps(files, tmp_path):
    with pytest.raises(ValueError, match=r"bits.png is a 1-bit black-and-white image; a depth map needs grey levels: "
                                         r"an 8/16-bit grey PNG or a .npy array$"):
        read_depth_map(files["bits"])
    cases = {"bool.npy": (np.zeros((4, 4), bool), "holds a boolean \\(true/false\\) array; a depth map needs numbers"),
             "complex.npy": (np.zeros((4, 4), np.complex64), "holds an array of dtype complex64; a depth map needs "
                                                             "real numbers"),
             "cube.npy": (np.zeros((2, 4, 5), np.float32), r"holds an array of shape \(2, 4, 5\); expected a 2-D"),
             "nan.npy": (np.full((4, 4), np.inf, np.float32), "contains NaN or infinite values")}
    for name, (array, message) in cases.items():
        np.save(tmp_path / name, array)
        with pytest.raises(ValueError, match=message):
            read_depth_map(tmp_path / name)
    ramp = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    grey_palette = PIL.Image.fromarray(ramp).convert("P")  # a grey palette image: its grey levels
    grey_palette.save(tmp_path / "palette.png")
    assert np.array_equal(read_depth_map(tmp_path / "palette.png"), np.asarray(grey_palette.convert("L"), np.float32))
    PIL.Image.fromarray(np.stack([ramp, ramp * 0 + 255], -1), "LA").save(tmp_path / "alpha.png")
    assert np.array_equal(read_depth_map(tmp_path / "alpha.png"), ramp.astype(np.float32))


def test_the_pipeline_refuses_an_image_above_max_pixels_before_any_model_runs():
    import torch
    from minidepth import StableDiffusionDepth2ImgPipeline as Pipeline
    big = PIL.Image.new("RGB", (2056, 2048))
    # `self` None: the check is the call's first step, so nothing of the pipeline is touched before it
    with pytest.raises(ValueError, match=r"^`image` is 2056x2048 pixels \(4.2 Mpx\): images are generated at most "
                                         r"4.2 Mpx \(2048x2048\); resize it, or pass a larger `max_pixels`$"):
        Pipeline.__call__(None, "a cabin", image=big)
    with pytest.raises(AttributeError):  # a larger limit lets it through, to the pipeline's first step
        Pipeline.__call__(None, "a cabin", image=big, max_pixels=2056 * 2048)
    with pytest.raises(ValueError, match=r"`image\[1\]` is 4096x1100 pixels"):
        Pipeline.__call__(None, ["a", "b"], image=[np.zeros((8, 8, 3)), np.zeros((1100, 4096, 3))])
    with pytest.raises(ValueError, match=r"`image` is 2400x2400 pixels"):  # latents count 8 x their sides
        Pipeline.__call__(None, "a cabin", image=torch.zeros(1, 4, 300, 300))
    with pytest.raises(ValueError, match=r"`max_pixels` 0: must be an integer >= 64"):
        Pipeline.__call__(None, "a cabin", image=big, max_pixels=0)


def test_generation_check_refuses_sizes_above_max_pixels(files):
    from minidepth import generation
    job = generation.Job(prompt="x", photo_path=str(files["phone"]), model="m")
    with pytest.raises(TooLarge, match=r"--image .*phone.png is 4000x3000 pixels \(12.0 Mpx\): images are generated "
                                       r"at most 4.2 Mpx \(2048x2048\); pass --width/--height for a smaller size, "
                                       r"or raise --max-pixels$"):
        generation.check(job)
    generation.check(generation.Job(**{**vars(job), "width": 1024}))  # resized: fine
    generation.check(generation.Job(**{**vars(job), "max_pixels": 12_000_000}))  # a larger limit: fine
    with pytest.raises(TooLarge, match=r"small.png, resized, is 4096x4096 pixels \(16.8 Mpx\)"):
        generation.check(generation.Job(prompt="x", photo_path=str(files["small"]), model="m", width=4096,
                                        height=4096))
    with pytest.raises(TooLarge, match=r"^--image .*huge.png is 12000x12000 pixels.*raise --max-pixels$"):
        generation.check(generation.Job(prompt="x", photo_path=str(files["huge"]), model="m", width=512))


# ------------------------------------------------------------------------------------------------ the command line
def cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, the first line on stderr, cut after the part a test compares) of `minidepth ARGV`."""
    try:
        code = command.main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    line = capsys.readouterr().err.strip().splitlines()[0]
    return code, line.split(" (see `")[0].split(" (144.0")[0].split(", which PIL")[0]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "nan"], "--steps nan: must be an integer >= 1 (the number of scheduler steps)"),
    (["--steps", "2.5"], "--steps 2.5: must be an integer >= 1 (the number of scheduler steps)"),
    (["--num-images", "nan"], "--num-images nan: must be an integer >= 1"),
    (["--seed", "inf"], "--seed inf: must be -1 (a random seed) or an integer in [0, 9223372036854775807]"),
    (["--width", "nan"], "--width nan: must be a multiple of 8, at least 8"),
    (["--height", "1.5"], "--height 1.5: must be a multiple of 8, at least 8"),
    (["--strength", "nan"], "--strength nan: must be a number in [0, 1] (1 repaints everything)"),
    (["--guidance", "inf"], "--guidance inf: must be a finite number (guidance is on when > 1)"),
    (["--eta=-inf"], "--eta -inf: must be a number >= 0 (0: deterministic DDIM, 1: DDPM-like noise)"),
    (["--max-pixels", "nan"], "--max-pixels nan: must be an integer >= 64 (pixels; 8x8 is the smallest image)"),
    (["--max-pixels", "10"], "--max-pixels 10: must be an integer >= 64 (pixels; 8x8 is the smallest image)"),
])
def test_generate_refuses_numbers_of_the_wrong_kind(argv, message, capsys):
    assert cli(["generate", "--image", "in.png", "--prompt", "x", *argv], capsys) == \
        (2, f"minidepth generate: error: {message}")


@pytest.mark.parametrize("argv, message", [
    (["batch", "jobs.jsonl", "--out", "o", "--steps", "nan"], "--steps nan: must be an integer >= 1"),
    (["batch", "jobs.jsonl", "--out", "o", "--guidance", "nan"], "--guidance nan: must be a finite number"),
    (["batch", "jobs.jsonl", "--out", "o", "--max-pixels", "1e9.5"], "--max-pixels 1e9.5: must be an integer"),
    (["depth", "--image", "in.png", "--out", "o.png", "--max-pixels", "1.5"], "--max-pixels 1.5: must be an integer"),
    (["serve", "--max-pixels", "abc"], "--max-pixels abc: must be an integer"),
    (["train-lora", "--data", "d", "--out", "o.safetensors", "--max-pixels", "inf"], "--max-pixels inf: must be"),
])
def test_other_commands_refuse_numbers_of_the_wrong_kind(argv, message, capsys):
    code, line = cli(argv, capsys)
    assert code == 2 and line.startswith(f"minidepth {argv[0]}: error: {message}"), line


def test_from_png_with_values_that_are_no_numbers(files, tmp_path, capsys):
    """`generate --from` reads a PNG's JSON record, which may hold NaN or text (the record is anyone's file)."""
    from PIL.PngImagePlugin import PngInfo
    for key, value, message in (("steps", float("nan"), "--steps nan: must be an integer >= 1"),
                                ("guidance", "loud", "--guidance loud: must be a finite number"),
                                ("seed", 1.5, "--seed 1.5: must be -1 (a random seed) or an integer")):
        record = {"prompt": "a cabin", "image": str(files["small"]), "steps": 10, key: value}
        chunks = PngInfo()
        chunks.add_itxt("minidepth", json.dumps(record))  # minidepth's JSON record (png_metadata.JSON_KEY)
        PIL.Image.new("RGB", (8, 8)).save(tmp_path / "record.png", pnginfo=chunks)
        code, line = cli(["generate", "--from", str(tmp_path / "record.png")], capsys)
        assert code == 2 and line.startswith(f"minidepth generate: error: {message}"), line


def test_generate_and_depth_refuse_files_too_large(files, capsys):
    small, huge = str(files["small"]), str(files["huge"])
    expect = {("generate", "--image", huge): f"--image {huge} is 12000x12000 pixels",
              ("generate", "--image", small, "--depth-map", str(files["huge_npy"])):
                  f"--depth-map: {files['huge_npy']} holds an array of shape (12000, 12000)",
              ("generate", "--image", small, "--depth-map", str(files["bits"])):
                  f"--depth-map: {files['bits']} is a 1-bit black-and-white image; a depth map needs grey levels: "
                  "an 8/16-bit grey PNG or a .npy array",
              ("depth", "--image", huge, "--out", "o.png"): f"--image {huge} is 12000x12000 pixels"}
    for argv, message in expect.items():
        prompt = ["--prompt", "x"] if argv[0] == "generate" else []
        assert cli([*argv, *prompt], capsys) == (1, f"minidepth {argv[0]}: error: {message}")
    code, line = cli(["generate", "--image", str(files["phone"]), "--prompt", "x"], capsys)  # too large to generate
    assert code == 1 and line.endswith("images are generated at most 4.2 Mpx (2048x2048); pass --width/--height "
                                       "for a smaller size, or raise --max-pixels"), line


def test_info_of_a_huge_png_reads_its_settings_without_decoding(files, tmp_path, capsys):
    from minidepth.cli.png_metadata import png_info
    record = {"prompt": "a cabin", "steps": 10, "guidance": 7.5, "seed": 3, "size": [12000, 12000], "strength": 0.8,
              "image": str(files["small"])}
    big = claimed_png(tmp_path / "big.png", 12000, 12000, pnginfo=png_info(record))
    assert command.main(["info", "--json", str(big)]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 3


def test_batch_job_files_name_the_field_and_the_cause(files, tmp_path):
    defaults = {"prompt": "x", "strength": 0.8, "steps": 50, "guidance_scale": 7.5, "num_images": 1,
                "base_seed": 0, "max_pixels": MAX_PIXELS}
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"image": "a.png", "steps": NaN}\n{"image": "a.png", "guidance_scale": Infinity}\n')
    small = str(files["small"])
    assert [batch_jobs.check_job(job, i, defaults, jobs)[1] for i, job in enumerate(batch_jobs.read_jobs(jobs))] == \
        ["steps nan: must be an integer in [1, 1000]", "guidance_scale inf: must be a finite number"]
    for fields, error in [({"seed": "abc"}, "seed abc: must be an integer >= 0"),
                          ({"num_images": 2.5}, "num_images 2.5: must be an integer >= 1"),
                          ({"steps": True}, "steps True: must be an integer in [1, 1000]"),
                          ({"strength": "nan"}, "strength nan: must be a number in [0, 1]"),
                          ({"steps": "12", "seed": 3.0}, None),
                          ({"image": str(files["huge"])}, f"image {files['huge']} is 12000x12000 pixels (144.0 Mpx)"),
                          ({"image": str(files["bomb"])}, f"image {files['bomb']} claims 400,000,000 pixels"),
                          ({"image": str(files["phone"])}, f"image {files['phone']} is 4000x3000 pixels (12.0 Mpx): "
                                                           "images are generated at most 4.2 Mpx (2048x2048); "
                                                           "resize the photo first, or raise --max-pixels"),
                          ({"depth_map": str(files["huge_npy"])}, f"depth_map: {files['huge_npy']} holds an array"),
                          ({"depth_map": str(files["bits"])}, f"depth_map: {files['bits']} is a 1-bit black-and")]:
        job, found = batch_jobs.check_job({"image": small, **fields}, 0, defaults, jobs)
        assert (found if error is None else (found or "")[:len(error)]) == error, found
        if error is None:  # numbers as text, or integral floats: read as what they are
            assert job["steps"] == 12 and job["seed"] == 3


def test_train_lora_refuses_files_too_large_and_crops_above_the_limit(files, tmp_path):
    from minidepth.train.config import TrainConfig, TrainError, check_config
    from minidepth.train.data import scan_folder
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.png").write_bytes(files["huge"].read_bytes())
    (folder / "b.png").write_bytes(files["small"].read_bytes())
    (folder / "b.depth.png").write_bytes(files["huge_grey"].read_bytes())
    for name in ("a", "b"):
        (folder / f"{name}.txt").write_text("a cabin")
    with pytest.raises(TrainError, match=r"2 unreadable file\(s\):\n  .*a.png is 12000x12000 pixels \(144.0 Mpx\).*"
                                         r"raise --max-pixels\n  .*b.depth.png is 12000x12000 pixels"):
        scan_folder(folder)
    with pytest.raises(TrainError, match=r"--resolution 4096: must be at most 2048: 4096x4096 crops are above "
                                         r"--max-pixels 4194304"):
        check_config(TrainConfig(data=str(folder), resolution=4096))
    check_config(TrainConfig(data=str(folder), resolution=4096, max_pixels=4096 ** 2))


# ------------------------------------------------------------------------------------------------ measured
MEASURE = """
import contextlib, io, json, resource, sys, time
from minidepth.cli.command import main
from minidepth.image_files import read_depth_map
from minidepth.image_processing import load_image

def run(kind, args):
    err, start = io.StringIO(), time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            result = main(args) if kind == "cli" else {"load_image": load_image, "read_depth_map": read_depth_map}[kind](*args)
        except (ValueError, SystemExit) as e:
            result = str(e)
    return {"seconds": time.perf_counter() - start, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "said": (err.getvalue() or str(result)).strip()}

print(json.dumps([run(kind, args) for kind, args in json.loads(sys.argv[1])]))
"""


def entry_points(f: dict, tmp: Path) -> dict[str, tuple]:
    """name -> (kind, arguments with {file} for the file refused, the huge file): each is run with a tiny bad file
    first (the comparison, and the warm-up of the lazy imports), then with the huge one."""
    tmp.mkdir(exist_ok=True)
    for label, image in (("tiny", f["bad"]), ("huge", f["huge"])):
        (tmp / f"jobs-{label}.jsonl").write_text(json.dumps({"image": str(image), "prompt": "x"}) + "\n")
        (tmp / f"data-{label}").mkdir(exist_ok=True)
        (tmp / f"data-{label}" / "a.png").write_bytes(image.read_bytes())
        (tmp / f"data-{label}" / "a.txt").write_text("a cabin")
    small, out = str(f["small"]), str(tmp / "out.png")
    return {"API load_image": ("load_image", ["{file}"], f["huge"]),
            "API read_depth_map (.npy)": ("read_depth_map", ["{file}"], f["huge_npy"]),
            "API read_depth_map (bomb PNG)": ("read_depth_map", ["{file}"], f["bomb"]),
            "generate --image": ("cli", ["generate", "--image", "{file}", "--prompt", "x", "--out", out], f["huge"]),
            "generate --image (bomb)": ("cli", ["generate", "--image", "{file}", "--prompt", "x", "--out", out],
                                        f["bomb"]),
            "generate --depth-map (PNG)": ("cli", ["generate", "--image", small, "--depth-map", "{file}", "--prompt",
                                                   "x", "--out", out], f["huge_grey"]),
            "generate --depth-map (.npy)": ("cli", ["generate", "--image", small, "--depth-map", "{file}", "--prompt",
                                                    "x", "--out", out], f["huge_npy"]),
            "depth --image": ("cli", ["depth", "--image", "{file}", "--out", out], f["huge"]),
            "batch": ("cli", ["batch", str(tmp / "jobs-{label}.jsonl"), "--out", str(tmp / "batch-{label}"), "-q"],
                      None),
            "train-lora": ("cli", ["train-lora", "--data", str(tmp / "data-{label}"), "--out",
                                   str(tmp / "lora-{label}.safetensors"), "-q"], None)}


def test_refusals_are_quick_and_decode_nothing(files, tmp_path):
    """Each entry point refuses a 12000x12000 file (and the bomb) in under a second, with a peak RSS under 200 MB
    above the same call refusing a tiny bad file, in one subprocess each."""
    rows = []
    for name, (kind, args, huge) in entry_points(files, tmp_path / "work").items():
        bad = files["bad_npy"] if huge is not None and huge.suffix == ".npy" else files["bad"]
        calls = [[kind, [a.format(file=file, label=label) for a in args]] for label, file in (("tiny", bad),
                                                                                                ("huge", huge))]
        result = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(calls)], capture_output=True, text=True,
                                timeout=120, cwd=tmp_path, env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
                                                                "PATH": "/usr/bin:/bin"})
        assert result.returncode == 0, result.stderr
        tiny, big = json.loads(result.stdout)
        growth_mb = (big["peak_kb"] - tiny["peak_kb"]) / 1024
        rows.append(f"{name:<30} {big['seconds'] * 1000:7.1f} ms  peak RSS +{growth_mb:6.1f} MB  "
                    f"(tiny bad file: {tiny['seconds'] * 1000:.1f} ms)")
        assert "144.0 Mpx" in big["said"] or "400,000,000 pixels" in big["said"], (name, big["said"])
        assert big["seconds"] < 1.0 and growth_mb < 200, rows[-1]
    print("\nrefusal of a 12000x12000 file (bomb: 20000x20000):\n" + "\n".join(rows))
