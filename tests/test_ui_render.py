"""The studio's pure parts, in process with the real tiny engine: sizes, the profiler panel,
the banner, the page's wiring (one GPU concurrency group, api_open=False), PNG loading."""

from __future__ import annotations

import pytest

from zimage.model.presets import ASPECT_RATIOS
from zimage.web import handlers, page, panels, sizes


def test_size_tiers_follow_the_model_preset():
    assert sizes.size_tiers(256, 2048) == (256, 512, 1024, 1280, 1536)  # tiny: small first
    assert sizes.size_tiers(1024, 2048) == (1024, 1280, 1536)
    assert sizes.size_tiers(1024, 1280) == (1024, 1280)


@pytest.mark.parametrize("tier", [256, 512, 1024, 1280, 1536])
def test_every_preset_is_valid_and_found_again(tier):
    from zimage.service.request import GenerationRequest, Limits, validate

    limits = Limits(min_size=64, max_size=2048)
    for ratio in ASPECT_RATIOS:
        label = sizes.ratio_label(ratio)
        w, h, _note = sizes.preset_size(label, tier, limits.min_size, limits.max_size)
        validate(GenerationRequest("x", width=w, height=h), limits)  # raises if not allowed
        found = sizes.match_preset(w, h, sizes.size_tiers(256, 2048), limits.min_size, limits.max_size)
        assert sizes.preset_size(found[0], found[1], 64, 2048)[:2] == (w, h)


def test_presets_beyond_the_limit_are_scaled_to_fit_and_say_so():
    w, h, note = sizes.preset_size("21:9", 1536, 256, 2048)
    assert max(w, h) <= 2048 and w % 16 == 0 and h % 16 == 0 and "scaled" in note
    assert sizes.preset_size("16:9", 1024, 256, 2048) == (1360, 768, "")
    assert sizes.match_preset(1000, 1000, (1024,), 256, 2048) == (sizes.CUSTOM, None)


def test_example_prompts_in_english_and_chinese():
    examples = page.load_examples()
    langs = [e["lang"] for e in examples]
    assert langs.count("en") >= 5 and langs.count("zh") >= 5
    assert all(e["prompt"].strip() for e in examples)


def test_profiler_shows_what_the_last_run_actually_took(engine):
    result = engine.generate(engine.default_request("a teapot", width=64, height=64, steps=3, seed=5))
    result.wait_saved(30)
    status = engine.status()
    html = panels.render_profiler(status, {"purge_last_run": "never", "purge": "off"}, {"waiting": 2, "users": {}})
    for text in ("Last run", "Text encoder", "Denoise", "3 steps", "it/s", "VAE decode", "PNG save"):
        assert text in html, text
    assert "mode cpu" in html and "no GPU in use" in html and "Process memory" in html
    assert "Model load" in html and "read weights" in html
    assert "seed 5" in html and "64x64" in html
    assert "Last clean-up" in html and "Operations" in html
    assert ">2<" in html  # waiting: two in Gradio's queue, none at the engine lock
    assert "Ready" in panels.render_banner(status) and "mode cpu" in panels.render_banner(status)


def test_profiler_escapes_what_it_shows(engine):
    status = dict(engine.status(), notes=["<script>alert(1)</script>"], model="<b>x</b>")
    html = panels.render_profiler(status, {"<k>": "<v>"})
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<b>x</b>" not in html and "&lt;k&gt;" in html


def test_banner_while_loading_and_after_a_failure(make_settings, tmp_path):
    from zimage.errors import ModelNotFound
    from zimage.service.engine import Engine

    loading = Engine(make_settings())
    banner = panels.render_banner(loading.status())
    assert "Loading the model" in banner and "wait in the queue" in banner
    assert "Decided once the model has loaded" in panels.render_profiler(loading.status())

    broken = Engine(make_settings(model=str(tmp_path / "missing")))
    with pytest.raises(ModelNotFound, match="missing"):  # the engine's own error; the timeline records it
        broken.load()
    status = broken.status()
    banner = panels.render_banner(status)
    assert "failed to load" in banner and str(tmp_path / "missing") in banner
    assert "Failed:" in panels.render_profiler(status) and "failed" in panels.render_profiler(status)


