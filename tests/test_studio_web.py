"""The studio's server side without a browser: API defaults for REST, the queue's ETA clock, the
page's runs (cancel, closed tab, reload), history paging/search/delete, the words in both languages,
the live box, the token counter, the Operations card in plain words."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from zimage.service.request import GenerationRequest
from zimage.service.store import OutputStore
from zimage.web import api, i18n, panels
from zimage.web.history import PAGE, History
from zimage.web.runs import Run, Runs, StepClock


def _studio(engine, make_settings, **kw):
    from zimage.ops.operations import Operations
    from zimage.web import page

    settings = make_settings(**kw)
    demo = page.build_ui(engine, Operations(engine, settings, lambda code: None), settings)
    return demo


# --- the API's defaults --------------------------------------------------------------------


def test_rest_calls_get_the_forms_defaults_for_what_they_leave_out(engine, make_settings):
    demo = _studio(engine, make_settings)
    defaults = api.api_defaults(demo)["generate"]
    w, h = engine.default_size
    tools = [None, None, 0.6, 8, [], 256, ""]  # image, mask, strength, feather, outpaint sides and px, loras
    assert defaults == ["", "", w, h, 8, 0.0, -1, 1, 3.0, *tools]  # prompt, negative, size, steps, ..., shift
    padded = json.loads(api._pad(b'{"data": ["a cat"]}', defaults))
    assert padded["data"] == ["a cat", "", w, h, 8, 0.0, -1, 1, 3.0, *tools]
    full = b'{"data": ["a", "b", 64, 64, 2, 0, 5, 1, 4.0, null, null, 0.6, 8, [], 256, ""]}'
    assert api._pad(full, defaults) == full  # a full call goes through untouched
    assert api._pad(b"not json", defaults) == b"not json"  # Gradio answers that itself
    assert "cancel" not in api.api_defaults(demo) or api.api_defaults(demo)["cancel"] == []


# --- the ETA clock --------------------------------------------------------------------------


def _details(w, h, count, step_s, steps=8, rest=0.5):
    return {
        "width": w,
        "height": h,
        "count": count,
        "timings": {"steps_s": [step_s] * steps, "denoise_s": step_s * steps, "total_s": step_s * steps + rest},
    }


def test_the_eta_comes_from_measured_step_times():
    clock = StepClock()
    assert clock.estimate(1024, 1024, 8, 1) is None  # nothing measured yet: no made-up number
    clock.observe(_details(1024, 1024, 1, 0.1))
    assert clock.estimate(1024, 1024, 8, 1) == pytest.approx(8 * 0.1 + 0.5)
    assert clock.estimate(1024, 1024, 20, 1) == pytest.approx(20 * 0.1 + 0.5)
    assert clock.estimate(1024, 1024, 8, 2) == pytest.approx(2 * (8 * 0.1 + 0.5))  # scaled by pixels
    # a running job of the same size counts with its own step time
    run = Run(client="", session="s", user="", job=None, form={"width": 1024, "height": 1024, "count": 1, "steps": 8})
    run.phase, run.step, run.total, run.step_s = "denoise", 6, 8, 0.2
    assert clock.remaining(run) == pytest.approx(2 * 0.2 + 0.5)
    assert clock.estimate(1024, 1024, 8, 1, like=run) == pytest.approx(8 * 0.2 + 0.5)


# --- the page's runs ------------------------------------------------------------------------


def _wait(cond, timeout=60.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_a_run_lives_on_its_own_and_reports_its_steps(engine):
    runs = Runs(engine)
    req = GenerationRequest("a boat", width=64, height=64, steps=3, seed=4)
    run = runs.start(req, client="c1", session="s1", user="", form={"prompt": "a boat"}, preview=True)
    assert run.done.wait(60)
    assert run.state == "done" and run.details["seeds"] == [4] and Path(run.paths[0]).is_file()
    assert run.step == 3 and run.total == 3
    assert runs.last_of_client("c1", "") is run and runs.last_done_of_client("c1", "") is run
    assert runs.last_of_client("c1", "bob") is None  # with logins, only its own user finds it
    assert runs.clock.estimate(64, 64, 3, 1) is not None


def test_cancel_a_closed_tab_and_a_reload_that_takes_over(engine):
    runs = Runs(engine, close_grace_s=0.3)
    long = GenerationRequest("a slow one", width=256, height=256, steps=50, count=4, seed=1)
    # the Cancel button: this session's run stops within a step and says so
    run = runs.start(long, client="c", session="s1", user="", form={}, preview=False)
    _wait(lambda: run.step >= 1)
    assert runs.cancel_session("s1") == 1 and runs.cancel_session("other") == 0
    assert run.done.wait(60) and run.state == "cancelled" and run.cancel_reason == "button"
    # closing the tab cancels after the grace...
    run = runs.start(long, client="c", session="s2", user="", form={}, preview=False)
    _wait(lambda: run.step >= 1)
    runs.tab_closed("s2")
    assert run.done.wait(60) and run.state == "cancelled" and run.cancel_reason == "closed"
    # ...unless a reload took the run over meanwhile
    quick = GenerationRequest("a quick one", width=64, height=64, steps=30, seed=2)
    run = runs.start(quick, client="c", session="s3", user="", form={}, preview=False)
    runs.tab_closed("s3")
    runs.take_over(run, "s4")
    assert run.done.wait(60) and run.state == "done"


def test_a_bad_request_is_refused_before_a_run_starts(engine, make_settings):
    import gradio as gr

    from zimage.ops.operations import Operations
    from zimage.web.handlers import Studio

    settings = make_settings()
    studio = Studio(engine, Operations(engine, settings, lambda code: None), settings)
    gen = studio.generate_ui("a cat", "", 100, 64, 2, 0, -1, 1, None, True, "c", None)
    with pytest.raises(gr.Error, match=r"Width must be a multiple of 16 between 64 and 2048 \(got 100\)"):
        next(gen)
    assert studio.runs.last_of_client("c", "") is None


# --- history ---------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    from PIL import Image

    store = OutputStore(tmp_path / "out")
    prompts = [f"a red fox number {i}" if i % 3 == 0 else f"a blue whale number {i}" for i in range(30)]
    for i, p in enumerate(prompts):
        store.save(
            [Image.new("RGB", (8, 8))], [{"prompt": p, "seed": 1000 + i, "created": f"2026-11-21T10:{i:02d}:00"}]
        )
    return store


def test_history_pages_newest_first_with_full_captions(saved):
    h = History(saved)
    items, line, shown, more = h.page("", 0, "", "en")
    assert len(items) == PAGE == shown and more["visible"] is True
    assert "30 images" in line and "24 of 30" in line
    assert items[0][1] == "seed 1029 · 2026-11-21 10:29\na blue whale number 29"  # full seed, date, prompt
    items, line, shown, more = h.page("", shown, "", "en", more=True)
    assert len(items) == 30 and more["visible"] is False


def test_history_search_and_delete(saved, tmp_path):
    h = History(saved)
    items, line, _, _ = h.page("RED fox", 0, "", "en")
    assert len(items) == 10 and all("red fox" in c for _, c in items)
    assert h.page("no such thing", 0, "", "zh-CN")[1] == "没有提示词包含“no such thing”的图片。"
    # delete by the name of the copy the page showed (Gradio's cache keeps the file name)
    target = Path(items[0][0])
    shown_copy = tmp_path / "gradio-cache" / "abc123" / target.name
    assert h.delete(str(shown_copy), "")
    assert not target.exists() and len(h.page("red fox", 0, "", "en")[0]) == 9
    assert not h.delete(str(shown_copy), "")  # gone already
    assert not h.delete(str(tmp_path / "notes.png"), "")  # not a name the store writes
    other = tmp_path / "elsewhere.png"
    other.write_bytes(b"x")
    link = saved.folder / "20990101-000000-000000-seed1.png"
    link.symlink_to(other)
    assert not h.delete(str(link), "") and other.exists()  # never through a link


# --- words, the live box, the counter, Operations ------------------------------------------------


def test_both_languages_have_every_string_with_the_same_placeholders():
    assert set(i18n.EN) == set(i18n.ZH)
    fields = re.compile(r"\{(\w+)\}")
    for key, text in i18n.EN.items():
        assert set(fields.findall(text)) == set(fields.findall(i18n.ZH[key])), key


class _Req:
    def __init__(self, cookies=None, headers=None):
        self.cookies = cookies or {}
        self.headers = headers or {}


def test_the_language_follows_the_switch_then_the_browser():
    assert i18n.lang_of(_Req(headers={"accept-language": "zh-CN,zh;q=0.9,en;q=0.8"})) == "zh-CN"
    assert i18n.lang_of(_Req(headers={"accept-language": "en-US,en;q=0.9"})) == "en"
    assert i18n.lang_of(_Req({"zimage-lang": "en"}, {"accept-language": "zh-CN"})) == "en"
    assert i18n.lang_of(_Req({"zimage-lang": "zh-CN"}, {"accept-language": "de"})) == "zh-CN"
    assert i18n.lang_of(None) == "en"


def test_the_live_box_says_what_the_run_does_and_how_it_ended():
    import numpy as np

    from zimage.service.preview import Frame

    frame = Frame(3, 8, np.zeros((32, 48, 3), dtype=np.uint8))
    html = panels.render_live(
        {"state": "running", "phase": "denoise", "step": 3, "total": 8, "eta_s": 2.5, "preview": frame}
    )
    assert "Step 3/8" in html and "about 2.50 s left" in html and 'data-step="3"' in html
    assert "data:image/png;base64," in html and "aspect-ratio:48/32" in html
    assert "Cancelled. Your previous result is kept." in panels.render_live({"state": "cancelled"})
    assert "page was closed" in panels.render_live({"state": "cancelled", "reason": "closed"})
    assert "已取消" in panels.render_live({"state": "cancelled"}, "zh-CN")
    assert "2nd in line · about 9.00 s" in panels.render_queue_note({"place": 2, "eta_s": 9.0, "running_mine": False})
    assert "next run" in panels.render_queue_note({"place": 1, "eta_s": None, "running_mine": True})
    assert "第 3 位" in panels.render_queue_note({"place": 3, "eta_s": 1.0, "running_mine": False}, "zh-CN")


def test_the_token_counter_warns_before_the_prompt_is_cut(engine, make_settings):
    from zimage.ops.operations import Operations
    from zimage.web.handlers import TOKEN_LIMIT, Studio

    settings = make_settings(max_prompt_chars=20000)
    studio = Studio(engine, Operations(engine, settings, lambda code: None), settings)
    short = studio.count_tokens("a cat")
    long = studio.count_tokens("a cat on a mat " * 200)
    assert 0 < short < 40 and long > TOKEN_LIMIT
    assert panels.render_tokens(short, TOKEN_LIMIT) == f'<div class="zi-tokens">{short} / 512 tokens</div>'
    assert "close to" in panels.render_tokens(480, TOKEN_LIMIT)
    over = panels.render_tokens(long, TOKEN_LIMIT)
    assert "will be cut" in over and f"about {long - 512}" in over
    # after a run the summary says so
    run = Run(client="", session="", user="", job=None, form={}, state="done", details={"seeds": [1], "timings": {}})
    out = studio._finished(run, "en", tokens=long)
    assert f"Your prompt had {long} tokens" in out[3]


def test_the_operations_card_in_plain_words(engine):
    ops = {
        "purge": "every 30 min: remove older than 168 h",
        "purge_folders": "outputs",
        "purge_last_run": "not yet",
        "purge_last_removed": "",
        "purge_last_errors": "",
        "purge_next_run": None,
        "watchdog": "exit 75 on an unrecoverable CUDA error; memory check off",
        "watchdog_reserved_gib": "",
        "watchdog_last": None,
        "watchdog_exiting": False,
    }
    html = panels.render_profiler(engine.status(), ops)
    card = html[html.index("zi-ops") :]
    for text in ("Clean-up of old images", "Last clean-up", "not yet", "Restart guard"):
        assert text in card, text
    for text in ("watchdog exiting", "False", "None", "purge last removed", "Restarting"):
        assert text not in card, text
    assert "Restarting now" in panels.render_profiler(engine.status(), {**ops, "watchdog_exiting": True})


def test_a_queue_join_with_the_older_argument_list_gets_the_defaults(engine, make_settings):
    demo = _studio(engine, make_settings)
    fn = next(f for f in demo.fns.values() if f.api_name == "generate")
    mw = api.ApiDefaults(None, demo)
    by_id = mw._for("/gradio_api/queue/join")
    old = json.dumps({"fn_index": fn._id, "data": ["a cat", "", 64, 64, 2, 0.0, 5, 1], "session_hash": "s"})
    assert json.loads(api._pad(old.encode(), by_id))["data"][8] == 3.0  # the shift added (and the toolbox after)
    page_event = next(f for f in demo.fns.values() if f.name == "generate_ui")
    other = json.dumps({"fn_index": page_event._id, "data": ["a cat"], "session_hash": "s"}).encode()
    assert api._pad(other, by_id) == other  # only public endpoints are padded
    assert mw._for("/gradio_api/call/v2/generate") is None  # Gradio fills those by name itself


def test_the_api_middleware_passes_the_lifespan_through():
    """Only HTTP POSTs are looked at; the lifespan (which starts the model load) goes straight on."""
    import asyncio

    seen = []

    async def app(scope, receive, send):
        seen.append(scope["type"])

    asyncio.run(api.ApiDefaults(app, None)({"type": "lifespan"}, None, None))
    assert seen == ["lifespan"]
