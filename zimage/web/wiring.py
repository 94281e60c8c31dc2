"""The page's small events: form consistency (sizes, seed buttons, the negative prompt, the token
count) and the images (select, use settings, the PNG loader, history, delete), wired off the queue.
build_ui (page.py) declares the widgets and calls these."""

from __future__ import annotations

from typing import Any

import gradio as gr

from zimage.web import toolbox
from zimage.web.i18n import t, tr


def _whole_slider(lo: int, hi: int, value: int, label: str, info: str, elem_id: str) -> gr.Slider | gr.Number:
    """A slider of whole numbers; a fixed, read-only number when the settings leave one choice
    (max_count 1, max_steps 1): Gradio refuses a slider whose minimum equals its maximum."""
    if lo >= hi:
        text = t("en", info.key) if hasattr(info, "key") else str(info)  # a rare setting: said in English
        return gr.Number(
            value=lo,
            precision=0,
            interactive=False,
            label=label,
            info=f"{text} This server allows only {lo}.",
            elem_id=elem_id,
        )
    return gr.Slider(lo, hi, value=value, step=1, precision=0, label=label, info=info, elem_id=elem_id)


def _wire_form(studio, inputs, aspect, tier, size_md, last_seed, random_btn, reuse_btn, tokens) -> None:
    private = {"queue": False, "api_visibility": "private"}
    width, height = inputs.width, inputs.height
    aspect.input(studio.pick_preset, [aspect, tier], [width, height, size_md], **private)
    tier.input(studio.pick_preset, [aspect, tier], [width, height, size_md], **private)
    for box in (width, height):
        box.input(studio.custom_size, [width, height], [aspect, size_md], **private)
    inputs.guidance.change(studio.negative_state, [inputs.guidance], [inputs.negative], **private)
    random_btn.click(lambda: -1, outputs=[inputs.seed], **private)
    reuse_btn.click(lambda s: s, inputs=[last_seed], outputs=[inputs.seed], **private)
    # the prompt's length in tokens, counted on the server with the model's tokenizer (one at a time)
    inputs.prompt.change(
        studio.tokens, [inputs.prompt], [tokens], trigger_mode="always_last", show_progress="hidden", **private
    )


def _wire_images(
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
    tools: toolbox.Toolbox,
) -> None:
    private = {"queue": False, "api_visibility": "private"}
    for g in (gallery, history):
        g.select(studio.select_image, outputs=[selected_params, params_md], **private)
    # "Use these settings" and a dropped PNG fill the form, then the toolbox (strength, feather,
    # outpainting, the LoRAs that are here; a note for the rest)
    use_btn.click(studio.use_settings, [selected_params], form, **private).then(
        studio.restore_tools, [selected_params], tools.restored, **private
    )
    dropped.upload(studio.load_png, [dropped], [selected_params, params_md, dropped_image, *form], **private).then(
        studio.restore_tools, [selected_params], tools.restored, **private
    )
    history_outputs = [history, history_line, history_shown, more_btn]
    # Read from disk when looked at (Gradio hashes and copies every file it shows into its cache):
    # on opening the tab, a search, "load more", and after your own run while the tab is open.
    reset = gr.State(0)
    history_tab.select(
        studio.history, [search, reset], history_outputs, js="() => { window.ziHistoryOpen = true; }", **private
    )
    for trigger in (refresh_btn.click, search.submit):
        trigger(studio.history, [search, reset], history_outputs, **private)
    more_btn.click(studio.more_history, [search, history_shown], history_outputs, **private)
    # asked once, in the browser; the answer travels as a value of its own (a State cannot be
    # changed by the browser)
    answer = gr.Textbox(visible=False, elem_id="zi-delete-answer")
    delete_btn.click(
        studio.delete_image,
        [selected_params, search, history_shown, answer],
        [selected_params, params_md, *history_outputs],
        js="(p, q, n, a) => [p, q, n, window.ziConfirmDelete && window.ziConfirmDelete() ? 'yes' : 'no']",
        **private,
    )


def _neg_kwargs(update: dict[str, Any]) -> dict[str, Any]:
    """Initial Textbox kwargs from a gr.update dict (so the first render matches later updates), the
    info in the browser's language."""
    kwargs = {k: v for k, v in update.items() if k in ("interactive", "elem_classes")}
    kwargs["info"] = tr("negative_inactive")
    return kwargs