def test_the_page_wires_one_gpu_queue_and_keeps_the_panel_off_it(engine, make_settings):
    from zimage.ops.operations import Operations

    settings = make_settings(queue_size=5)
    demo = page.build_ui(engine, Operations(engine, settings, lambda code: None), settings)
    fns = list(demo.fns.values())
    gen = [f for f in fns if f.api_name == "generate"]
    assert len(gen) == 1
    gen = gen[0]
    on_gpu = [f for f in fns if f.concurrency_id == page.GPU_QUEUE]
    assert len(on_gpu) == 2 and gen in on_gpu  # the API's generate and the page's Generate: one queue
    for f in on_gpu:
        assert f.concurrency_limit == 1 and f.queue
        assert not f.preprocess  # raw values: the engine's messages reach the client
    # after a reload the page follows its run off the GPU group, without a limit; everything else
    # answers at once, off the queue (the live panel above all, and the reload itself)
    follow = [f for f in fns if f.name == "follow"]
    assert len(follow) == 1 and follow[0].concurrency_limit is None and follow[0].queue
    closed = [f for f in fns if f.name == "page_closed"]  # demo.unload: Gradio calls it directly
    assert all(not f.queue for f in fns if f not in on_gpu + follow + closed)
    assert demo._queue.max_size == 5 and demo.api_open is False


def test_png_drop_and_parameters(engine, make_settings, tmp_path):
    from zimage.ops.operations import Operations

    settings = make_settings()
    studio = handlers.Studio(engine, Operations(engine, settings, lambda code: None), settings)
    result = engine.generate(engine.default_request("a fox", width=64, height=96, steps=2, seed=11))
    png = result.wait_saved(30)[0]
    params, md, shown, prompt, negative, w, h, steps, guidance, seed, count, shift, aspect, tier = studio.load_png(png)
    assert params["seed"] == 11 and "a fox" in md
    assert shown["value"] == png and shown["visible"]  # the image itself is shown
    assert (prompt, w, h, steps, seed, count, aspect) == ("a fox", 64, 96, 2, 11, 1, sizes.CUSTOM)

    plain = tmp_path / "plain.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(plain)
    out = studio.load_png(str(plain))
    assert out[0] == {} and "carries no parameters" in out[1]
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    out = studio.load_png(str(text))
    assert out[0] == {} and "not a PNG image" in out[1]


def test_summary_names_the_seed_used_and_each_stage():
    details = {
        "seeds": [42, 43],
        "width": 64,
        "height": 64,
        "steps": 8,
        "guidance": 0.0,
        "memory_mode": "gpu",
        "device": "NVIDIA H100",
        "notes": ["Ran out of GPU memory during vae_decode; freed memory and retried with VAE tiling."],
        "timings": {"total_s": 1.2, "text_encoder_s": 0.1, "denoise_s": 0.9, "it_per_s": 8.9, "vae_decode_s": 0.2},
    }
    md = panels.summary_markdown(details)
    assert "Seed 42, 43" in md and "8.90 it/s" in md and "VAE decode" in md and "retried with VAE tiling" in md


def test_selecting_reads_only_this_studios_images(engine, make_settings, tmp_path):
    import gradio as gr
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from zimage.ops.operations import Operations

    settings = make_settings()
    studio = handlers.Studio(engine, Operations(engine, settings, lambda code: None), settings)
    result = engine.generate(engine.default_request("an owl", width=64, height=64, steps=2, seed=21))
    ours = result.wait_saved(30)[0]
    params, md = studio.select_image(gr.SelectData(None, {"index": 0, "value": {"image": {"path": ours}}}))
    assert params["seed"] == 21 and "an owl" in md and params["_path"] == ours

    elsewhere = tmp_path / "secret.png"  # a PNG outside the outputs folder and Gradio's cache
    info = PngInfo()
    info.add_text("parameters", "secret prompt\nSteps: 8, Seed: 1, Size: 64x64")
    Image.new("RGB", (8, 8)).save(elsewhere, pnginfo=info)
    params, md = studio.select_image(gr.SelectData(None, {"index": 0, "value": {"image": {"path": str(elsewhere)}}}))
    assert params == {} and "secret" not in md


def test_a_logout_link_only_with_logins(engine, make_settings):
    from zimage.ops.operations import Operations

    def header(**kw):
        settings = make_settings(**kw)
        demo = page.build_ui(engine, Operations(engine, settings, lambda code: None), settings)
        return next(b.value for b in demo.blocks.values() if getattr(b, "elem_id", None) == "zi-brand")

    assert 'href="logout"' in header(auth=("alice:pw1",))
    assert 'href="logout"' not in header()
    assert 'id="zi-lang"' in header() and 'id="zi-theme"' in header()
