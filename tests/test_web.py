"""`minidepth serve`, end to end: a real browser (Debian's headless chromium driven by Playwright) and gradio's client
API against the server started as a subprocess on the tiny checkpoint, on a free localhost port.

One server serves every test of this module (its start imports torch and gradio and loads the model: seconds), and one
`minidepth generate` run is the reference: the page's image and the API's image must equal it pixel for pixel.
Skipped, with the reason, when gradio / gradio_client / playwright / chromium are missing (`pip install -e ".[test]"`
installs the Python packages; `.ci/run` installs chromium and sets MINIDEPTH_REQUIRE_BROWSER=1, which turns those skips
into failures). The page's screenshot is kept in the test's tmp folder; MINIDEPTH_WEB_SCREENSHOT=docs/web-screenshot.png
also writes the README's copy.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

import factory

REQUIRED = bool(os.environ.get("MINIDEPTH_REQUIRE_BROWSER"))  # .ci/run sets it: CI must run these tests


def missing(reason: str):
    """Skip, with the reason (a plain `pip install -e .` has no gradio); fail instead where CI requires the tests."""
    if REQUIRED:
        pytest.fail(f"{reason}, and MINIDEPTH_REQUIRE_BROWSER is set", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def need(module: str, reason: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        missing(reason)


need("gradio", "gradio is not installed (pip install -e \".[web]\" or \".[test]\")")

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a wooden cabin in the snow"
SETTINGS = {"seed": 7, "steps": 10, "strength": 0.6}  # 6 denoising steps; guidance, scheduler: the defaults
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def pixels(data: bytes | Path) -> np.ndarray:
    with PIL.Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
        return np.asarray(img.convert("RGB")).copy()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("web")
    from minidepth.cli.serve import SAMPLE_PHOTO
    with PIL.Image.open(SAMPLE_PHOTO) as sample:  # the bundled sample, small: the tiny model runs in a second
        sample.resize((128, 96), PIL.Image.LANCZOS).save(folder / "photo.png")
    return folder


@contextlib.contextmanager
def serving(args: list[str], env: dict, log: Path, cwd: Path):
    """`minidepth serve ARGS` (ARGS with `--port`) in a process of its own, its output in `log`: yields (its URL,
    the process) once the page answers 200, at most 180 s after the start; stops it after the block."""
    port = args[args.index("--port") + 1]
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "minidepth", "serve", *args], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"minidepth serve exited with {process.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"minidepth serve did not answer on {url} within 180 s:\n{log.read_text()}")
            time.sleep(0.5)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return factory.cached_checkpoint("tiny")


@pytest.fixture(scope="module")
def server(folder, checkpoint):
    """`minidepth serve` on a free port; yields (url, log file). Its outputs and gradio's cache go under `folder`."""
    port = free_port()
    log = folder / "serve.log"
    tmp = folder / "server-tmp"
    tmp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "TMPDIR": str(tmp), "GRADIO_TEMP_DIR": str(tmp / "gradio"), "PYTHONUNBUFFERED": "1"}
    with serving(["--model", str(checkpoint), "--port", str(port), "--device", "cpu"], env, log, folder) as (url, _):
        yield url + "/", log
    assert "Traceback" not in re.sub(r"(?s)Traceback.*?gradio\.exceptions\.Error: [^\n]*", "", log.read_text()), \
        f"the server logged an unexpected traceback:\n{log.read_text()}"


