"""History, the selected image's parameters, and the PNG loader: the handlers that read saved images.

Every path from the browser is checked (guard.py) before a byte is read; each user sees only their
own space. Studio (handlers.py) mixes `ImageHandlers` in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from zimage.errors import UnreadableImage
from zimage.service.pngmeta import clean_parameters, read_parameters, read_parameters_checked
from zimage.web import toolbox
from zimage.web.form import _whole
from zimage.web.guard import Refused
from zimage.web.i18n import lang_of, t
from zimage.web.panels import parameters_markdown
from zimage.web.sizes import CUSTOM, match_preset


class ImageHandlers:
    """History, select, delete, load a PNG, use its settings (uses self.history_view, self.access,
    self.settings, self.tiers and Studio's _space)."""

    engine: Any
    history_view: Any
    settings: Any
    tiers: tuple[int, ...]

    def history(self, query: str = "", shown: int = 0, request: gr.Request = None):
        """(gallery items, count line, how many shown, load-more button) for this user."""
        lang = lang_of(request)
        return self.history_view.page(query, shown, self._space(request), lang)

    def history_if_open(self, query: str, shown: int, is_open: bool, request: gr.Request = None):
        if not is_open:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return self.history(query, shown, request)

    def more_history(self, query: str, shown: int, request: gr.Request = None):
        lang = lang_of(request)
        return self.history_view.page(query, shown, self._space(request), lang, more=True)

    def delete_image(
        self, params: dict[str, Any], query: str, shown: int, confirmed: str = "", request: gr.Request = None
    ):
        """Delete the selected image once the page asked and the answer was yes; its path was checked
        when it was selected, and only a file of the asker's own space is deleted."""
        lang = lang_of(request)
        space = self._space(request)
        path = (params or {}).get("_path") if isinstance(params, dict) else None
        if confirmed != "yes":  # the answer was no: the parameters stay shown, and say so
            shown = parameters_markdown(params, Path(path).name, lang) if path else ""
            return (gr.skip(), f"{shown}  \n{t(lang, 'delete_kept')}", gr.skip(), gr.skip(), gr.skip(), gr.skip())
        if not path:
            note = t(lang, "delete_nothing")
        elif self.history_view.delete(path, space):
            note = t(lang, "deleted", name=Path(path).name)
        else:
            note = t(lang, "delete_refused")
        items = self.history_view.page(query, max(shown, 1), space, lang)
        return ({}, note, *items)

    def select_image(self, evt: gr.SelectData, request: gr.Request = None):
        lang = lang_of(request)
        value = evt.value if isinstance(evt.value, dict) else {}
        image = value.get("image")
        path = image.get("path") if isinstance(image, dict) else None
        if not path or not isinstance(path, str):
            return {}, t(lang, "select_an_image")
        try:  # the path comes from the browser: only the asker's own images and uploads
            real = self.access.check(path, self.access.viewer(request))
        except Refused:
            return {}, t(lang, "not_ours")
        try:
            params = read_parameters(real)
        except (UnreadableImage, OSError):
            params = {}
        return {**params, "_path": str(real)}, parameters_markdown(params, real.name, lang)

    def load_png(self, file: Any, request: gr.Request = None):
        """A PNG dropped on the page: the image, its parameters (ours or A1111-style), and the form
        filled with them. The file is an upload of this session (guard.py refused anything else
        before this runs); its chunks are read without decoding a pixel, and every field is checked."""
        lang = lang_of(request)
        path = getattr(file, "name", file)
        no_change = [gr.update()] * 11
        hidden = gr.update(value=None, visible=False)
        if not path:
            return [{}, "", hidden, *no_change]
        if not isinstance(path, (str, Path)):
            raise Refused("Drop a PNG file (from zimage, AUTOMATIC1111, Forge...) to load its settings.")
        name = Path(str(path)).name
        try:
            params, dropped = read_parameters_checked(path)
        except UnreadableImage as exc:
            return [{}, f"{t(lang, 'not_a_png', name=name)} {exc}", hidden, *no_change]
        except OSError:
            return [{}, t(lang, "not_a_png", name=name), hidden, *no_change]
        shown = gr.update(value=str(path), visible=True)
        if not params:
            return [{}, t(lang, "no_parameters", name=name), shown, *no_change]
        note = f"  \n{t(lang, 'left_out', fields=', '.join(dropped))}" if dropped else ""
        return [params, parameters_markdown(params, name, lang) + note, shown, *self.use_settings(params)]

    def restore_tools(self, params: dict[str, Any], request: gr.Request = None):
        """The toolbox part of a selected or dropped image's parameters (toolbox.Toolbox.restored)."""
        return toolbox.restore(self.engine, params, lang_of(request))

    def use_settings(self, params: dict[str, Any], keep_count: bool = False):
        """Form values from a parameters dict: prompt, negative, width, height, steps, guidance, seed,
        count, shift, aspect, tier."""
        raw = params if isinstance(params, dict) else {}
        params = clean_parameters(raw)[0]
        for key in ("count", "shift"):  # the page's own form (a reload) keeps these as they were
            if key in raw and key not in params and keep_count:
                params[key] = raw[key]
        if not params:
            return [gr.update()] * 11
        keep = gr.update()
        w = _whole(params.get("width"))
        h = _whole(params.get("height"))
        aspect, tier = (
            match_preset(w, h, self.tiers, self.settings.min_size, self.settings.max_size)
            if w and h
            else (CUSTOM, None)
        )
        shift = params.get("shift")
        return [
            params.get("prompt", keep),
            params.get("negative_prompt", keep),
            w if w else keep,
            h if h else keep,
            params.get("steps", keep),
            params.get("guidance", keep),
            params.get("seed", keep),
            (params.get("count") or keep) if keep_count else 1,  # an image's own seed: one image
            shift if shift is not None else keep,
            aspect,
            tier if tier is not None else keep,
        ]
