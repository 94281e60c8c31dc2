"""The toolbox in a real browser (Playwright + Debian's Chromium, the real server, tiny model): the
image to image and LoRA areas render, "Use this result" makes the last picture the source, the note
says what the settings do, and Generate then runs image to image with previews to the end."""

from __future__ import annotations

import pytest

from .support import App
from .test_browser import browser, open_page  # noqa: F401 - the module's browser fixture

pytestmark = pytest.mark.slow  # a real server and a real browser


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_dir):
    srv = App(tmp_path_factory.mktemp("toolbox-browser"), tiny_dir).wait_ready()
    yield srv
    srv.stop()


def test_use_this_result_then_image_to_image(studio, browser):  # noqa: F811 - the imported fixture
    ctx, page, errors = open_page(browser, studio.url)

    page.click("#zi-toolbox button.label-wrap")  # open the accordion
    page.wait_for_selector("#zi-use-result")
    page.click("#zi-loras button.label-wrap")
    page.wait_for_function("(document.querySelector('#zi-lora-note')?.innerText || '').includes('weight 0')")

    steps = page.locator("#zi-steps input[type=number]")
    steps.fill("4")
    steps.press("Enter")
    page.fill("#zi-prompt textarea", "a lighthouse at dusk")
    page.click("#zi-generate")
    page.wait_for_function("document.querySelector('#zi-summary').innerText.includes('Seed')")
    assert "img2img" not in page.inner_text("#zi-summary")

    page.click("#zi-use-result")
    # the note follows the source: image to image, how many steps run, and what does nothing
    page.wait_for_function(
        "(document.querySelector('#zi-toolbox-note')?.innerText || '').includes('About 3 of 4 steps')"
    )
    note = page.inner_text("#zi-toolbox-note")
    assert "feather does nothing without one" in note and "width and height fields are not used" in note

    page.fill("#zi-prompt textarea", "a lighthouse at dawn")
    page.click("#zi-generate")
    page.wait_for_function("document.querySelector('#zi-summary').innerText.includes('img2img')")
    summary = page.inner_text("#zi-summary")
    assert "strength 0.6" in summary and "source sha256" in summary and "mask no" in summary

    # paint a stroke on the source's copy in the mask editor: Generate then inpaints. The editor
    # sends its layers again on page updates (the live profiler): repeats must not hit the quota.
    refused: list[str] = []
    page.on("response", lambda r: refused.append(r.url) if "/upload" in r.url and r.status == 429 else None)
    canvas = page.locator("#zi-paint canvas").first
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    assert box and box["width"] > 50, box
    x, y = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5
    page.mouse.move(x, y)
    page.mouse.down()
    for i in range(1, 12):
        page.mouse.move(x + i * 6, y, steps=2)
    page.mouse.up()
    page.fill("#zi-prompt textarea", "a lighthouse in fog")
    page.click("#zi-generate")
    page.wait_for_function("document.querySelector('#zi-summary').innerText.includes('mask yes')")
    assert "inpaint" in page.inner_text("#zi-summary")
    page.wait_for_timeout(2000)  # the editor's repeats after the run
    assert not refused, refused
    assert not errors, errors
    ctx.close()
