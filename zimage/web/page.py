"""The studio page: a Gradio 6 Blocks UI built around one injected Engine.

`build_ui(engine, ops, settings)` returns the Blocks; server.py mounts it on FastAPI with the
options from `page_options()` (look.py: assets, theme, header). The widgets are declared here;
their small events are wired in wiring.py, what they do lives in handlers.py (the Studio), what
the panels show in panels.py, the size arithmetic in sizes.py, the words in i18n.py, the image to
image / inpaint and LoRA areas in toolbox.py, the browser side (language and theme switches, phone
scrolling, the delete question) in static/studio.js.

Every GPU listener shares one `concurrency_id` with a limit of one per replica (one per GPU), so
Gradio's own queue is where people wait (the page shows each tab its place and an ETA); the
engine's replica pool hands each running job to a free replica behind it. The page's Generate and the API's `generate` are two listeners on that one queue: the page's
follows its run with live previews, the API's answers with the PNGs in one call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import gradio as gr

from zimage.model.presets import ASPECT_RATIOS
from zimage.service.request import GUIDANCE_MAX, SEED_MAX, SHIFT_MAX, SHIFT_MIN
from zimage.web import toolbox
from zimage.web.handlers import GPU_QUEUE, Studio
from zimage.web.i18n import tr
from zimage.web.look import ASSETS, _header_html, bilingual, load_examples, page_options, theme
from zimage.web.panels import render_banner, render_profiler
from zimage.web.sizes import CUSTOM, match_preset, ratio_label, size_note
from zimage.web.wiring import _neg_kwargs, _whole_slider, _wire_form, _wire_images

# page_options, theme, ASSETS and load_examples live in look.py; named here as before
__all__ = ["ASSETS", "CACHE_SWEEP", "GPU_QUEUE", "build_ui", "load_examples", "page_options", "theme"]

log = logging.getLogger(__name__)

# Gradio copies every returned image into its cache; these copies are only needed while a page
# shows them (history is served from the outputs folder), so sweep hourly, keep six hours.
CACHE_SWEEP = (3600, 6 * 3600)
DEFAULT_SHIFT = 3.0  # Z-Image-Turbo's scheduler shift (and the tiny model's)

API_DESCRIPTION = (
    "Generate images with Z-Image-Turbo. Only the prompt is required; every other argument defaults to "
    "the model preset's value. Arguments: prompt, negative_prompt (used only when guidance > 0), width "
    "and height (multiples of 16 within the server's limits), steps, guidance (0 = off, the Turbo "
    "default), seed (-1 = random), count (images; seeds s, s+1, ...), shift (the scheduler's time "
    "shift, 1-10; 3 is the model's own). Returns the gallery (the saved PNG files, parameters "
    "embedded) and a details dict with the seeds actually used, stage timings, memory mode and device."
    + toolbox.API_NOTE
)


# ------------------------------------------------------------------------------------------
# the page


@dataclass
class _Inputs:
    """The form's components, in the order generate() takes them (the API's argument order)."""

    prompt: gr.Textbox
    negative: gr.Textbox
    width: gr.Number
    height: gr.Number
    steps: gr.Slider | gr.Number
    guidance: gr.Slider
    seed: gr.Number
    count: gr.Slider | gr.Number
    shift: gr.Slider

    def as_list(self) -> list[gr.components.Component]:
        return [
            self.prompt,
            self.negative,
            self.width,
            self.height,
            self.steps,
            self.guidance,
            self.seed,
            self.count,
            self.shift,
        ]


def build_ui(engine: Any, ops: Any, settings: Any) -> gr.Blocks:
    """The studio page around an injected engine (no global pipeline)."""
    studio = Studio(engine, ops, settings)
    w0, h0 = engine.default_size
    aspect0, tier0 = match_preset(w0, h0, studio.tiers, settings.min_size, settings.max_size)
    examples = load_examples()
    preset = engine.preset
    logins = bool(getattr(settings, "auth", None) or getattr(settings, "auth_file", None))

    with gr.Blocks(
        title="zimage studio",
        analytics_enabled=False,
        delete_cache=CACHE_SWEEP,
        fill_width=True,
    ) as demo:
        studio.blocks = demo
        last_seed = gr.State(-1)
        selected_params = gr.State({})
        history_shown = gr.State(0)
        client = gr.BrowserState("", storage_key="zimage-client")

        with gr.Row(elem_id="zi-header", equal_height=True):
            gr.HTML(_header_html(preset, logins), elem_id="zi-brand", scale=3, min_width=200)
            banner = gr.HTML(render_banner(engine.status()), elem_id="zi-banner", scale=4, min_width=200)

        with gr.Row(elem_id="zi-main", equal_height=False):
            # ---------------- the form
            with gr.Column(scale=4, min_width=320, elem_id="zi-form"):
                with gr.Group(elem_classes=["zi-card-group"]):
                    prompt = gr.Textbox(
                        value="",
                        label=tr("prompt"),
                        placeholder=tr("prompt_placeholder"),
                        lines=1,
                        max_lines=8,
                        autofocus=True,
                        elem_id="zi-prompt",
                        max_length=settings.max_prompt_chars,
                    )
                    tokens = gr.HTML("", elem_id="zi-tokens")
                    negative = gr.Textbox(
                        value="",
                        label=tr("negative"),
                        placeholder=tr("negative_placeholder"),
                        lines=1,
                        max_lines=4,
                        elem_id="zi-negative",
                        max_length=settings.max_prompt_chars,
                        **_neg_kwargs(studio.negative_state(0.0)),
                    )
                with gr.Row(elem_id="zi-actions"):
                    generate_btn = gr.Button(
                        tr("generate"), variant="primary", size="lg", elem_id="zi-generate", scale=3
                    )
                    cancel_btn = gr.Button(tr("cancel"), variant="secondary", size="lg", elem_id="zi-cancel", scale=1)
                cancel_note = gr.Markdown("", elem_id="zi-cancel-note")

                with gr.Group(elem_classes=["zi-card-group"]):
                    aspect = gr.Radio(
                        [ratio_label(r) for r in ASPECT_RATIOS] + [CUSTOM],
                        value=aspect0,
                        label=tr("aspect"),
                        elem_id="zi-aspect",
                    )
                    tier = gr.Radio(
                        list(studio.tiers),
                        value=tier0 if tier0 is not None else w0,
                        label=tr("tier"),
                        elem_id="zi-tier",
                    )
                    with gr.Row():
                        width = gr.Number(value=w0, label=tr("width"), precision=0, step=16, elem_id="zi-width")
                        height = gr.Number(value=h0, label=tr("height"), precision=0, step=16, elem_id="zi-height")
                    size_md = gr.Markdown(size_note(w0, h0), elem_classes=["zi-size-note"])

                with gr.Group(elem_classes=["zi-card-group"]):
                    seed = gr.Number(
                        value=-1,
                        label=tr("seed"),
                        info=tr("seed_info"),
                        precision=0,
                        minimum=-1,
                        maximum=SEED_MAX,
                        elem_id="zi-seed",
                    )
                    with gr.Row(elem_id="zi-seed-buttons"):
                        random_btn = gr.Button(tr("seed_random"), size="sm", elem_id="zi-seed-random")
                        reuse_btn = gr.Button(tr("seed_reuse"), size="sm", elem_id="zi-seed-reuse")
                    steps = _whole_slider(
                        1,
                        settings.max_steps,
                        settings.default_steps,
                        label=tr("steps"),
                        info=tr("steps_info"),
                        elem_id="zi-steps",
                    )
                    guidance = gr.Slider(
                        0.0,
                        GUIDANCE_MAX,
                        value=0.0,
                        step=0.5,
                        label=tr("guidance"),
                        info=tr("guidance_info"),
                        elem_id="zi-guidance",
                    )
                    count = _whole_slider(
                        1,
                        settings.max_count,
                        1,
                        label=tr("count"),
                        info=tr("count_info"),
                        elem_id="zi-count",
                    )
                with gr.Accordion(tr("advanced"), open=False, elem_id="zi-advanced"):
                    shift = gr.Slider(
                        SHIFT_MIN,
                        SHIFT_MAX,
                        value=DEFAULT_SHIFT,
                        step=0.5,
                        label=tr("shift"),
                        info=tr("shift_info"),
                        elem_id="zi-shift",
                    )
                    preview_on = gr.Checkbox(
                        value=True, label=tr("preview"), info=tr("preview_info"), elem_id="zi-preview-on"
                    )
                tools = toolbox.build(engine)  # image to image / inpaint, LoRAs (toolbox.py)

            # ---------------- results, history, parameters
            with gr.Column(scale=6, min_width=320, elem_id="zi-output"):
                live = gr.HTML("", elem_id="zi-live")
                queue_note = gr.HTML("", elem_id="zi-queue")
                with gr.Tabs(elem_id="zi-tabs"):
                    with gr.Tab(tr("tab_result"), id="result") as result_tab:
                        gallery = gr.Gallery(
                            label=tr("tab_result"),
                            show_label=False,
                            columns=2,
                            height="auto",
                            object_fit="contain",
                            buttons=["download", "fullscreen"],
                            elem_id="zi-gallery",
                            preview=True,
                            interactive=False,  # "Use this result" reads it: an input, yet not an upload box
                        )
                        summary = gr.Markdown("", elem_id="zi-summary")
                        download = gr.File(
                            label=tr("download"),
                            file_count="multiple",
                            visible=False,
                            elem_id="zi-download",
                        )
                        with gr.Accordion(tr("details_json"), open=False):
                            details = gr.JSON(label="Details", elem_id="zi-details")
                    with gr.Tab(tr("tab_history"), id="history") as history_tab:
                        with gr.Row(equal_height=True, elem_id="zi-history-bar"):
                            search = gr.Textbox(
                                label=tr("history_search"),
                                placeholder=tr("history_search_placeholder"),
                                show_label=False,
                                elem_id="zi-search",
                                scale=3,
                                min_width=160,
                            )
                            refresh_btn = gr.Button(tr("refresh"), size="sm", scale=0, min_width=90)
                        history_line = gr.Markdown("", elem_id="zi-history-line")
                        gr.Markdown(tr(studio.space_note_key()), elem_classes=["zi-hint"], elem_id="zi-space-note")
                        history = gr.Gallery(
                            label=tr("tab_history"),
                            show_label=False,
                            columns=4,
                            height="auto",
                            object_fit="cover",
                            buttons=["download", "fullscreen"],
                            elem_id="zi-history",
                        )
                        more_btn = gr.Button(tr("load_more"), size="sm", visible=False, elem_id="zi-more")
                    with gr.Tab(tr("tab_load"), id="load") as load_tab:
                        dropped = gr.File(
                            label=tr("drop"),
                            file_types=[".png"],
                            type="filepath",
                            height=140,
                            elem_id="zi-drop",
                        )
                        dropped_image = gr.Image(
                            label=tr("dropped_image"),
                            type="filepath",
                            interactive=False,
                            visible=False,
                            height=320,
                            elem_id="zi-dropped",
                        )
                with gr.Group(elem_id="zi-params"):
                    params_md = gr.Markdown(tr("params_hint"), elem_id="zi-params-md")
                    with gr.Row(elem_id="zi-params-actions"):
                        use_btn = gr.Button(tr("use_settings"), size="sm", scale=0, min_width=150, elem_id="zi-use")
                        delete_btn = gr.Button(
                            tr("delete"), size="sm", scale=0, min_width=90, variant="stop", elem_id="zi-delete"
                        )

                if examples:
                    gr.Examples(
                        examples=[[e["prompt"]] for e in examples],
                        inputs=[prompt],
                        label="Example prompts · 示例",
                        examples_per_page=10,
                        elem_id="zi-examples",
                    )

            # ---------------- the live profiler
            with gr.Column(scale=3, min_width=280, elem_id="zi-side"):
                gr.HTML(f'<div class="zi-side-title">{bilingual("side_title")}</div>', elem_id="zi-side-head")
                profiler = gr.HTML(render_profiler(engine.status()), elem_id="zi-profiler")

        inputs = _Inputs(prompt, negative, width, height, steps, guidance, seed, count, shift)
        form = [*inputs.as_list(), aspect, tier]
        run_outputs = [gallery, details, live, summary, download, last_seed, cancel_note]

        # The page's Generate: a run followed with previews; pressing again queues the next run.
        # Both GPU listeners share one concurrency group of limit 1 (and the engine's lock).
        ui_event = gr.on(
            triggers=[generate_btn.click, prompt.submit],
            fn=studio.generate_ui,
            inputs=[*inputs.as_list(), preview_on, client, *tools.page_inputs],
            outputs=run_outputs,
            concurrency_id=GPU_QUEUE,
            concurrency_limit=engine.concurrency,
            show_progress="hidden",
            trigger_mode="multiple",
            api_visibility="private",
            # raw values reach the engine, whose validation names the field, the value and what is
            # allowed (Gradio's own bounds check says only "Value 100 is greater than maximum value 8")
            preprocess=False,
        )
        # The API: every argument but the prompt optional (the components' values are the defaults).
        api_trigger = gr.Button(visible=False, elem_id="zi-api")
        api_trigger.click(
            studio.generate,
            inputs=[*inputs.as_list(), *tools.inputs],  # the toolbox's after: positional calls keep working
            outputs=[gallery, details],
            api_name="generate",
            api_description=API_DESCRIPTION,
            concurrency_id=GPU_QUEUE,
            concurrency_limit=engine.concurrency,
            preprocess=False,
        )
        studio.ui_fn_ids = {ui_event["id"]}
        history_open = gr.State(False)
        ui_event.then(  # your new image shows in History at once when you are looking at it
            studio.history_if_open,
            inputs=[search, history_shown, history_open],
            outputs=[history, history_line, history_shown, more_btn],
            queue=False,
            api_visibility="private",
        )
        cancel_btn.click(
            studio.cancel,
            outputs=[cancel_note],
            queue=False,
            api_name="cancel",
            api_description="Cancel this session's (client's) jobs: the running one stops within a step, "
            "waiting ones leave the queue. Other sessions' jobs go on.",
        )
        demo.unload(studio.page_closed)
        # a reload: the form and last result at once (off the queue); a run still going is followed
        following = gr.State("")
        demo.load(
            studio.restore,
            inputs=[client],
            outputs=[client, *run_outputs, *form, *tools.reload_outputs, following],
            queue=False,
            show_progress="hidden",
            api_visibility="private",
        )
        following.change(
            studio.follow,
            inputs=[following],
            outputs=run_outputs,
            concurrency_limit=None,
            show_progress="hidden",
            api_visibility="private",
        )

        _wire_form(studio, inputs, aspect, tier, size_md, last_seed, random_btn, reuse_btn, tokens)
        _wire_images(
            studio,
            gallery,
            history,
            selected_params,
            params_md,
            use_btn,
            delete_btn,
            dropped,
            dropped_image,
            form,
            search,
            history_shown,
            history_line,
            more_btn,
            history_tab,
            refresh_btn,
            tools,
        )
        toolbox.wire(tools, gallery, steps, studio._files_of)
        history_tab.select(lambda: True, outputs=[history_open], queue=False, api_visibility="private")
        for tab in (result_tab, load_tab):
            tab.select(lambda: False, outputs=[history_open], queue=False, api_visibility="private")

        # live panel: queue=False so it answers while the GPU is busy
        timer = gr.Timer(1.0)
        for trigger in (timer.tick, demo.load):
            trigger(
                studio.tick,
                outputs=[profiler, banner, queue_note],
                queue=False,
                show_progress="hidden",
                api_visibility="private",
            )

    demo.queue(max_size=settings.queue_size, api_open=False, default_concurrency_limit=1)
    return demo