def cli_generate(folder: Path, checkpoint: Path, out: Path, *options: str) -> Path:
    """`minidepth generate` with the settings the tests type into the page (and `options`)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "minidepth", "generate", "--model", str(checkpoint), "--image",
                             str(folder / "photo.png"), "--prompt", PROMPT, "--device", "cpu", "--out", str(out),
                             "--quiet", *[x for k, v in SETTINGS.items() for x in (f"--{k}", str(v))], *options],
                            env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def reference(folder, checkpoint) -> Path:
    return cli_generate(folder, checkpoint, folder / "cli.png")


def assert_served_png(data: bytes, reference: Path, seed: int) -> None:
    """The served file is the PNG itself: same pixels as `minidepth generate`, and the settings inside."""
    assert np.array_equal(pixels(data), pixels(reference)), "the page's image differs from `minidepth generate`'s"
    with PIL.Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        assert f"Seed: {seed}" in img.text["parameters"] and PROMPT in img.text["parameters"]
        assert '"steps": 10' in img.text["minidepth"]


# ------------------------------------------------------------------------------------------------ the browser
@pytest.fixture(scope="module")
def browser():
    sync_api = need("playwright.sync_api", "playwright is not installed (pip install -e \".[test]\")")
    if CHROMIUM is None:
        missing("no chromium executable on PATH (Debian: apt-get install chromium; .ci/run installs it)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    page = context.new_page()
    page.set_default_timeout(120_000)
    page.goto(server[0])
    page.wait_for_selector("#generate")
    yield page
    context.close()


def fill(page, selector: str, value) -> None:
    field = page.locator(selector)
    field.fill(str(value))
    field.press("Tab")  # gradio reads a number field's value on blur


def test_browser_generate_equals_cli(page, server, folder, reference):
    page.locator("#photo input[type=file]").set_input_files(str(folder / "photo.png"))
    page.wait_for_selector("#photo img")
    fill(page, "#prompt textarea", PROMPT)
    fill(page, "#seed input", SETTINGS["seed"])
    fill(page, "#steps input[type=number]", SETTINGS["steps"])
    fill(page, "#strength input[type=number]", SETTINGS["strength"])
    fill(page, "#words textarea", "cabin, snow")
    page.click("#generate")
    image = page.wait_for_selector("#gallery img")
    page.wait_for_selector("#attention img")
    page.wait_for_selector("#filmstrip-out img")
    page.wait_for_selector("#depth img")
    assert page.locator("#seed-used textarea, #seed-used input").first.input_value() == str(SETTINGS["seed"])
    response = page.request.get(image.get_attribute("src"))
    assert response.ok
    assert_served_png(response.body(), reference, SETTINGS["seed"])
    assert page.locator("#attention img").count() == 2
    shot = folder / "web-screenshot.png"  # the test's artifact
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    if os.environ.get("MINIDEPTH_WEB_SCREENSHOT"):  # MINIDEPTH_WEB_SCREENSHOT=docs/web-screenshot.png: the README's
        with PIL.Image.open(shot) as img:  # 256 colours: a third of the size
            img.convert("RGB").quantize(256, method=PIL.Image.Quantize.MEDIANCUT).save(
                REPO / os.environ["MINIDEPTH_WEB_SCREENSHOT"], optimize=True)


def toast(page, text: str) -> None:
    page.get_by_text(re.compile(re.escape(text))).first.wait_for(timeout=30_000)


def test_browser_bad_input_shows_a_message(page, server, folder):
    fill(page, "#prompt textarea", PROMPT)
    page.click("#generate")  # no photo
    toast(page, "no photo")
    page.get_by_text("Sample photo").locator("xpath=..").locator("img").first.click()  # the bundled sample photo
    page.wait_for_selector("#photo img")
    fill(page, "#words textarea", "dog")
    page.click("#generate")
    toast(page, "'dog' not in the prompt")
    fill(page, "#words textarea", "")
    fill(page, "#width input", 12)
    page.click("#generate")
    toast(page, "width 12: must be a multiple of 8, at least 8 (e.g. 16)")
    with urllib.request.urlopen(server[0], timeout=10) as response:  # the server keeps running
        assert response.status == 200


# ------------------------------------------------------------------------------------------------ gradio's client API
@pytest.fixture(scope="module")
def client(server):
    gradio_client = need("gradio_client", "gradio_client is not installed (pip install -e \".[test]\")")
    return gradio_client.Client(server[0], verbose=False)


def arguments(image, **changes) -> list:
    from gradio_client import handle_file
    values = {"photo": handle_file(str(image)) if image else None, "prompt": PROMPT, "negative_prompt": "",
              "strength": SETTINGS["strength"], "steps": SETTINGS["steps"], "guidance": 7.5, "seed": SETTINGS["seed"],
              "scheduler": "checkpoint's own", "num_images": 1, "depth_file": None, "words": "", "filmstrip": False}
    return list({**values, **changes}.values())


def test_client_api_equals_cli(client, folder, reference):
    images, seed_used, files, depth, film, attention = client.predict(*arguments(folder / "photo.png"),
                                                                      api_name="/generate")
    assert seed_used == str(SETTINGS["seed"]) and film is None and attention == []
    assert_served_png(Path(images[0]["image"]).read_bytes(), reference, SETTINGS["seed"])
    assert Path(files[0]).read_bytes() == Path(images[0]["image"]).read_bytes()
    assert PIL.Image.open(depth).size == (128, 96)

    # a random seed: drawn, shown, and image i of N uses seed + i
    images, seed_used, *_ = client.predict(*arguments(folder / "photo.png", seed=-1, num_images=2),
                                           api_name="/generate")
    first = int(seed_used)
    assert [PIL.Image.open(x["image"]).text["parameters"].count(f"Seed: {first + i},") for i, x in
            enumerate(images)] == [1, 1]


def test_client_api_width_and_height_equal_cli(client, folder, checkpoint):
    """The page's width / height resize the photo first, as `generate --width/--height` (one alone: the aspect ratio
    kept; 128x96 -> 64x48 and 80x40)."""
    for options, size in [(("--width", "64"), (64, 48)), (("--width", "80", "--height", "40"), (80, 40))]:
        expected = cli_generate(folder, checkpoint, folder / f"cli-{size[0]}x{size[1]}.png", *options)
        sides = {option[2:]: int(value) for option, value in zip(options[::2], options[1::2])}
        images, seed_used, *_ = client.predict(*arguments(folder / "photo.png"), api_name="/generate", **sides)
        got = pixels(Path(images[0]["image"]))
        assert got.shape[:2] == size[::-1], f"{options}: the page made {got.shape[1]}x{got.shape[0]}"
        assert np.array_equal(got, pixels(expected)), f"{options}: the page's image differs from the command line's"


def test_client_api_progress_per_step(client, folder):
    """gr.Progress is fed by the pipeline's step callback: "denoising i/N" with N the UNet calls of the run (DDIM:
    one per step; PNDM's 40 steps would make 41)."""
    job = client.submit(*arguments(folder / "photo.png", steps=40, strength=1.0, scheduler="ddim"),
                        api_name="/generate")
    job.result(timeout=300)
    updates, seen = job.communicator.updates, []  # every status message the server sent, in order
    while not updates.empty():
        update = updates.get_nowait()
        seen += [(unit.desc, unit.index, unit.length) for unit in getattr(update, "progress_data", None) or []]
    denoising = [(index, length) for desc, index, length in seen if desc == "denoising"]
    assert denoising and {length for _, length in denoising} == {40}, seen
    assert [index for index, _ in denoising] == sorted(index for index, _ in denoising), seen


