"""The page's "Image to image / Inpaint" and "LoRAs" areas, and the one function that turns their
raw values (page or API) into request fields. page.py calls `build` inside the form column and
appends `Toolbox.inputs` to the generate event's inputs, after the text-to-image ones, so positional
API calls with the first nine arguments keep working.

API arguments (all optional, after shift): image (the source picture file), mask (a mask file,
white = repaint), strength (0.6; above 0, at most 1), feather (pixels of mask-edge blur),
outpaint_sides (list of left/top/right/bottom), outpaint_px (pixels added on each chosen side), loras
("name.safetensors:0.8, other.safetensors"). `request_fields` also reads an ImageEditor value
({"background": file, "layers": [painted files]}: painted strokes = the mask): the page's Generate
joins its source with the strokes of the "paint the mask" editor (`with_painting`).

Every file named here passes guard.py's rule for the asker (`may_read`): their own uploads and
images only, refused with a sentence otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from zimage.errors import InvalidRequest
from zimage.service.sources import FEATHER_MAX, SIDES
from zimage.web.i18n import lang_of, t, tr

API_NOTE = (
    " Image to image and inpainting (optional, after shift): image (the source picture file), mask (a "
    "mask file, white = repaint), "
    "strength (above 0, at most 1; about strength x steps steps run), feather (pixels), outpaint_sides "
    "(left/top/right/bottom), outpaint_px; width and height 0 take the source's size. loras: "
    "'name.safetensors:weight, ...' from the server's LoRA folder. The details then carry mode, "
    "strength, source_sha256, mask and each LoRA's name, weight and sha256."
)
RELOADED = 8  # values a reload puts back: Toolbox.reload_outputs


@dataclass
class Toolbox:
    source: gr.Image
    mask: gr.Image
    strength: gr.Slider
    feather: gr.Slider
    sides: gr.CheckboxGroup
    pad: gr.Number
    loras: gr.Textbox
    pick: gr.Dropdown
    use_result: gr.Button
    note: gr.Markdown
    source_size: gr.Checkbox
    lora_note: gr.Markdown
    api_image: gr.Image  # hidden: the API's image is a plain picture file (the editor's value is a dict)
    paint: gr.ImageMask  # the source again, to paint the mask on (read by the page's Generate only)

    @property
    def inputs(self) -> list[Any]:
        """Appended to the API generate event's inputs, in the API's order."""
        return [self.api_image, self.mask, self.strength, self.feather, self.sides, self.pad, self.loras]

    @property
    def page_inputs(self) -> list[Any]:
        """The page's Generate: the editor (source and painted mask), the API's other six, then
        "output at the source's size"."""
        return [self.source, *self.inputs[1:], self.source_size, self.paint]

    @property
    def reload_outputs(self) -> list[Any]:
        """What a reload puts back (`reload`): not the painted strokes."""
        return [self.source, *self.inputs[1:], self.source_size]

    @property
    def restored(self) -> list[Any]:
        """What a PNG's parameters fill (`restore`)."""
        return [self.strength, self.feather, self.sides, self.pad, self.loras, self.note]


