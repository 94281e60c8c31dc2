"""The studio in a real browser: Playwright drives Debian's Chromium (headless) against the real
server (python app.py, tiny model) on a free port.

The screenshot goes to the test's temp folder; set ZIMAGE_SCREENSHOT=path to keep a copy
(assets/screenshot.png in the README is made that way).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from .support import App

pytestmark = pytest.mark.slow  # a real server and a real browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_dir):
    srv = App(tmp_path_factory.mktemp("browser"), tiny_dir).wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: apt-get install -y chromium (scripts/test.sh does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _summary_seed(page) -> int:
    text = page.inner_text("#zi-summary")
    m = re.search(r"Seed (\d+)", text)
    assert m, text
    return int(m.group(1))


def test_generate_in_the_browser_with_a_live_profiler(studio, browser, tmp_path):
    from zimage.service.store import read_parameters

    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(studio.url)
    page.wait_for_selector(".zi-banner-ready")
    assert "tiny" in page.inner_text("#zi-banner")

    # the negative prompt is visibly inactive while guidance is 0, and says why
    negative = page.locator("#zi-negative textarea")
    assert negative.is_disabled()
    assert "Inactive while guidance is 0" in page.inner_text("#zi-negative")
    guidance = page.locator("#zi-guidance input[type=number]")
    guidance.fill("2")
    guidance.press("Enter")
    page.wait_for_function("!document.querySelector('#zi-negative textarea').disabled")
    guidance.fill("0")
    guidance.press("Enter")
    page.wait_for_function("document.querySelector('#zi-negative textarea').disabled")

    # type a prompt, click Generate, see the image, the honest summary and a filled profiler
    page.fill("#zi-prompt textarea", "A lighthouse on a basalt cliff at dusk, long exposure sea")
    page.click("#zi-generate")
    page.wait_for_selector("#zi-gallery img")
    page.wait_for_function("document.querySelector('#zi-summary').innerText.includes('Seed')")
    seed = _summary_seed(page)
    summary = page.inner_text("#zi-summary")
    assert "256×256" in summary and "it/s" in summary and "mode cpu" in summary.replace("`", "")
    page.wait_for_function(
        "document.querySelector('#zi-profiler').innerText.includes('Text encoder')"
        " && document.querySelector('#zi-profiler').innerText.includes('it/s')"
    )
    profiler = page.inner_text("#zi-profiler")
    for text in (
        "LAST RUN",
        "Denoise",
        "VAE decode",
        "PNG save",
        "mode cpu",
        "Process memory",
        "MODEL LOAD",
        "warm-up",
    ):
        assert text.lower() in profiler.lower(), text
    assert "Images made\n1" in profiler or re.search(r"Images made\s+1", profiler)
    # the PNG offered for download is ours: its name carries the seed the page reported
    assert f"seed{seed}" in page.inner_text("#zi-download")

    page.wait_for_timeout(1200)  # one more profiler tick, so the screenshot shows settled numbers
    shot = tmp_path / "studio.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000
    if os.environ.get("ZIMAGE_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["ZIMAGE_SCREENSHOT"])

    # Enter in the prompt generates too
    page.fill("#zi-prompt textarea", "一只橘猫趴在洒满阳光的窗台上打盹")
    page.press("#zi-prompt textarea", "Enter")
    page.wait_for_function(
        f"!document.querySelector('#zi-summary').innerText.includes('Seed {seed} ')"
        f" && document.querySelector('#zi-summary').innerText.includes('Seed')"
    )
    second_seed = _summary_seed(page)
    assert second_seed != seed

    # the history survives a reload, newest first; selecting shows parameters; "use these settings"
    page.reload()
    page.wait_for_selector(".zi-banner-ready")
    page.get_by_role("tab", name="History").click()
    page.wait_for_function("document.querySelectorAll('#zi-history img').length >= 2")
    page.locator("#zi-history img").first.click()
    page.wait_for_function(f"document.querySelector('#zi-params-md').innerText.includes('{second_seed}')")
    assert "一只橘猫" in page.inner_text("#zi-params-md")
    page.click("#zi-use")
    page.wait_for_function(f"document.querySelector('#zi-seed input').value == '{second_seed}'")
    assert page.input_value("#zi-prompt textarea") == "一只橘猫趴在洒满阳光的窗台上打盹"

    # dropping a PNG made by zimage loads its parameters into the form
    first_png = next(p for p in studio.outputs.glob("*.png") if f"seed{seed}" in p.name)
    assert read_parameters(first_png)["seed"] == seed
    page.get_by_role("tab", name="Load a PNG").click()
    page.set_input_files("#zi-drop input[type=file]", str(first_png))
    page.wait_for_function(f"document.querySelector('#zi-seed input').value == '{seed}'")
    assert page.input_value("#zi-prompt textarea").startswith("A lighthouse on a basalt cliff")

    assert not errors, errors
    page.close()


def test_bad_size_in_the_browser_is_a_clear_message(studio, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(studio.url)
    page.wait_for_selector(".zi-banner-ready")
    page.fill("#zi-prompt textarea", "a red bicycle")
    page.fill("#zi-width input", "100")
    page.click("#zi-generate")
    toast = page.locator(".toast-body", has_text="Width must be a multiple of 16")
    toast.first.wait_for()
    text = toast.first.inner_text()
    assert "(got 100)" in text and "Try 96" in text and "Traceback" not in text
    page.close()