@pytest.mark.parametrize("case, message", [
    ("no photo", "no photo"),
    ("strength", "strength"),
    ("1x1", "at least 8x8"),
    ("unreadable", "not a readable image"),
    ("word", "'dog' not in the prompt"),
])
def test_client_api_bad_input(client, folder, server, case, message):
    from gradio_client.exceptions import AppError
    (folder / "tiny.png").exists() or PIL.Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "tiny.png")
    (folder / "bad.png").exists() or (folder / "bad.png").write_text("not an image")
    photo_file = folder / "photo.png"
    args = {"no photo": arguments(None), "strength": arguments(photo_file, strength=1.5),
            "1x1": arguments(folder / "tiny.png"), "unreadable": arguments(folder / "bad.png"),
            "word": arguments(photo_file, words="cabin, dog")}[case]
    with pytest.raises(AppError, match=re.escape(message)):
        client.predict(*args, api_name="/generate")
    with urllib.request.urlopen(server[0], timeout=10) as response:  # the server keeps running
        assert response.status == 200


def test_queue_runs_one_generation_at_a_time(client, folder, server):
    """Two requests at once (two tabs): the second starts only when the first is done (the server's log says)."""
    before = server[1].read_text().count("started")
    jobs = [client.submit(*arguments(folder / "photo.png", seed=s), api_name="/generate") for s in (1, 2)]
    results = [job.result(timeout=300) for job in jobs]
    assert [r[1] for r in results] == ["1", "2"]
    events = re.findall(r"job (\d+): (started|done)", server[1].read_text())[2 * before:]
    assert [e for _, e in events] == ["started", "done", "started", "done"], events