def build(engine: Any) -> Toolbox:
    """Declare the widgets (inside the caller's layout) and wire their own small events."""
    private = {"queue": False, "api_visibility": "private"}
    with gr.Accordion(tr("tb_title"), open=False, elem_id="zi-toolbox"):
        # The source is a plain picture; the mask is painted on a copy of it in its own editor, which
        # only Generate reads. Gradio's editor sends its layers again on every page update while it
        # holds strokes; the upload quota lets such repeats through (web/limits.py).
        source = gr.Image(
            label=tr("tb_source"), type="filepath", sources=["upload", "clipboard"], height=320, elem_id="zi-source"
        )
        use_result = gr.Button(tr("tb_use_result"), size="sm", elem_id="zi-use-result")
        paint = gr.ImageMask(
            label=tr("tb_paint"),
            type="filepath",
            sources=[],
            transforms=(),
            brush=gr.Brush(default_size=24, colors=["#ffffff"], color_mode="fixed"),
            height=320,
            elem_id="zi-paint",
        )
        mask = gr.Image(
            label=tr("tb_mask"), type="filepath", sources=["upload", "clipboard"], height=160, elem_id="zi-mask"
        )
        with gr.Row():
            strength = gr.Slider(
                0.05,
                1.0,
                value=0.6,
                step=0.05,
                label=tr("tb_strength"),
                info=tr("tb_strength_info"),
                elem_id="zi-strength",
            )
            feather = gr.Slider(
                0, 64, value=8, step=1, label=tr("tb_feather"), info=tr("tb_feather_info"), elem_id="zi-feather"
            )
        with gr.Row():
            sides = gr.CheckboxGroup(list(SIDES), label=tr("tb_outpaint"), elem_id="zi-outpaint")
            pad = gr.Number(value=256, precision=0, minimum=0, label=tr("tb_outpaint_px"), elem_id="zi-outpaint-px")
        source_size = gr.Checkbox(value=True, label=tr("tb_source_size"), elem_id="zi-source-size")
        note = gr.Markdown("", elem_id="zi-toolbox-note")
    with gr.Accordion(tr("tb_loras"), open=False, elem_id="zi-loras"):
        pick = gr.Dropdown(
            choices=engine.loras.names(),
            multiselect=True,
            label=tr("tb_lora_pick"),
            info=str(engine.loras.folder),
            elem_id="zi-lora-pick",
        )
        loras = gr.Textbox(
            value="",
            label=tr("tb_lora_weights"),
            placeholder="style.safetensors:0.8, detail.safetensors:0.5",
            info=tr("tb_lora_weights_info"),
            elem_id="zi-lora-weights",
        )
        lora_note = gr.Markdown(lora_note_md(engine), elem_id="zi-lora-note")
    api_image = gr.Image(type="filepath", visible=False, elem_id="zi-api-image")
    tools = Toolbox(
        source,
        mask,
        strength,
        feather,
        sides,
        pad,
        loras,
        pick,
        use_result,
        note,
        source_size,
        lora_note,
        api_image,
        paint,
    )

    def refresh(request: gr.Request = None):
        return gr.update(choices=engine.loras.names()), lora_note_md(engine, lang_of(request))

    pick.focus(refresh, outputs=[pick, lora_note], **private)
    pick.input(_with_picked, [pick, loras], [loras], **private)
    return tools


def wire(tools: Toolbox, gallery: Any, steps: Any, files_of: Any) -> None:
    """ "Use this result" (the first picture of the last result becomes the source), and the note
    that says what the toolbox's settings do for the case at hand. `files_of(request)` is the asker's
    path rule (Studio._files_of)."""
    private = {"queue": False, "api_visibility": "private"}

    def note(source, mask, strength, feather, sides, pad, size, n, request: gr.Request = None):
        return explain(source, mask, strength, feather, sides, pad, size, n, lang_of(request), files_of(request))

    watched = [tools.source, tools.mask, tools.strength, tools.feather, tools.sides, tools.pad, tools.source_size]
    watched.append(steps)
    explained = {"fn": note, "inputs": watched, "outputs": [tools.note], "preprocess": False}
    tools.use_result.click(_use_result, [gallery], [tools.source], **private).then(
        **explained, show_progress="hidden", **private
    ).then(_to_paint, [tools.source], [tools.paint], show_progress="hidden", **private)
    gr.on(
        [tools.source.upload, tools.source.clear],
        _to_paint,
        [tools.source],
        [tools.paint],
        show_progress="hidden",
        **private,
    )
    # the picture reports an upload or a clear (not a value the server set: "use this result" says it)
    triggers = [tools.source.upload, tools.source.clear]
    triggers += [w.change for w in watched[1:]]
    gr.on(triggers, **explained, trigger_mode="always_last", show_progress="hidden", **private)


def _to_paint(source: Any) -> Any:
    return {"background": source, "layers": [], "composite": source} if source else None


def with_painting(source: Any, paint: Any) -> Any:
    """The page's source with the strokes painted in the editor (an editor value `request_fields`
    reads as the mask); the source alone when nothing is painted."""
    layers = (paint or {}).get("layers") if isinstance(paint, dict) else None
    if not source or not layers:
        return source
    return {"background": source, "layers": layers}


def _use_result(gallery: Any):
    first = (gallery or [None])[0]
    path = first[0] if isinstance(first, (list, tuple)) else getattr(first, "image", first)
    path = getattr(path, "path", path)
    if not path:
        raise gr.Error("There is no result yet: generate a picture first.", print_exception=False)
    return path


def _with_picked(picked: list[str] | None, text: str) -> str:
    """Keep the weights already typed for the LoRAs still picked; new ones start at 1."""
    current = dict(parse_loras(text or ""))
    return ", ".join(f"{name}:{current.get(name, 1)}" for name in picked or [])


