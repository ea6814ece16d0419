"""The web demo in a real browser (marked ``browser``: ``make test-browser``, which installs Debian's chromium when
absent; CI runs it). ``scripts/demo.py`` serves the tiny SD on 127.0.0.1 (a free port); headless Chromium, driven by
Playwright's Python client (``/usr/bin/chromium``, nothing downloaded), uploads a photo, inverts it, edits it twice,
and the page must show the three images and a latent round-trip error below 1e-6; picking the tiny FLUX in the
model menu offers the flow methods and its guidance, and inverts exactly too. A second browser session sees
none of it; a file that is not an image is a message in the page; the demo writes nothing outside its temporary
folder, which is gone when it stops. Screenshots go to the test's temporary folder (``BDIA_DEMO_SCREENSHOT=path``
also copies the final one there: the README's ``docs/demo_screenshot.png``)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("BDIA_CHROMIUM", "/usr/bin/chromium")
#: This machine's closed network refuses every connection but loopback: no background services, no updates.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STEPS = 10


def _need_browser():
    missing = [what for what, ok in (("chromium at " + CHROMIUM, Path(CHROMIUM).exists()),
                                     ("playwright", _importable("playwright")), ("gradio", _importable("gradio")))
               if not ok]
    if missing:
        reason = f"needs {', '.join(missing)} (make test-browser installs them)"
        if os.environ.get("BDIA_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo(tiny_sd_dir, tiny_flux_dir, tmp_path_factory):
    """scripts/demo.py on a free port, run from a folder holding only ``results/tiny_flux`` (a link to the session's
    tiny FLUX: the menu's tiny-flux config reads that relative path) with its own TMPDIR; stopped with SIGTERM after
    the module. Yields (url, folders, log path)."""
    _need_browser()
    root = tmp_path_factory.mktemp("demo")
    folders = {name: root / name for name in ("cwd", "tmp")}
    for folder in folders.values():
        folder.mkdir()
    (folders["cwd"] / "results").mkdir()
    (folders["cwd"] / "results" / "tiny_flux").symlink_to(tiny_flux_dir, target_is_directory=True)
    port = _free_port()
    log = root / "demo.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "TMPDIR": str(folders["tmp"]), "HYDRA_FULL_ERROR": ""}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, str(REPO / "scripts" / "demo.py"), f"model.path={tiny_sd_dir}",
                                    f"port={port}", f"num_steps={STEPS}", "image_size=32"],
                                   cwd=folders["cwd"], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"the demo exited with status {process.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200 and "bdia demo: http" in log.read_text():
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the demo did not answer on {url} within 180 s: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url, folders, log, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def browser(demo):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Playwright gives each launch a new, empty user-data-dir.
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def _status(page, starts: str, timeout_s: float = 120) -> str:
    page.wait_for_function("s => document.querySelector('#status').innerText.trim().startsWith(s)", arg=starts,
                           timeout=timeout_s * 1000)
    return page.inner_text("#status").strip()


_LOADED = """([id, previous]) => { const img = document.querySelector('#' + id + ' img');
    return !!img && img.complete && img.naturalWidth > 0 && img.getAttribute('src') !== previous
        ? img.getAttribute('src') : false; }"""


def _image_loaded(page, elem_id: str):
    """The src of the image shown in ``#elem_id`` once loaded, else False."""
    return page.evaluate(_LOADED, [elem_id, None])


def _wait_image(page, elem_id: str, previous: str | None = None, timeout_s: float = 30) -> str:
    """Wait until ``#elem_id`` shows a loaded image other than ``previous``; its src."""
    return page.wait_for_function(_LOADED, arg=[elem_id, previous], timeout=timeout_s * 1000).json_value()


def _photo(tmp_path) -> Path:
    from PIL import Image
    from sklearn.datasets import load_sample_image

    path = tmp_path / "temple.jpg"
    Image.fromarray(load_sample_image("china.jpg")).save(path)
    return path


def test_upload_invert_and_edit_twice_in_chromium(demo, browser, tmp_path):
    url, folders, log, _ = demo
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.wait_for_selector("#invert")
    page.set_input_files("#photo input[type=file]", str(_photo(tmp_path)))
    page.wait_for_function("() => !!document.querySelector('#photo img')", timeout=30_000)

    page.click("#invert")
    status = _status(page, "Inverted")
    assert f"BDIA: {STEPS} NFE" in status
    _wait_image(page, "original")
    _wait_image(page, "reconstruction")
    error = float(re.search(r"relative\): ([0-9.eE+-]+)", page.inner_text("#roundtrip")).group(1))
    assert error < 1e-6
    assert "BDIA-DDIM" in page.inner_text("#numbers")
    page.screenshot(path=str(tmp_path / "1_inverted.png"), full_page=True)

    page.fill("#edit_prompt textarea", "a watercolor painting of a chinese temple")
    page.click("#edit_button")
    assert _status(page, "Edit #1").endswith("(no inversion again).")
    first_edit = _wait_image(page, "edit")

    page.fill("#edit_prompt textarea", "a photo of a red chinese temple at night")
    page.fill("#strength input[type=number]", "0.5")
    page.press("#strength input[type=number]", "Enter")
    page.click("#edit_button")
    _status(page, "Edit #2")
    _wait_image(page, "edit", previous=first_edit)  # a new picture
    rows = page.inner_text("#edits")
    assert "#1" in rows and "#2" in rows and "0.5 (5)" in rows and "to reach the start" in rows
    # the three images side by side, the numbers, both edits in the gallery
    for elem_id in ("original", "reconstruction", "edit"):
        assert _image_loaded(page, elem_id), elem_id
    assert page.locator("#gallery img").count() >= 2
    page.evaluate("window.scrollTo(0, 0)")
    shot = tmp_path / "2_two_edits.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("BDIA_DEMO_SCREENSHOT"):  # the README's picture: the page's top, 0.8x, 128 colours
        from PIL import Image

        with Image.open(shot) as full:
            top = full.convert("RGB").crop((0, 0, full.width, min(full.height, 1180)))
            top = top.resize((top.width * 4 // 5, top.height * 4 // 5), Image.LANCZOS)
            top.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(os.environ["BDIA_DEMO_SCREENSHOT"],
                                                                          optimize=True)

    # Another browser session (a new context: its own cookies and Gradio session) sees none of this.
    other = browser.new_context().new_page()
    other.goto(url)
    other.wait_for_selector("#invert")
    assert not _image_loaded(other, "original") and other.locator("#gallery img").count() == 0
    other.click("#edit_button")
    assert "invert it first" in _status(other, "error:")
    other.screenshot(path=str(tmp_path / "3_other_session.png"), full_page=True)

    # A file that is not an image: one line in the page, and the page keeps working.
    bad = tmp_path / "bad.png"
    bad.write_text("not a picture")
    other.set_input_files("#photo input[type=file]", str(bad))
    other.click("#invert")
    assert "photo bad.png: not an image" in _status(other, "error:")
    assert str(folders["tmp"]) not in other.inner_text("#status")  # the server's paths stay on the server
    page.click("#edit_button")
    _status(page, "Edit #3")

    page.close()
    other.close()


def test_picking_a_flow_model_offers_its_methods_and_guidance_and_inverts_exactly(demo, browser, tmp_path):
    """The model menu in the browser: tiny-flux loads, the comparisons become the flow methods, the guidance slider
    moves to FLUX.1-dev's 3.5, and the photo inverts with BDIA over flow Euler to round-off."""
    url, folders, log, _ = demo
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.wait_for_selector("#invert")
    assert "EDICT" in page.inner_text("#compare")
    page.click("#model input")
    page.click("#model [role=option][aria-label='tiny-flux']")
    assert "guidance set to its default 3.5" in _status(page, "Model tiny-flux loaded")
    compare = page.inner_text("#compare")
    assert "RF-Solver" in compare and "FireFlow" in compare and "EDICT" not in compare
    assert float(page.input_value("#guidance input[type=number]")) == 3.5
    page.check("#compare label:has-text('RF-Solver') input")
    page.set_input_files("#photo input[type=file]", str(_photo(tmp_path)))
    page.wait_for_function("() => !!document.querySelector('#photo img')", timeout=30_000)
    page.click("#invert")
    assert f"BDIA: {STEPS} NFE" in _status(page, "Inverted")
    error = float(re.search(r"relative\): ([0-9.eE+-]+)", page.inner_text("#roundtrip")).group(1))
    numbers = page.inner_text("#numbers")
    assert error < 1e-6 and "BDIA over flow Euler" in numbers and "RF-Solver" in numbers and "tiny-flux" in numbers
    page.screenshot(path=str(tmp_path / "4_flux.png"), full_page=True)
    page.close()


def test_the_demo_writes_only_its_temporary_folder_and_removes_it(demo, browser):
    """After the page tests: the working folder is untouched, the temporary folder is emptied when the demo stops,
    and the demo ends with its summary line."""
    url, folders, log, process = demo
    assert [p.name for p in folders["cwd"].rglob("*")] == ["results", "tiny_flux"]  # what the fixture put there
    made = [p for p in folders["tmp"].iterdir() if p.name.startswith("bdia-demo-")]
    assert len(made) == 1  # the demo's one temporary folder (uploads, shown images, example photos)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    assert not made[0].exists()
    assert re.search(r"bdia demo stopped after .* min: inversions 2, edits 3; temporary files removed",
                     log.read_text())