def test_client_api_own_depth_map_and_several_images(client, folder):
    grey = (np.linspace(0, 65535, 128 * 96).reshape(96, 128)).astype(np.uint16)  # a 16-bit ramp, brighter = nearer
    PIL.Image.fromarray(grey).save(folder / "depth16.png")
    images, seed_used, files, depth, film, attention = client.predict(
        *arguments(folder / "photo.png", depth_file=handle(folder / "depth16.png"), num_images=2,
                   words="cabin, snow", filmstrip=True), api_name="/generate")
    assert len(images) == len(files) == 2 and film is not None
    assert [a["caption"] for a in attention] == ["cabin (image 1)", "snow (image 1)", "cabin (image 2)",
                                                 "snow (image 2)"]
    shown = pixels(Path(depth)).astype(int)
    assert shown[0].mean() < shown[-1].mean()  # the ramp's colours, not an estimated depth: bright at the bottom
    assert PIL.Image.open(images[0]["image"]).text["minidepth"].count("depth16.png") == 1

    from gradio_client.exceptions import AppError
    (folder / "depth.txt").write_text("not a depth map")
    with pytest.raises(AppError, match=r"Invalid file type"):  # gradio's own check of the file types
        client.predict(*arguments(folder / "photo.png", depth_file=handle(folder / "depth.txt")), api_name="/generate")
    (folder / "bad-depth.png").write_text("not a depth map")
    with pytest.raises(AppError, match=r"depth map: bad-depth.png is not a readable .npy array or image"):
        client.predict(*arguments(folder / "photo.png", depth_file=handle(folder / "bad-depth.png")),
                       api_name="/generate")


def test_client_api_ldm_mode_equals_cli(client, folder, checkpoint):
    """Mode "ldm" + "crop the padding" = `minidepth generate --mode ldm --crop-padding` (same seed, steps, strength,
    guidance): the same pixels and the same record; ldm with an own depth map is refused in words."""
    settings = {**SETTINGS, "guidance": 9.0}
    out = folder / "cli-ldm.png"
    result = subprocess.run([sys.executable, "-m", "minidepth", "generate", "--model", str(checkpoint), "--image",
                             str(folder / "photo.png"), "--prompt", PROMPT, "--device", "cpu", "--out", str(out),
                             "--quiet", "--mode", "ldm", "--crop-padding",
                             *[x for k, v in settings.items() for x in (f"--{k}", str(v))]],
                            env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    images, seed_used, *_ = client.predict(*arguments(folder / "photo.png", guidance=9.0, mode="ldm",
                                                      crop_padding=True), api_name="/generate")
    served = Path(images[0]["image"]).read_bytes()
    assert_served_png(served, out, SETTINGS["seed"])
    with PIL.Image.open(io.BytesIO(served)) as img, PIL.Image.open(out) as cli:
        assert img.size == (128, 96) and "Sampler: DDIM" in img.text["parameters"]
        assert '"mode": "ldm"' in img.text["minidepth"] and '"mode": "ldm"' in cli.text["minidepth"]
    images, *_ = client.predict(*arguments(folder / "photo.png", guidance=9.0, mode="ldm"), api_name="/generate")
    assert PIL.Image.open(images[0]["image"]).size == (128, 128)  # padded to multiples of 64, as the script keeps it

    from gradio_client.exceptions import AppError
    np.save(folder / "ramp.npy", np.linspace(0, 1, 96 * 128, dtype=np.float32).reshape(96, 128))
    with pytest.raises(AppError, match=r"depth map cannot be used with mode ldm \(the original script always "):
        client.predict(*arguments(folder / "photo.png", depth_file=handle(folder / "ramp.npy"), mode="ldm"),
                       api_name="/generate")


def handle(path: Path):
    from gradio_client import handle_file
    return handle_file(str(path))


def test_binds_localhost_without_a_share_link(server):
    log = server[1].read_text()
    assert "Running on local URL:  http://127.0.0.1:" in log and "gradio.live" not in log


def test_help_imports_neither_torch_nor_gradio():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "minidepth", "serve", "--help"],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert result.returncode == 0 and "--port" in result.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "gradio"}, imported & {"torch", "gradio"}


def test_serve_without_gradio_says_how_to_install(checkpoint):
    code = ("import sys; sys.modules['gradio'] = None\n"
            "from minidepth.cli import main\n"
            f"sys.exit(main(['serve', '--model', {str(checkpoint)!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().startswith("minidepth serve: error: serve needs gradio") and ".[web]" in result.stderr
