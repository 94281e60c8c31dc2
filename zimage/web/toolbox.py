"""The page's "Image to image / Inpaint" and "LoRAs" areas, and the one function that turns their
raw values (page or API) into request fields. page.py calls `build` inside the form column and
appends `Toolbox.inputs` to the generate event's inputs, after the text-to-image ones, so positional
API calls with the first eight arguments keep working.

API arguments (all optional, after count): source (an ImageEditor value: {"background": file,
"layers": [painted files], "composite": file}; background = the source picture, painted strokes =
the mask), mask (a mask file, white = repaint; wins over painted strokes), strength (0.6; above 0,
at most 1), feather (pixels of mask-edge blur), outpaint_sides (list of left/top/right/bottom),
outpaint_px (pixels added on each chosen side), loras ("name.safetensors:0.8, other.safetensors").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from zimage.errors import InvalidRequest
from zimage.service.sources import FEATHER_MAX, SIDES

API_NOTE = (
    " Image to image and inpainting (optional, after count): source (ImageEditor value: background = "
    "the picture, painted layers = the mask), mask (a mask file, white = repaint), strength (above 0, "
    "at most 1; about strength x steps steps run), feather (pixels), outpaint_sides (left/top/right/"
    "bottom), outpaint_px; loras: 'name.safetensors:weight, ...' from the server's LoRA folder."
)


@dataclass
class Toolbox:
    source: gr.ImageEditor
    mask: gr.Image
    strength: gr.Slider
    feather: gr.Slider
    sides: gr.CheckboxGroup
    pad: gr.Number
    loras: gr.Textbox
    pick: gr.Dropdown
    use_result: gr.Button
    note: gr.Markdown

    @property
    def inputs(self) -> list[Any]:
        """Appended to the generate event's inputs, in the API's order."""
        return [self.source, self.mask, self.strength, self.feather, self.sides, self.pad, self.loras]

    @property
    def restored(self) -> list[Any]:
        return [self.strength, self.feather, self.sides, self.pad, self.loras, self.note]


def build(engine: Any) -> Toolbox:
    """Declare the widgets (inside the caller's layout) and wire their own small events."""
    with gr.Accordion("Image to image / Inpaint", open=False, elem_id="zi-toolbox"):
        source = gr.ImageEditor(
            label="Source picture (upload or paste; paint over what should change)",
            type="filepath",
            sources=["upload", "clipboard"],
            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=24),
            eraser=gr.Eraser(default_size=24),
            transforms=(),
            layers=False,
            height=320,
            elem_id="zi-source",
        )
        use_result = gr.Button("Use this result", size="sm", elem_id="zi-use-result")
        mask = gr.Image(
            label="Mask file (optional; white = repaint, wins over painted strokes)",
            type="filepath",
            sources=["upload", "clipboard"],
            height=160,
            elem_id="zi-mask",
        )
        with gr.Row():
            strength = gr.Slider(
                0.05, 1.0, value=0.6, step=0.05, label="Strength", info="About strength × steps steps run; 1 repaints."
            )
            feather = gr.Slider(0, 64, value=8, step=1, label="Feather (px)", info="Blur of the mask's edge.")
        with gr.Row():
            sides = gr.CheckboxGroup(list(SIDES), label="Outpaint: extend the canvas", elem_id="zi-outpaint")
            pad = gr.Number(value=256, precision=0, minimum=0, label="by (px)", elem_id="zi-outpaint-px")
        note = gr.Markdown("", elem_id="zi-toolbox-note")
    with gr.Accordion("LoRAs", open=False, elem_id="zi-loras"):
        pick = gr.Dropdown(
            choices=engine.loras.names(),
            multiselect=True,
            label=f"LoRA files in {engine.loras.folder}",
            elem_id="zi-lora-pick",
        )
        loras = gr.Textbox(
            value="",
            label="LoRAs and weights",
            placeholder="style.safetensors:0.8, detail.safetensors:0.5",
            info="Weight 1 when left out; 0 turns one off; -4 to 4.",
            elem_id="zi-lora-weights",
        )
    tools = Toolbox(source, mask, strength, feather, sides, pad, loras, pick, use_result, note)
    pick.focus(lambda: gr.update(choices=engine.loras.names()), outputs=[pick], queue=False, api_visibility="private")
    pick.input(_with_picked, [pick, loras], [loras], queue=False, api_visibility="private")
    return tools


