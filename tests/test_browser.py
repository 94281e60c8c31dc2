"""The studio in a real browser: Playwright drives Debian's Chromium (headless) against the real
server (python app.py, tiny model, no logins) on a free port; one server for the module.

Screenshots go to the tests' temp folders; set ZIMAGE_SCREENSHOTS=assets to refresh the README's
(assets/screenshot.png, assets/screenshot-phone.png, assets/screenshot-zh.png).
"""

from __future__ import annotations

import os
import re
import shutil
import time
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


def keep(shot: Path, name: str) -> None:
    """A copy for the README when ZIMAGE_SCREENSHOTS names a folder."""
    if os.environ.get("ZIMAGE_SCREENSHOTS"):
        shutil.copyfile(shot, Path(os.environ["ZIMAGE_SCREENSHOTS"]) / name)


def _summary_seed(page) -> int:
    text = page.inner_text("#zi-summary")
    m = re.search(r"Seed (\d+)", text)
    assert m, text
    return int(m.group(1))


def test_generate_in_the_browser_with_a_live_profiler(studio, browser, tmp_path):
    from zimage.service.store import read_parameters

    ctx, page, errors = open_page(browser, studio.url)
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
    keep(shot, "screenshot.png")

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
    page.wait_for_selector("#zi-dropped img")  # and the image itself is shown

    assert not errors, errors
    ctx.close()


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


# ------------------------------------------------------------------------------------------
# the studio teammates like (issue 12)


def open_page(browser, url, **context):
    """A page of its own (context) on the studio, ready; its page errors land in the list returned."""
    ctx = browser.new_context(**{"viewport": {"width": 1440, "height": 1000}, **context})
    page = ctx.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    page.wait_for_selector(".zi-banner-ready")
    return ctx, page, errors


def _slow(page, steps=50, size=768, count=8):
    """A run that takes many seconds on the CPU even when it is idle (the tiny model makes 256x256 at
    ~80 it/s then): time to watch it, queue behind it, cancel it."""
    page.fill("#zi-steps input[type=number]", str(steps))
    page.press("#zi-steps input[type=number]", "Enter")
    page.fill("#zi-width input", str(size))
    page.fill("#zi-height input", str(size))
    page.fill("#zi-count input[type=number]", str(count))
    page.press("#zi-count input[type=number]", "Enter")


def _live(page) -> str:
    return page.inner_text("#zi-live")


def test_the_api_takes_the_prompt_alone(studio):
    """gradio_client positionally and by name, and REST with {"data": ["a cat"]}: the rest are the
    model preset's defaults (the tiny model: 256x256, 8 steps)."""
    import json

    import httpx
    from gradio_client import Client

    client = Client(studio.url, verbose=False)
    gallery, details = client.predict("a cat", api_name="/generate")
    assert (details["width"], details["height"], details["steps"], details["count"]) == (256, 256, 8, 1)
    assert len(gallery) == 1 and Path(gallery[0]["image"]).is_file()
    _, details = client.predict(prompt="a dog", seed=7, steps=3, api_name="/generate")
    assert details["seeds"] == [7] and details["steps"] == 3 and details["guidance"] == 0.0

    r = httpx.post(studio.url + "/gradio_api/call/generate", json={"data": ["a cat"]}, timeout=30)
    assert r.status_code == 200, r.text
    event = r.json()["event_id"]
    with httpx.stream("GET", f"{studio.url}/gradio_api/call/generate/{event}", timeout=120) as stream:
        lines = list(stream.iter_lines())
    assert "event: complete" in lines, lines[-4:]
    gallery, details = json.loads(lines[lines.index("event: complete") + 1][len("data: ") :])
    assert details["width"] == 256 and details["seed"] >= 0 and gallery[0]["image"]["path"].endswith(".png")