def parse_loras(text: Any) -> list[tuple[str, Any]]:
    """'a.safetensors:0.8, b' -> [("a.safetensors", "0.8"), ("b", 1.0)] (the engine checks the values)."""
    if not text:
        return []
    if isinstance(text, (list, tuple)):  # an API caller may send [[name, weight], ...]
        return [tuple(p) if isinstance(p, (list, tuple)) else (str(p), 1.0) for p in text]
    out = []
    for part in str(text).replace(";", ",").split(","):
        part = part.strip()
        if part:
            name, sep, weight = part.rpartition(":")
            out.append((name.strip(), weight.strip()) if sep else (part, 1.0))
    return out


def _path(value: Any, may_read, what: str = "source image") -> str | None:
    """A file path from a raw Gradio payload (FileData dict, path text) that the asker may use:
    `may_read(path)` answers False or raises (guard.Refused, a sentence) for any other file."""
    if value is None or value == "":
        return None
    path = value.get("path") if isinstance(value, dict) else getattr(value, "path", value)
    if not path:
        return None
    if not isinstance(path, (str, Path)):
        raise InvalidRequest(what, type(path).__name__, "a picture uploaded to this studio")
    allowed = may_read(str(path))
    if not allowed:
        raise InvalidRequest(what, Path(str(path)).name, "a picture uploaded to this studio")
    return str(allowed) if isinstance(allowed, (str, Path)) else str(path)


def _editor(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) and ("background" in value or "layers" in value) else None


def has_source(source: Any) -> bool:
    """Whether a raw source value names a picture (the API's file or the editor's background)."""
    editor = _editor(source)
    value = editor.get("background") if editor else source
    if isinstance(value, dict):
        value = value.get("path")
    return bool(value)


def painted_mask(editor: dict[str, Any] | None, may_read) -> Any:
    """The painted strokes of an ImageEditor value as one "L" mask (their alpha), None when nothing
    is painted."""
    from PIL import Image

    merged = None
    for layer in (editor or {}).get("layers") or []:
        layer_path = _path(layer, may_read, "mask")
        if layer_path is None:
            continue
        alpha = Image.open(layer_path).convert("RGBA").getchannel("A")
        merged = alpha if merged is None else Image.fromarray(_max(merged, alpha))
    return merged if merged is not None and merged.getextrema()[1] > 0 else None


def request_fields(
    source: Any, mask: Any, strength: Any, feather: Any, sides: Any, pad: Any, loras: Any, may_read
) -> dict[str, Any]:
    """GenerationRequest fields from the toolbox's raw values; {} when none is used."""
    fields: dict[str, Any] = {}
    if loras:
        fields["loras"] = tuple(parse_loras(loras))
    editor = _editor(source)
    background = _path(editor.get("background") if editor else source, may_read)
    if background is None:
        if _path(mask, may_read, "mask") is not None:  # checked even when unused: no file slips by
            fields["mask"] = "given"  # the engine refuses a mask without a source, in a sentence
        return fields
    fields.update(image=background, strength=strength if strength not in (None, "") else None)
    fields["feather"] = feather if feather not in (None, "") else 0
    mask_path = _path(mask, may_read, "mask")
    if mask_path is not None:
        fields["mask"] = mask_path
    else:
        painted = painted_mask(editor, may_read)
        if painted is not None:
            fields["mask"] = painted
    chosen = [s for s in (sides or []) if s in SIDES]
    if chosen:
        amount = pad if pad not in (None, "") else 0
        fields["outpaint"] = tuple(amount if side in chosen else 0 for side in SIDES)
    return fields


def _max(a: Any, b: Any) -> Any:
    import numpy as np

    return np.maximum(np.asarray(a), np.asarray(b.resize(a.size)))


# ------------------------------------------------------------------------------------------
# honest notes


def explain(
    source: Any,
    mask: Any,
    strength: Any,
    feather: Any,
    sides: Any,
    pad: Any,
    source_size: Any,
    steps: Any,
    lang: str = "en",
    may_read: Any = None,
) -> str:
    """What the toolbox's settings do for the case at hand, and what they do not."""
    chosen = [s for s in (sides or []) if s in SIDES]
    has_mask = bool(mask) and bool(mask.get("path") if isinstance(mask, dict) else mask)
    if not has_source(source):
        return t(lang, "tb_no_source") if (has_mask or chosen) else ""
    if not has_mask and may_read is not None:
        try:
            has_mask = painted_mask(_editor(source), may_read) is not None
        except (gr.Error, InvalidRequest, OSError, ValueError):
            has_mask = False
    lines = []
    try:
        s, n = float(strength), int(steps)
        lines.append(t(lang, "tb_steps_run", n=min(n, max(1, math.ceil(s * n))), total=n, s=f"{s:g}"))
    except (TypeError, ValueError, OverflowError):
        pass
    if has_mask or chosen:
        lines.append(t(lang, "tb_inpaint"))
    else:
        lines.append(t(lang, "tb_img2img"))
    if chosen:
        lines.append(t(lang, "tb_outpaint_note", px=pad, sides=", ".join(chosen)))
    lines.append(t(lang, "tb_size_source" if source_size else "tb_size_fields"))
    return "\n".join(f"- {line}" for line in lines)