def wire(tools: Toolbox, gallery: Any) -> None:
    """ "Use this result": the first picture of the last result becomes the source."""
    tools.use_result.click(_use_result, [gallery], [tools.source], queue=False, api_visibility="private")


def _use_result(gallery: Any):
    first = (gallery or [None])[0]
    path = first[0] if isinstance(first, (list, tuple)) else getattr(first, "image", first)
    path = getattr(path, "path", path)
    if not path:
        raise gr.Error("There is no result yet: generate a picture first.", print_exception=False)
    return {"background": path, "layers": [], "composite": path}


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


def _path(value: Any, may_read) -> str | None:
    """A file path from a raw Gradio payload (FileData dict, path text), only where uploads land."""
    if value is None or value == "":
        return None
    path = value.get("path") if isinstance(value, dict) else getattr(value, "path", value)
    if not path:
        return None
    if not may_read(str(path)):
        raise InvalidRequest("source image", Path(str(path)).name, "a picture uploaded to this studio")
    return str(path)


def request_fields(
    source: Any, mask: Any, strength: Any, feather: Any, sides: Any, pad: Any, loras: Any, may_read
) -> dict[str, Any]:
    """GenerationRequest fields from the toolbox's raw values; {} when none is used."""
    from PIL import Image

    fields: dict[str, Any] = {}
    if loras:
        fields["loras"] = tuple(parse_loras(loras))
    editor = source if isinstance(source, dict) and ("background" in source or "layers" in source) else None
    background = _path(editor.get("background") if editor else source, may_read)
    if background is None:
        return fields
    fields.update(image=background, strength=strength if strength not in (None, "") else None)
    fields["feather"] = feather if feather not in (None, "") else 0
    mask_path = _path(mask, may_read)
    if mask_path is not None:
        fields["mask"] = mask_path
    elif editor and editor.get("layers"):
        painted = [_path(layer, may_read) for layer in editor["layers"]]
        merged = None
        for layer_path in filter(None, painted):
            alpha = Image.open(layer_path).convert("RGBA").getchannel("A")
            merged = alpha if merged is None else Image.fromarray(_max(merged, alpha))
        if merged is not None and merged.getextrema()[1] > 0:
            fields["mask"] = merged
    chosen = [s for s in (sides or []) if s in SIDES]
    if chosen:
        amount = pad if pad not in (None, "") else 0
        fields["outpaint"] = tuple(amount if side in chosen else 0 for side in SIDES)
    return fields


def upload_guard(engine: Any):
    """Files a client may hand us: only under Gradio's upload folder or our outputs (a mounted app
    gets no Gradio path checks of its own)."""
    from gradio.utils import get_upload_folder

    def may_read(path: str) -> bool:
        try:
            real = Path(path).resolve()
        except (OSError, RuntimeError):
            return False
        roots = (Path(engine.store.folder).resolve(), Path(get_upload_folder()).resolve())
        return real.is_file() and any(real.is_relative_to(r) for r in roots)

    return may_read


def _max(a: Any, b: Any) -> Any:
    import numpy as np

    return np.maximum(np.asarray(a), np.asarray(b.resize(a.size)))


def restore(engine: Any, params: dict[str, Any]) -> list[Any]:
    """The toolbox part of "Use these settings": strength, feather, outpainting and the LoRAs that are
    here (the source picture itself is not stored: its hash says which one it was)."""
    if not params:
        return [gr.update()] * 6
    notes = []
    found, lora_notes = engine.loras.restore(params.get("loras"))
    notes += lora_notes
    if params.get("source_sha256"):
        notes.append(
            f"Made from a source picture (sha256 {params['source_sha256'][:12]}…, "
            f"{'with' if params.get('mask') else 'without'} a mask): put it in the source box to repeat it."
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