def test_preview_changes_during_a_run_and_cancel_keeps_the_result(studio, browser):
    ctx, page, errors = open_page(browser, studio.url)
    page.fill("#zi-prompt textarea", "the result to keep")
    page.click("#zi-generate")
    page.wait_for_function("document.querySelector('#zi-live').innerText.includes('Done')")
    kept = page.get_attribute("#zi-gallery img", "src")

    _slow(page)
    page.fill("#zi-prompt textarea", "a long run to watch and cancel")
    page.click("#zi-generate")
    # the preview: a picture per step that changes while the image forms
    seen: dict[int, str] = {}
    page.wait_for_selector("#zi-live img.zi-preview")
    end = time.monotonic() + 60
    while max(seen, default=0) < 6 and time.monotonic() < end and "Step" in _live(page):
        img = page.query_selector("#zi-live img.zi-preview")
        if img is not None:
            seen[int(img.get_attribute("data-step"))] = img.get_attribute("src")
        page.wait_for_timeout(50)
    assert len(seen) >= 2 and max(seen) >= 6, (sorted(seen), _live(page))
    assert len(set(seen.values())) >= 2  # the picture changes as the steps go
    assert re.search(r"Step \d+/50 · about [\d.]+ (s|ms) left", _live(page)), _live(page)

    # Generate while it runs queues the next run and says so
    page.click("#zi-generate")
    page.wait_for_function("document.querySelector('#zi-queue').innerText.includes('next run waits')")
    assert "1st in line" in page.inner_text("#zi-queue") or "2nd in line" in page.inner_text("#zi-queue")

    page.click("#zi-cancel")
    page.wait_for_function("document.querySelector('#zi-live').innerText.includes('Cancelled')")
    note = page.inner_text("#zi-cancel-note")
    assert "the run stops after the current step" in note and "Removed 1 waiting run" in note
    assert "Your previous result is kept" in _live(page)
    assert page.get_attribute("#zi-gallery img", "src") == kept  # the previous result stays
    page.wait_for_function("!document.querySelector('#zi-queue .zi-queue-note')")  # the queued one left too
    assert page.locator("#zi-gallery .error, #zi-live .error, .toast-body").count() == 0  # no red Error
    assert not errors, errors
    ctx.close()


def test_a_reload_finds_the_run_and_closing_the_tab_cancels_it(studio, browser):
    ctx, page, errors = open_page(browser, studio.url)
    _slow(page, steps=40)
    page.fill("#zi-prompt textarea", "survive a reload")
    page.click("#zi-generate")
    page.wait_for_function("document.querySelector('#zi-live').innerText.includes('Step')")
    page.reload()
    page.wait_for_selector(".zi-banner-ready")
    # the form comes back, and the run goes on in the new page
    page.wait_for_function("document.querySelector('#zi-prompt textarea').value == 'survive a reload'")
    assert page.input_value("#zi-width input") == "768" and page.input_value("#zi-steps input[type=number]") == "40"
    page.wait_for_function("document.querySelector('#zi-live').innerText.includes('Step')")
    page.close()  # closing the tab cancels the run after a short grace (a reload within it takes over)
    end = time.monotonic() + 60
    while "cancelled: its page was closed" not in studio.log():
        assert time.monotonic() < end, "the closed tab's run was not cancelled"
        time.sleep(0.1)
    page = ctx.new_page()  # the same browser comes back: it is told what happened
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(studio.url)
    page.wait_for_selector(".zi-banner-ready")
    page.wait_for_function("document.querySelector('#zi-live').innerText.includes('cancelled')")
    assert "its page was closed or reloaded" in page.inner_text("#zi-live")
    assert not errors, errors
    ctx.close()


def test_history_search_delete_and_load_more(studio, browser):
    from gradio_client import Client

    client = Client(studio.url, verbose=False)
    for word in ("walrus", "heron", "otter", "ibis"):
        client.predict(f"a {word} at the beach", "", 64, 64, 2, 0.0, -1, 8, api_name="/generate")
    ctx, page, errors = open_page(browser, studio.url)
    page.get_by_role("tab", name="History").click()
    page.wait_for_function("document.querySelector('#zi-history-line').innerText.includes('newest first')")
    total = int(re.search(r"of (\d+) images", page.inner_text("#zi-history-line")).group(1))
    assert total >= 32
    page.wait_for_function("document.querySelectorAll('#zi-history img').length == 24")
    assert "seed " in page.inner_text("#zi-history") and "at the beach" in page.inner_text("#zi-history")
    page.click("#zi-more")
    page.wait_for_function(f"document.querySelectorAll('#zi-history img').length == {min(total, 48)}")

    search = page.locator("#zi-search textarea, #zi-search input").first
    search.fill("heron")
    search.press("Enter")
    page.wait_for_function("document.querySelector('#zi-history-line').innerText.startsWith('8 of 8')")
    page.locator("#zi-history img").first.click()
    page.wait_for_function("document.querySelector('#zi-params-md').innerText.includes('heron')")
    questions: list[str] = []
    page.once("dialog", lambda d: (questions.append(d.message), d.dismiss()))
    page.click("#zi-delete")  # "no": nothing is deleted
    page.wait_for_function("document.querySelector('#zi-params-md').innerText.includes('Nothing was deleted')")
    assert "heron" in page.inner_text("#zi-params-md") and len(list(studio.outputs.glob("*.png"))) == total
    page.once("dialog", lambda d: (questions.append(d.message), d.accept()))
    page.click("#zi-delete")
    page.wait_for_function("document.querySelector('#zi-params-md').innerText.includes('Deleted')")
    assert questions == ["Delete this image for good?"] * 2  # asked once each time
    page.wait_for_function("document.querySelector('#zi-history-line').innerText.startsWith('7 of 7')")
    assert len([p for p in studio.outputs.glob("*.png")]) == total - 1

    # your next run shows in History at once while you look at it
    page.fill("#zi-prompt textarea", "a heron in the rain")
    page.click("#zi-generate")
    page.wait_for_function("document.querySelector('#zi-history-line').innerText.startsWith('8 of 8')")
    assert not errors, errors
    ctx.close()