def lora_note_md(engine: Any, lang: str = "en") -> str:
    """How LoRAs are applied on this server, and what weight 0 does (honest about the mode)."""
    lib = engine.loras
    lines = []
    if not lib.names():
        lines.append(t(lang, "tb_lora_none", folder=lib.folder))
    if not lib.attached and lib.requested_mode == "auto":  # the replicas settle it (compile on or off)
        lines.append(t(lang, "tb_lora_auto", rank=lib.max_rank, n=lib.cache_size))
    elif lib.mode == "hotswap":
        lines.append(t(lang, "tb_lora_hotswap", rank=lib.max_rank))
    else:
        lines.append(t(lang, "tb_lora_adapters", n=lib.cache_size))
    lines.append(t(lang, "tb_lora_zero"))
    return "\n".join(f"- {line}" for line in lines)


def summary_line(details: dict[str, Any], lang: str = "en") -> str:
    """The toolbox part of a result's summary: mode, strength, source hash, mask, LoRAs."""
    parts = []
    if details.get("source_sha256"):
        parts.append(
            t(
                lang,
                "tb_sum_source",
                mode=details.get("mode", "img2img"),
                s=f"{details.get('strength', 0):g}",
                sha=str(details["source_sha256"])[:12],
                mask=t(lang, "tb_yes" if details.get("mask") else "tb_no"),
            )
        )
    loras = details.get("loras") or []
    if loras:
        text = ", ".join(f"{e.get('name')} ×{e.get('weight', 1):g} ({str(e.get('sha256', ''))[:12]}…)" for e in loras)
        parts.append(f"{t(lang, 'tb_sum_loras')} {text}")
    return "".join(f"  \n{p}" for p in parts)


# ------------------------------------------------------------------------------------------
# putting values back


def restore(engine: Any, params: dict[str, Any], lang: str = "en") -> list[Any]:
    """The toolbox part of "Use these settings" and the PNG loader: strength, feather, outpainting
    and the LoRAs that are here (the source picture itself is not stored: its hash says which one
    it was)."""
    if not params or not isinstance(params, dict):
        return [gr.update()] * 6
    notes = []
    found, lora_notes = engine.loras.restore(params.get("loras"))
    notes += lora_notes
    if params.get("source_sha256"):
        notes.append(
            t(
                lang,
                "tb_restored_source",
                sha=str(params["source_sha256"])[:12],
                mask=t(lang, "tb_with_mask" if params.get("mask") else "tb_without_mask"),
            )
        )
    pads = params.get("outpaint") or [0, 0, 0, 0]
    sides = [side for side, n in zip(SIDES, pads) if n]
    return [
        params.get("strength") or gr.update(),
        min(int(params.get("feather") or 0), FEATHER_MAX) if "feather" in params else gr.update(),
        sides if "outpaint" in params else gr.update(),
        max(pads) if sides else gr.update(),
        ", ".join(f"{n}:{w:g}" for n, w in found),
        "\n".join(f"- {n}" for n in notes),
    ]


def reload(form: dict[str, Any], may_read: Any) -> list[Any]:
    """After a reload: the toolbox as the last run had it (Toolbox.reload_outputs). The source and
    mask come back only while they are still the asker's files (Gradio's cache is swept)."""
    keep = gr.update()
    tools = list((form or {}).get("tools") or ())
    if not tools:
        return [keep] * RELOADED
    source, mask, strength, feather, sides, pad, loras = (tools + [None] * 7)[:7]

    def usable(value: Any) -> str | None:
        try:
            return _path(value, may_read)
        except (gr.Error, InvalidRequest):
            return None

    editor = _editor(source)
    background = usable(editor.get("background") if editor else source)
    layers = [p for p in (usable(v) for v in (editor or {}).get("layers") or []) if p]
    back: Any = keep
    if background:
        back = {"background": background, "layers": layers, "composite": background} if editor else background
    mask_back = usable(mask) or keep
    return [
        back,
        mask_back,
        strength if strength not in (None, "") else keep,
        feather if feather not in (None, "") else keep,
        list(sides) if isinstance(sides, (list, tuple)) else keep,
        pad if pad not in (None, "") else keep,
        loras if isinstance(loras, str) else keep,
        bool(form.get("source_size", True)),
    ]
