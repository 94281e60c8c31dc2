"""The studio page: a Gradio 6 Blocks UI built around one injected Engine.

`build_ui(engine, ops, settings)` returns the Blocks; server.py mounts it on FastAPI with the
options from `page_options()`. The widgets are declared here; what they do lives in
handlers.py (the Studio), what the panels show in panels.py, the size arithmetic in sizes.py.
Every GPU listener shares one `concurrency_id` with a limit of one per replica (one per GPU),
so Gradio's own queue (and its queue position display) is where people wait; the engine's
replica pool hands each running job to a free replica behind it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from zimage.model.presets import ASPECT_RATIOS
from zimage.service.request import GUIDANCE_MAX, SEED_MAX
from zimage.web.handlers import Studio
from zimage.web.panels import _e, render_banner, render_profiler
from zimage.web.sizes import CUSTOM, match_preset, ratio_label, size_note

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "static"  # package data: found the same once pip-installed
GPU_QUEUE = "gpu"  # the one concurrency group of every listener that runs the pipeline
# Gradio copies every returned image into its cache; these copies are only needed while a page
# shows them (history is served from the outputs folder), so sweep hourly, keep six hours.
CACHE_SWEEP = (3600, 6 * 3600)

API_DESCRIPTION = (
    "Generate images with Z-Image-Turbo. Arguments: prompt, negative_prompt (used only when "
    "guidance > 0), width and height (multiples of 16 within the server's limits), steps, "
    "guidance (0 = off, the Turbo default), seed (-1 = random), count (images; seeds s, s+1, ...). "
    "Returns the gallery (the saved PNG files, parameters embedded) and a details dict with the "
    "seeds actually used, stage timings, memory mode and device."
)


# ------------------------------------------------------------------------------------------
# assets and page options


def load_examples(path: Path | None = None) -> list[dict[str, str]]:
    """Example prompts ({lang, prompt}) from static/examples.json; [] when the file is missing."""
    path = path or ASSETS / "examples.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("no example prompts: cannot read %s", path)
        return []
    items = data.get("examples", []) if isinstance(data, dict) else data
    return [e for e in items if isinstance(e, dict) and isinstance(e.get("prompt"), str)]


def _logo_svg() -> str:
    try:
        return (ASSETS / "logo.svg").read_text(encoding="utf-8")
    except OSError:
        return ""


def theme() -> gr.themes.Base:
    return gr.themes.Soft(
        primary_hue=gr.themes.colors.indigo,
        secondary_hue=gr.themes.colors.teal,
        neutral_hue=gr.themes.colors.slate,
        # local fonts only: the studio must look right on machines without internet access
        font=["Inter", "ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Noto Sans", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"],
    ).set(
        body_background_fill="*neutral_50",
        block_radius="14px",
        button_large_radius="12px",
    )


def page_options() -> dict[str, Any]:
    """Keyword arguments for gr.mount_gradio_app: theme, css, favicon."""
    css = ASSETS / "studio.css"
    logo = ASSETS / "logo.svg"
    return {
        "theme": theme(),
        "css_paths": [css] if css.is_file() else [],
        "favicon_path": str(logo) if logo.is_file() else None,
    }


# ------------------------------------------------------------------------------------------
# the page


@dataclass
class _Inputs:
    """The form's components, in the order generate() takes them (the API's argument order)."""

    prompt: gr.Textbox
    negative: gr.Textbox
    width: gr.Number
    height: gr.Number
    steps: gr.Slider
    guidance: gr.Slider
    seed: gr.Number
    count: gr.Slider

    def as_list(self) -> list[gr.components.Component]:
        return [self.prompt, self.negative, self.width, self.height, self.steps, self.guidance, self.seed, self.count]


def build_ui(engine: Any, ops: Any, settings: Any) -> gr.Blocks:
    """The studio page around an injected engine (no global pipeline)."""
    studio = Studio(engine, ops, settings)
    w0, h0 = engine.default_size
    aspect0, tier0 = match_preset(w0, h0, studio.tiers, settings.min_size, settings.max_size)
    examples = load_examples()
    preset = engine.preset

    with gr.Blocks(
        title="zimage studio",
        analytics_enabled=False,
        delete_cache=CACHE_SWEEP,
        fill_width=True,
    ) as demo:
        studio.blocks = demo
        last_seed = gr.State(-1)
        selected_params = gr.State({})

        with gr.Row(elem_id="zi-header", equal_height=True):
            gr.HTML(
                f'<div class="zi-brand">{_logo_svg()}<div><h1>zimage <span>studio</span></h1>'
                f"<p>{_e(preset.description or preset.name)}</p></div></div>",
                elem_id="zi-brand",
                scale=3,
            )
            banner = gr.HTML(render_banner(engine.status()), elem_id="zi-banner", scale=4)

        with gr.Row(elem_id="zi-main", equal_height=False):
            # ---------------- the form
            with gr.Column(scale=4, min_width=330, elem_id="zi-form"):
                with gr.Group(elem_classes=["zi-card-group"]):
                    prompt = gr.Textbox(
                        "",  # a default for API callers too: Client.predict("a cat", api_name="/generate")
                        label="Prompt",
                        placeholder="Describe the picture… (Enter generates, Shift+Enter adds a line)",
                        lines=1,
                        max_lines=8,
                        autofocus=True,
                        elem_id="zi-prompt",
                        max_length=settings.max_prompt_chars,
                    )
                    negative = gr.Textbox(
                        "",
                        label="Negative prompt",
                        placeholder="What to avoid",
                        lines=1,
                        max_lines=4,
                        elem_id="zi-negative",
                        max_length=settings.max_prompt_chars,
                        **_neg_kwargs(studio.negative_state(0.0)),
                    )
                with gr.Row(elem_id="zi-actions"):
                    generate_btn = gr.Button("Generate", variant="primary", size="lg", elem_id="zi-generate", scale=3)
                    cancel_btn = gr.Button("Cancel", variant="secondary", size="lg", elem_id="zi-cancel", scale=1)
                cancel_note = gr.Markdown("", elem_id="zi-cancel-note")

                with gr.Group(elem_classes=["zi-card-group"]):
                    aspect = gr.Radio(
                        [ratio_label(r) for r in ASPECT_RATIOS] + [CUSTOM],
                        value=aspect0,
                        label="Aspect ratio",
                        elem_id="zi-aspect",
                    )
                    tier = gr.Radio(
                        list(studio.tiers),
                        value=tier0 if tier0 is not None else w0,
                        label="Resolution (about N×N pixels)",
                        elem_id="zi-tier",
                    )
                    with gr.Row():
                        width = gr.Number(value=w0, label="Width", precision=0, step=16, elem_id="zi-width")
                        height = gr.Number(value=h0, label="Height", precision=0, step=16, elem_id="zi-height")
                    size_md = gr.Markdown(size_note(w0, h0), elem_classes=["zi-size-note"])

                with gr.Group(elem_classes=["zi-card-group"]):
                    seed = gr.Number(
                        value=-1,
                        label="Seed",
                        info="-1 picks a random seed; the seed actually used is shown with the result.",
                        precision=0,
                        minimum=-1,
                        maximum=SEED_MAX,
                        elem_id="zi-seed",
                    )
                    with gr.Row(elem_id="zi-seed-buttons"):
                        random_btn = gr.Button("Random (-1)", size="sm", elem_id="zi-seed-random")
                        reuse_btn = gr.Button("♻ Reuse last", size="sm", elem_id="zi-seed-reuse")
                    steps = gr.Slider(
                        1,
                        settings.max_steps,
                        value=settings.default_steps,
                        step=1,
                        precision=0,
                        label="Steps",
                        info=f"Z-Image-Turbo is distilled for {preset.default_steps} steps.",
                        elem_id="zi-steps",
                    )
                    guidance = gr.Slider(
                        0.0,
                        GUIDANCE_MAX,
                        value=0.0,
                        step=0.5,
                        label="Guidance",
                        info="0 = off, the Turbo default. Above 0 the negative prompt is used.",
                        elem_id="zi-guidance",
                    )
                    count = gr.Slider(
                        1,
                        settings.max_count,
                        value=1,
                        step=1,
                        precision=0,
                        label="Images",
                        info="Seeds s, s+1, … (image i equals a single run with seed s+i).",
                        elem_id="zi-count",
                    )

            # ---------------- results, history, parameters
            with gr.Column(scale=6, min_width=420, elem_id="zi-output"):
                with gr.Tabs(elem_id="zi-tabs"):
                    with gr.Tab("Result", id="result"):
                        gallery = gr.Gallery(
                            label="Result",
                            show_label=False,
                            columns=2,
                            height=500,
                            object_fit="contain",
                            buttons=["download", "fullscreen"],
                            elem_id="zi-gallery",
                            preview=True,
                        )
                        summary = gr.Markdown("", elem_id="zi-summary")
                        download = gr.File(
                            label="Download PNG (parameters embedded)",
                            file_count="multiple",
                            visible=False,
                            elem_id="zi-download",
                        )
                        with gr.Accordion("Details (JSON)", open=False):
                            details = gr.JSON(label="Details", elem_id="zi-details")
                    with gr.Tab("History", id="history") as history_tab:
                        with gr.Row(equal_height=True):
                            gr.Markdown(
                                f"Saved outputs, newest first. Select one to see its parameters. {studio.space_note()}",
                                elem_classes=["zi-hint"],
                            )
                            refresh_btn = gr.Button("↻ Refresh", size="sm", scale=0, min_width=110)
                        history = gr.Gallery(
                            label="History",
                            show_label=False,
                            columns=5,
                            height=460,
                            object_fit="cover",
                            buttons=["download", "fullscreen"],
                            elem_id="zi-history",
                        )
                    with gr.Tab("Load a PNG", id="load"):
                        dropped = gr.File(
                            label="Drop a PNG made by zimage here to load its settings",
                            file_types=[".png"],
                            type="filepath",
                            height=180,
                            elem_id="zi-drop",
                        )
                with gr.Group(elem_id="zi-params"):
                    params_md = gr.Markdown(
                        "Select an image (result or history) to see its parameters.", elem_id="zi-params-md"
                    )
                    with gr.Row(elem_id="zi-params-actions"):
                        use_btn = gr.Button("Use these settings", size="sm", scale=0, min_width=170, elem_id="zi-use")

                if examples:
                    gr.Examples(
                        examples=[[e["prompt"]] for e in examples],
                        inputs=[prompt],
                        label="Example prompts · 示例",
                        examples_per_page=10,
                        elem_id="zi-examples",
                    )

            # ---------------- the live profiler
            with gr.Column(scale=3, min_width=290, elem_id="zi-side"):
                gr.HTML('<div class="zi-side-title">Live profiler</div>', elem_id="zi-side-head")
                profiler = gr.HTML(render_profiler(engine.status()), elem_id="zi-profiler")

        inputs = _Inputs(prompt, negative, width, height, steps, guidance, seed, count)
        form_outputs = [*inputs.as_list(), aspect, tier]

        # one job per replica at a time across every listener: one concurrency group, and the pool behind it
        gen_event = gr.on(
            triggers=[generate_btn.click, prompt.submit],
            fn=studio.generate,
            inputs=inputs.as_list(),
            outputs=[gallery, details],
            api_name="generate",
            api_description=API_DESCRIPTION,
            concurrency_id=GPU_QUEUE,
            concurrency_limit=engine.concurrency,
            show_progress="full",
            show_progress_on=[gallery],
            # raw values reach the engine, whose validation names the field, the value and what is
            # allowed (Gradio's own bounds check says only "Value 100 is greater than maximum value 8")
            preprocess=False,
        )
        gen_event.success(
            studio.after_generate,
            inputs=[details],
            outputs=[last_seed, summary, download, cancel_note],
            queue=False,
            api_visibility="private",
        )
        cancel_btn.click(
            studio.cancel,
            outputs=[cancel_note],
            cancels=[gen_event],
            queue=False,
            api_name="cancel",
            api_description="Cancel the job of this session (client); other sessions' jobs go on.",
        )

        aspect.input(
            studio.pick_preset, [aspect, tier], [width, height, size_md], queue=False, api_visibility="private"
        )
        tier.input(studio.pick_preset, [aspect, tier], [width, height, size_md], queue=False, api_visibility="private")
        for box in (width, height):
            box.input(studio.custom_size, [width, height], [aspect, size_md], queue=False, api_visibility="private")
        guidance.change(studio.negative_state, [guidance], [negative], queue=False, api_visibility="private")
        random_btn.click(lambda: -1, outputs=[seed], queue=False, api_visibility="private")
        reuse_btn.click(lambda s: s, inputs=[last_seed], outputs=[seed], queue=False, api_visibility="private")

        for g in (gallery, history):
            g.select(
                studio.select_image,
                outputs=[selected_params, params_md],
                queue=False,
                api_visibility="private",
            )
        use_btn.click(studio.use_settings, [selected_params], form_outputs, queue=False, api_visibility="private")
        dropped.upload(
            studio.load_png,
            [dropped],
            [selected_params, params_md, *form_outputs],
            queue=False,
            api_visibility="private",
        )
        # Read from disk when looked at (Gradio hashes and copies every file it shows into its
        # cache, so the history is not refreshed after every run nobody is watching).
        for trigger in (history_tab.select, refresh_btn.click):
            trigger(studio.history, outputs=[history], queue=False, api_visibility="private")

        # live panel: queue=False so it answers while the GPU is busy
        timer = gr.Timer(1.0)
        timer.tick(
            studio.tick, outputs=[profiler, banner], queue=False, show_progress="hidden", api_visibility="private"
        )
        demo.load(
            studio.tick, outputs=[profiler, banner], queue=False, show_progress="hidden", api_visibility="private"
        )

    demo.queue(max_size=settings.queue_size, api_open=False, default_concurrency_limit=1)
    return demo


def _neg_kwargs(update: dict[str, Any]) -> dict[str, Any]:
    """Initial Textbox kwargs from a gr.update dict (so the first render matches later updates)."""
    return {k: v for k, v in update.items() if k in ("interactive", "info", "elem_classes")}
