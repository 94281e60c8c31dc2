"""The form: its values as Gradio sends them (`FormValues`, in the API's argument order), and the
small handlers that keep it consistent while one types (size presets, the negative prompt's state,
the prompt's length in tokens). Studio (handlers.py) mixes `FormHandlers` in."""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Any

import gradio as gr

from zimage.model.presets import ASPECT_RATIOS
from zimage.service.request import GUIDANCE_MAX, GenerationRequest
from zimage.web import toolbox
from zimage.web.guard import Refused
from zimage.web.i18n import lang_of, t
from zimage.web.panels import render_tokens
from zimage.web.sizes import CUSTOM, preset_size, ratio_label, size_note

TOKEN_LIMIT = 512  # the text encoder reads this many tokens (the pipeline's max_sequence_length)
ASPECT_LABELS = tuple(ratio_label(r) for r in ASPECT_RATIOS)


@dataclass(frozen=True)
class FormValues:
    """The form's values as Gradio sends them (raw: the engine validates), in the API's argument order.
    None (an argument left out) means the model preset's default."""

    prompt: Any = ""
    negative_prompt: Any = ""
    width: Any = None
    height: Any = None
    steps: Any = None
    guidance: Any = 0.0
    seed: Any = -1
    count: Any = 1
    shift: Any = None
    tools: tuple = ()  # image to image, inpainting, LoRAs: raw, in the API's order (web/toolbox.py)

    def request(
        self, user: str, defaults: tuple[int, int, int], owner: str = "", check: Any = None
    ) -> GenerationRequest:
        """The service request; `check(path)` refuses a file the asker may not use (guard.py's rule)."""
        w, h, steps = defaults
        req = GenerationRequest(
            prompt=self.prompt if self.prompt is not None else "",
            negative_prompt=self.negative_prompt or "",
            width=_number(self.width, w),
            height=_number(self.height, h),
            steps=_number(self.steps, steps),
            guidance=self.guidance if self.guidance is not None else 0.0,
            seed=_number(self.seed, -1),
            count=_number(self.count, 1),
            shift=self.shift if self.shift not in (None, "") else None,
            user=user,
            owner=owner,
        )
        if any(v not in (None, "", [], ()) for v in self.tools):
            req = replace(req, **toolbox.request_fields(*self.tools, may_read=check or _no_files))
        return req


def _no_files(path: str) -> bool:
    return False


class FormHandlers:
    """The form's own small handlers (mixed into Studio: uses self.engine, self.settings, self.tiers)."""

    engine: Any
    settings: Any
    tiers: tuple[int, ...]
    _tokenizer: Any
    _tokenizer_lock: threading.Lock

    def count_tokens(self, prompt: Any) -> int | None:
        """Tokens the text encoder would see (with the chat template), None before the model is loaded.
        Uses its own copy of the tokenizer: a fast tokenizer must not be shared across threads."""
        pipe = self.engine.pipe
        if pipe is None or not isinstance(prompt, str):
            return None
        with self._tokenizer_lock:
            if self._tokenizer is None:
                import copy

                self._tokenizer = copy.deepcopy(pipe.tokenizer)
            tok = self._tokenizer
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
            )
            return len(tok(text, padding=False, truncation=False)["input_ids"])

    def tokens(self, prompt: Any, request: gr.Request = None) -> str:
        return render_tokens(self.count_tokens(prompt), TOKEN_LIMIT, lang_of(request))

    # --- small form helpers ---------------------------------------------------------------

    def pick_preset(self, aspect: str, tier: Any):
        if aspect == CUSTOM or tier is None:
            return gr.update(), gr.update(), gr.update()
        if aspect not in ASPECT_LABELS:
            raise Refused(f"Aspect ratio must be one of {', '.join(ASPECT_LABELS)} or {CUSTOM} (got {_short(aspect)}).")
        if _whole(tier) not in self.tiers:
            raise Refused(f"Resolution must be one of {', '.join(map(str, self.tiers))} (got {_short(tier)}).")
        w, h, note = preset_size(aspect, _whole(tier), self.settings.min_size, self.settings.max_size)
        return w, h, size_note(w, h, note)

    def custom_size(self, width: Any, height: Any):
        w, h = _whole(width), _whole(height)
        return CUSTOM, size_note(w, h) if w is not None and h is not None else ""

    @staticmethod
    def negative_state(guidance: float, request: gr.Request = None):
        lang = lang_of(request)
        try:
            guidance = float(guidance or 0.0)
        except (TypeError, ValueError, OverflowError):
            raise Refused(f"Guidance must be a number from 0 to {GUIDANCE_MAX:g} (got {_short(guidance)}).") from None
        if guidance > 0:
            return gr.update(
                interactive=True,
                info=t(lang, "negative_in_use", g=f"{float(guidance):g}"),
                elem_classes=["zi-negative"],
            )
        return gr.update(
            interactive=False,
            info=t(lang, "negative_inactive"),
            elem_classes=["zi-negative", "zi-inactive"],
        )


def _whole(value: Any) -> int | None:
    """A whole number from a widget value, or None (junk, infinities, booleans)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return int(number) if number == number and abs(number) < 1e9 and number.is_integer() else None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value: Any, default: int | None = None) -> Any:
    """Whole numbers from Gradio widgets (which may send floats) stay exact; the engine validates the rest."""
    if value is None or value == "":
        return default if default is not None else value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