def test_the_chinese_page(studio, browser, tmp_path):
    ctx, page, errors = open_page(browser, studio.url, locale="zh-CN")
    assert page.inner_text("#zi-generate") == "生成" and page.inner_text("#zi-cancel") == "取消"
    assert "提示词" in page.inner_text("#zi-prompt") and "等待中" in page.inner_text("#zi-profiler")
    tabs = [t.inner_text() for t in page.locator("#zi-tabs button[role=tab]").all()]
    assert tabs[:3] == ["结果", "历史", "读取 PNG"]
    page.fill("#zi-prompt textarea", "一只橘猫趴在洒满阳光的窗台上打盹")
    page.click("#zi-generate")
    page.wait_for_function("document.querySelector('#zi-live').innerText.includes('完成')")
    assert "种子" in page.inner_text("#zi-summary") and "个 token" in page.inner_text("#zi-tokens")
    page.wait_for_timeout(1200)  # one more profiler tick
    shot = tmp_path / "zh.png"
    page.screenshot(path=str(shot), full_page=True)
    keep(shot, "screenshot-zh.png")
    # the switch: English at once, remembered over a reload; and back
    page.click("#zi-lang")
    page.wait_for_function("document.querySelector('#zi-generate').innerText == 'Generate'")
    page.wait_for_function("document.querySelector('#zi-profiler').innerText.includes('Waiting')")
    page.reload()
    page.wait_for_selector(".zi-banner-ready")
    page.wait_for_function("document.querySelector('#zi-generate').innerText == 'Generate'")
    page.click("#zi-lang")
    page.wait_for_function("document.querySelector('#zi-generate').innerText == '生成'")
    # light and dark: switched at once, remembered over a reload
    dark = page.evaluate("document.body.classList.contains('dark')")
    page.click("#zi-theme")
    assert page.evaluate("document.body.classList.contains('dark')") is not dark
    page.reload()
    page.wait_for_selector(".zi-banner-ready")
    page.wait_for_function(f"document.body.classList.contains('dark') === {str(not dark).lower()}")
    assert not errors, errors
    ctx.close()


def test_a_phone_sees_its_result_after_generate(studio, browser, tmp_path):
    ctx, page, errors = open_page(
        browser,
        studio.url,
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
    )
    header = page.locator("#zi-header").bounding_box()
    assert header["height"] < 150, header  # compact: brand and tools in a line, the status below
    empty = page.locator("#zi-gallery").bounding_box()
    assert empty["height"] < 120, empty  # no big empty box before the first image
    page.fill("#zi-prompt textarea", "a lighthouse at dusk")
    page.click("#zi-generate")
    page.wait_for_function("document.querySelector('#zi-live').innerText.includes('Done')")
    page.wait_for_timeout(600)  # the smooth scroll settles
    img = page.locator("#zi-gallery img").first.bounding_box()
    assert 0 <= img["y"] and img["y"] + img["height"] / 2 <= 844, img  # the result is in view
    seed = _summary_seed(page)
    assert str(seed) in page.inner_text("#zi-summary")  # the full seed, not cut
    name = page.locator("#zi-download td.filename").first
    assert f"seed{seed}" in name.inner_text()  # the file name wraps instead of being cut
    assert name.evaluate("e => e.scrollWidth <= e.clientWidth + 1")
    shot = tmp_path / "phone.png"
    page.screenshot(path=str(shot))
    keep(shot, "screenshot-phone.png")
    assert not errors, errors
    ctx.close()
