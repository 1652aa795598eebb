"""`minidepth serve` left running, as a careful tester would try it (#26): a server of its own on the tiny checkpoint,
with a password (--auth-file) and one --allowed-host, without GRADIO_ANALYTICS_ENABLED in its environment (the
default must be off by itself).

  - Host header (DNS rebinding): a request for another host gets 400 before gradio sees it; the bound address, its
    loopback names and the allowed name are answered;
  - the login form appears in the browser and works (then the page generates); the API needs the login;
  - analytics off in the page's config; uploads capped; only the sample photo itself is served from the package;
  - hostile input through the page's API (raw HTTP, since gradio_client cannot send NaN): photos and depth maps too
    large (claimed 12000 x 12000, a real decompression bomb, a 12 Mpx photo the page cannot resize), a 1-bit depth
    map, NaN / inf / text / 2.5 in the number fields. Each is a message for the page (gradio's error event, with a
    title, no stack trace), comes in under a second, and leaves the server's peak RSS (VmHWM) within 200 MB of what it
    was after refusing a tiny bad file; then the server still makes the same image as before.
Skipped like tests/test_web.py when gradio / playwright / chromium are missing (MINIDEPTH_REQUIRE_BROWSER=1: failed).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

import factory
from test_hostile_inputs import bomb_png, claimed_npy, claimed_png
from test_web import CHROMIUM, CHROMIUM_FLAGS, REPO, free_port, missing, need, pixels, serving

USER, PASSWORD = "alice", "correct horse"
SETTINGS = {"prompt": "a wooden cabin in the snow", "steps": 10, "strength": 0.6, "seed": 7, "filmstrip": False}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("web-safety")
    from minidepth.cli.serve import SAMPLE_PHOTO
    with PIL.Image.open(SAMPLE_PHOTO) as sample:
        sample.resize((128, 96), PIL.Image.LANCZOS).save(folder / "photo.png")
    PIL.Image.new("RGB", (4000, 3000), (90, 120, 200)).save(folder / "phone.png")
    PIL.Image.new("1", (128, 96)).save(folder / "bits.png")
    (folder / "bad.png").write_text("not an image")
    claimed_png(folder / "huge.png", 12000, 12000)
    claimed_npy(folder / "huge.npy", (12000, 12000))
    bomb_png(folder / "bomb.png")
    (folder / "auth.txt").write_text(f"# who may log in\n{USER}:{PASSWORD}\n")
    return folder


@pytest.fixture(scope="module")
def server(folder):
    """`minidepth serve --auth-file ... --allowed-host proxy.example` on a free port: (url, process, log)."""
    need("httpx", "httpx is not installed (gradio installs it)")
    port, log = free_port(), folder / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_ANALYTICS_ENABLED"}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TMPDIR=str(folder), GRADIO_TEMP_DIR=str(folder / "gradio"),
               PYTHONUNBUFFERED="1")
    with serving(["--model", str(factory.cached_checkpoint("tiny")), "--port", str(port), "--device", "cpu",
                  "--auth-file", str(folder / "auth.txt"), "--allowed-host", "proxy.example"], env, log, folder) \
            as (url, process):
        yield url, process, log


class Page:
    """The page's API over plain HTTP, logged in: upload files, call /generate with any JSON (NaN included)."""

    def __init__(self, url: str):
        import httpx
        self.http = httpx.Client(base_url=url, timeout=120)
        assert self.http.post("/login", data={"username": USER, "password": PASSWORD}).status_code == 200
        endpoint = self.http.get("/gradio_api/info").json()["named_endpoints"]["/generate"]
        self.parameters = endpoint["parameters"]

    def upload(self, path: Path) -> dict:
        with open(path, "rb") as f:
            response = self.http.post("/gradio_api/upload", files={"files": (path.name, f)})
        response.raise_for_status()
        return {"path": response.json()[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}

    def generate(self, **values) -> tuple[str, object]:
        """("complete", the outputs) or ("error", the message event); the inputs not given keep their defaults."""
        data = [values.get(p["parameter_name"], p.get("parameter_default")) for p in self.parameters]
        response = self.http.post("/gradio_api/call/generate", content=json.dumps({"data": data}),  # NaN: as is
                                  headers={"content-type": "application/json"})
        response.raise_for_status()
        stream = self.http.get(f"/gradio_api/call/generate/{response.json()['event_id']}").text
        event = [line[7:] for line in stream.splitlines() if line.startswith("event: ")][-1]
        payload = [line[6:] for line in stream.splitlines() if line.startswith("data: ")][-1]
        return event, json.loads(payload)

    def image(self, outputs) -> np.ndarray:
        served = self.http.get(f"/gradio_api/file={outputs[0][0]['image']['path']}")
        assert served.status_code == 200
        return pixels(served.content)


def peak_rss_kb(process) -> int:
    with open(f"/proc/{process.pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("VmHWM:")))


# ------------------------------------------------------------------------------------------------ hosts, login
def test_host_header_must_name_this_server(server):
    import httpx
    url, port = server[0], server[0].rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io", "localhost.evil.example"):
        for path in ("/", "/gradio_api/info", "/config"):
            response = httpx.get(url + path, headers={"Host": host})
            assert response.status_code == 400 and "--allowed-host" in response.text, (host, path)
    assert httpx.post(url + "/login", data={"username": USER, "password": PASSWORD},
                      headers={"Host": "evil.example"}).status_code == 400  # a right password does not help
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "proxy.example", "PROXY.example."):
        assert httpx.get(url + "/", headers={"Host": host}).status_code == 200, host


def test_login_analytics_uploads_and_files(server):
    import httpx
    url = server[0]
    assert httpx.get(url + "/config").status_code == 401  # nothing but the login form without a password
    assert httpx.get(url + "/gradio_api/info").status_code == 401
    assert httpx.post(url + "/login", data={"username": USER, "password": "wrong"}).status_code >= 400
    page = Page(url)
    config = page.http.get("/config").json()
    assert config["analytics_enabled"] is False and config["max_file_size"] == 50 * 1024 ** 2
    big = server[2].parent / "big.png"
    big.write_bytes(bytes(51 * 1024 ** 2))
    answer = page.http.post("/gradio_api/upload", files={"files": ("big.png", big.read_bytes())})
    assert answer.status_code == 413 and "maximum allowed size of 52428800 bytes" in answer.text, answer.text
    big.unlink()
    from minidepth.cli.serve import SAMPLE_PHOTO
    assert page.http.get(f"/gradio_api/file={SAMPLE_PHOTO}").status_code == 200  # the sample photo itself
    for other in (SAMPLE_PHOTO.parent / "README.md", next((SAMPLE_PHOTO.parent / "sd2-depth").rglob("*.json")),
                  REPO / "pyproject.toml"):
        assert page.http.get(f"/gradio_api/file={other}").status_code == 403, other  # nothing else of the package
    assert PASSWORD not in server[2].read_text()


def test_listening_beyond_loopback_without_a_password_is_warned_about(folder):
    def serve(*args):
        return subprocess.run([sys.executable, "-m", "minidepth", "serve", "--model", str(folder / "none"), *args],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    result = serve("--host", "0.0.0.0")
    assert "warning: --host 0.0.0.0 lets other machines in, and nobody is asked for a password: pass --auth-file" \
        in result.stderr, result.stderr
    assert "nobody is asked" not in serve("--host", "0.0.0.0", "--auth-file", str(folder / "auth.txt")).stderr
    (folder / "bad-auth.txt").write_text("alice s3cret\n")
    result = serve("--auth-file", str(folder / "bad-auth.txt"))
    assert result.returncode == 2 and "--auth-file" in result.stderr and "line 1: expected USER:PASS" in result.stderr
    assert "s3cret" not in result.stderr  # a password is never shown


def test_allowed_hosts_rules():
    from minidepth.cli.serve_safety import AllowedHosts
    loopback = AllowedHosts("127.0.0.1", ["my.proxy"])
    assert all(map(loopback, ["127.0.0.1:7860", "localhost", "[::1]:80", "my.proxy", "MY.PROXY:443"]))
    assert not any(map(loopback, ["", "evil.example", "192.168.1.5", "127.0.0.1.evil.example", "[::2]"]))
    lan = AllowedHosts("192.168.1.5")
    assert lan("192.168.1.5:7860") and not lan("localhost") and not lan("10.0.0.1")
    everywhere = AllowedHosts("0.0.0.0")  # any address (a rebinding page always comes by a name), no other name
    assert all(map(everywhere, ["10.1.2.3:7860", "[fe80::1]", "localhost:7860"])) and not everywhere("evil.example")
    assert AllowedHosts("127.0.0.1", share=True)("abcd.gradio.live") and not loopback("abcd.gradio.live")


# ------------------------------------------------------------------------------------------------ hostile input
def test_hostile_input_is_a_message_and_the_server_goes_on(server, folder):
    page = Page(server[0])
    photo = page.upload(folder / "photo.png")
    event, before = page.generate(photo=photo, **SETTINGS)
    assert event == "complete", before
    cases = {  # name -> (inputs, the message's start)
        "tiny bad photo": ({"photo": page.upload(folder / "bad.png")}, "photo: bad.png is not a readable image"),
        "12000x12000 photo": ({"photo": page.upload(folder / "huge.png")},
                              "photo: huge.png is 12000x12000 pixels (144.0 Mpx): a file may have at most 67.1 Mpx"),
        "decompression bomb": ({"photo": page.upload(folder / "bomb.png")},
                               "photo: bomb.png claims 400,000,000 pixels, which PIL refuses as a possible "
                               "decompression bomb"),
        "12 Mpx photo": ({"photo": page.upload(folder / "phone.png")},
                         "photo: phone.png is 4000x3000 pixels (12.0 Mpx): images are generated at most 4.2 Mpx "
                         "(2048x2048); upload a smaller photo (or start the server with a larger --max-pixels)"),
        "12000x12000 depth map": ({"depth_file": page.upload(folder / "huge.npy")},
                                  "depth map: huge.npy holds an array of shape (12000, 12000) (144.0 Mpx)"),
        "1-bit depth map": ({"depth_file": page.upload(folder / "bits.png")},
                            "depth map: bits.png is a 1-bit black-and-white image; a depth map needs grey levels"),
        "NaN steps": ({"steps": float("nan")}, "steps nan: must be a finite number"),
        "NaN seed": ({"seed": float("nan")}, "seed nan: must be a finite number"),
        "inf images": ({"num_images": float("inf")}, "number of images inf: must be a finite number"),
        "text strength": ({"strength": "abc"}, "strength 'abc': must be a finite number"),
        "2.5 steps": ({"steps": 2.5}, "steps 2.5: must be an integer >= 1"),
        "-inf guidance": ({"guidance": float("-inf")}, "guidance -inf: must be a finite number"),
        "NaN width": ({"width": float("nan")}, "width nan: must be a finite number"),
        "width 12": ({"width": 12}, "width 12: must be a multiple of 8, at least 8 (e.g. 16)"),
        "60000 wide": ({"width": 60000}, "the photo, resized, is 60000x45000 pixels (2700.0 Mpx): images are "
                                         "generated at most 4.2 Mpx (2048x2048); choose a smaller width / height"),
    }
    rows, baseline = [], None
    for name, (changes, message) in cases.items():
        start = time.perf_counter()
        event, answer = page.generate(**{"photo": photo, **SETTINGS, **changes})
        seconds, peak = time.perf_counter() - start, peak_rss_kb(server[1])
        baseline = peak if baseline is None else baseline  # after refusing the tiny bad file
        rows.append(f"{name:<24} {seconds * 1000:7.1f} ms  server peak RSS +{(peak - baseline) / 1024:6.1f} MB")
        assert event == "error" and answer["title"] == "Cannot generate", (name, answer)
        assert answer["error"].startswith(message) and "Traceback" not in answer["error"], (name, answer)
        assert seconds < 1.0 and peak - baseline < 200 * 1024, rows[-1]
    print("\nthe page's refusals (after a tiny bad file):\n" + "\n".join(rows))
    event, after = page.generate(photo=photo, **SETTINGS)  # the server still makes the same image
    assert event == "complete" and np.array_equal(page.image(after), page.image(before))
    log = re.sub(r"(?s)Traceback.*?gradio\.exceptions\.Error: [^\n]*", "", server[2].read_text())
    assert "Traceback" not in log, log  # the page's refusals only


# ------------------------------------------------------------------------------------------------ the browser
def test_browser_login_form_then_generate(server, folder):
    sync_api = need("playwright.sync_api", "playwright is not installed (pip install -e \".[test]\")")
    if CHROMIUM is None:
        missing("no chromium executable on PATH (Debian: apt-get install chromium; .ci/run installs it)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1100})
        context.set_default_timeout(120_000)
        page = context.new_page()
        page.goto(server[0])
        page.get_by_text("Login").first.wait_for()
        assert page.locator("#generate").count() == 0  # the page itself only after the login
        page.locator("input[type=text]").first.fill(USER)
        page.locator("input[type=password]").fill("wrong")
        page.get_by_role("button", name="Login").click()
        page.get_by_text(re.compile("Incorrect Credentials", re.I)).first.wait_for(timeout=30_000)
        page.locator("input[type=text]").first.fill(USER)
        page.locator("input[type=password]").fill(PASSWORD)
        page.get_by_role("button", name="Login").click()
        page.wait_for_selector("#generate")
        page.locator("#photo input[type=file]").set_input_files(str(folder / "photo.png"))
        page.wait_for_selector("#photo img")
        page.locator("#prompt textarea").fill(SETTINGS["prompt"])
        page.click("#generate")
        page.wait_for_selector("#gallery img")
        other = context.new_page()  # logged in (the cookie): a photo too large is a message in the page
        other.goto(server[0])
        other.locator("#photo input[type=file]").set_input_files(str(folder / "huge.png"))
        other.click("#generate")
        other.get_by_text(re.compile(r"huge\.png is 12000x12000 pixels")).first.wait_for(timeout=30_000)
        browser.close()
