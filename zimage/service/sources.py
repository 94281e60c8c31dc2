"""Source images and masks for image-to-image and inpainting: open, check, size, pad, hash.

Pure Pillow (no torch): the request's validation calls `prepare`, so a bad picture is refused
before it waits for the GPU, with one sentence naming what is wrong and what to do.

Conventions: mask white = repaint, black = keep (diffusers' and every studio's); a mask with a
transparent background (a painted layer) is read from its alpha channel. Outpainting pads the
canvas on the chosen sides with the source's edge pixels and marks the new area white in the mask.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zimage.errors import InvalidRequest

SOURCE_MIN_SIDE = 16
SOURCE_MAX_SIDE = 8192
SOURCE_MAX_PIXELS = 40_000_000
FEATHER_MAX = 256
SIZE_MULTIPLE = 16
STRENGTH_IMG2IMG = 0.6  # default strength: keeps the composition, changes the details
STRENGTH_INPAINT = 1.0  # default with a mask: the masked area is painted anew
SIDES = ("left", "top", "right", "bottom")


@dataclass(frozen=True)
class Source:
    """A source picture ready for the run: RGB and mask at the output size."""

    image: Any  # PIL.Image RGB, output size
    mask: Any | None  # PIL.Image "L", output size, 255 = repaint; None for plain image-to-image
    sha256: str  # of the source as given (size and RGB pixels): recorded in the PNG metadata
    given_size: tuple[int, int]


def open_image(value: Any, what: str) -> Any:
    """A PIL image from a PIL image, a file path, bytes or an array; refuses what it cannot read."""
    from PIL import Image, ImageOps

    if isinstance(value, Image.Image):
        image = value
    else:
        try:
            if isinstance(value, (str, Path)):
                image = Image.open(value)
            elif isinstance(value, (bytes, bytearray)):
                image = Image.open(io.BytesIO(value))
            elif hasattr(value, "__array_interface__"):
                image = Image.fromarray(value)
            else:
                raise InvalidRequest(what, type(value).__name__, "an image (PNG, JPEG or WebP file, or pixels)")
            _check_side(image.size, what)  # before decoding: a huge picture is refused unread
            image.load()
        except InvalidRequest:
            raise
        except (OSError, ValueError, TypeError, Image.DecompressionBombError) as exc:
            raise InvalidRequest(
                what, _name(value), "a readable image file (PNG, JPEG or WebP)", f"It could not be read: {exc}."
            ) from None
    _check_side(image.size, what)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block: keep the pixels as stored
        pass
    return image


def _name(value: Any) -> str:
    return str(value) if isinstance(value, (str, Path)) else type(value).__name__


def _check_side(size: tuple[int, int], what: str) -> None:
    w, h = size
    allowed = (
        f"between {SOURCE_MIN_SIDE} and {SOURCE_MAX_SIDE} pixels on a side and at most "
        f"{SOURCE_MAX_PIXELS // 1_000_000} megapixels"
    )
    if min(w, h) < SOURCE_MIN_SIDE or max(w, h) > SOURCE_MAX_SIDE or w * h > SOURCE_MAX_PIXELS:
        raise InvalidRequest(what, f"{w}x{h}", allowed)


def to_rgb(image: Any) -> Any:
    """RGB; transparent parts become white (a pasted cut-out keeps its colours)."""
    from PIL import Image

    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def to_mask(image: Any) -> Any:
    """Greyscale mask, 255 = repaint: the alpha channel of a painted layer, else the brightness."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        lo, _hi = alpha.getextrema()
        if lo < 255:  # a layer with a transparent background: what was painted is the mask
            return alpha
    return image.convert("L")


def image_sha256(image: Any) -> str:
    """Hash of the picture itself (size and RGB pixels), whatever file format carried it."""
    rgb = to_rgb(image)
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def _snap(value: float) -> int:
    return max(SIZE_MULTIPLE, int(round(value / SIZE_MULTIPLE)) * SIZE_MULTIPLE)


def output_size(size: tuple[int, int], min_size: int, max_size: int) -> tuple[int, int, str]:
    """The source's size scaled into [min_size, max_size] (aspect kept where it can be) and rounded
    to multiples of 16; the note says what changed ("" when nothing did)."""
    w, h = size
    scale = 1.0
    if max(w, h) > max_size:
        scale = max_size / max(w, h)
    if min(w, h) * scale < min_size:
        scale = min_size / min(w, h)
    ww = min(max(_snap(w * scale), min_size), max_size)
    hh = min(max(_snap(h * scale), min_size), max_size)
    if (ww, hh) == (w, h):
        return ww, hh, ""
    if scale == 1.0:
        why = "rounded to multiples of 16"
    elif abs(ww / hh - w / h) > 0.02:
        why = f"scaled into {min_size}-{max_size} pixels a side (the aspect ratio could not be kept)"
    else:
        why = f"scaled into {min_size}-{max_size} pixels a side and rounded to multiples of 16"
    return ww, hh, f"The output takes the source's size {w}x{h}, {why}: {ww}x{hh}."


def _outpaint(image: Any, mask: Any | None, pads: tuple[int, int, int, int]) -> tuple[Any, Any]:
    """Pad the canvas (edge pixels repeated) and mark the new area white in the mask."""
    import numpy as np
    from PIL import Image

    left, top, right, bottom = pads
    arr = np.asarray(image)
    arr = np.pad(arr, ((top, bottom), (left, right), (0, 0)), mode="edge")
    old = np.asarray(mask) if mask is not None else np.zeros(image.size[::-1], dtype=np.uint8)
    new = np.pad(old, ((top, bottom), (left, right)), mode="constant", constant_values=255)
    return Image.fromarray(arr), Image.fromarray(new)


def prepare(
    image: Any,
    mask: Any | None,
    outpaint: tuple[int, int, int, int],
    width: int,
    height: int,
    min_size: int,
    max_size: int,
) -> tuple[Source, int, int, list[str]]:
    """Open and check the source (and mask), outpaint, and size both to the output.

    width/height 0 mean "from the source" (both 0: the source's size rounded to 16 within the
    limits; one 0: that side follows the source's aspect ratio). Returns the source, the output
    width and height, and notes for the user about anything that was changed."""
    from PIL import Image

    notes: list[str] = []
    src = open_image(image, "source image")
    sha = image_sha256(src)
    given = src.size
    src = to_rgb(src)
    m = None
    if mask is not None:
        m = to_mask(open_image(mask, "mask"))
        if m.size != src.size:
            notes.append(
                f"The mask ({m.width}x{m.height}) was resized to the source's size ({src.width}x{src.height})."
            )
            m = m.resize(src.size, Image.Resampling.BILINEAR)
    if any(outpaint):
        src, m = _outpaint(src, m, outpaint)
        sides = ", ".join(f"{side} {n}" for side, n in zip(SIDES, outpaint) if n)
        notes.append(f"Outpainting: the canvas grew to {src.width}x{src.height} ({sides} pixels).")
    if m is not None and m.getextrema()[1] < 128:
        raise InvalidRequest(
            "mask",
            "all black",
            "white where the picture should be repainted",
            "Paint the area to change in white, or send no mask for image-to-image.",
        )

    if width and height:
        out_w, out_h = width, height
        if (out_w, out_h) != src.size:
            stretched = abs(out_w / out_h - src.width / src.height) > 0.02
            notes.append(
                f"The source ({src.width}x{src.height}) was resized to the requested {out_w}x{out_h}"
                + (" (stretched: the aspect ratios differ)." if stretched else ".")
            )
    elif width or height:  # one side given: the other follows the aspect ratio
        if width:
            out_w, out_h = width, min(max(_snap(width * src.height / src.width), min_size), max_size)
        else:
            out_w, out_h = min(max(_snap(height * src.width / src.height), min_size), max_size), height
        notes.append(f"The source ({src.width}x{src.height}) was resized to {out_w}x{out_h}.")
    else:
        out_w, out_h, note = output_size(src.size, min_size, max_size)
        if note:
            notes.append(note)
    if src.size != (out_w, out_h):
        src = src.resize((out_w, out_h), Image.Resampling.LANCZOS)
        if m is not None:
            m = m.resize((out_w, out_h), Image.Resampling.BILINEAR)
    return Source(src, m, sha, given), out_w, out_h, notes


def check_outpaint(value: Any, max_size: int) -> tuple[int, int, int, int]:
    """Four whole numbers of pixels (left, top, right, bottom), each 0..max_size."""
    allowed = f"four whole numbers of pixels (left, top, right, bottom), each from 0 to {max_size}"
    if value is None or value == "":
        return (0, 0, 0, 0)
    if isinstance(value, dict):
        value = tuple(value.get(side, 0) for side in SIDES)
    if isinstance(value, str):
        value = tuple(p for p in value.replace(";", ",").split(",") if p.strip())
    try:
        pads = tuple(int(float(v)) for v in value)
    except (TypeError, ValueError):
        raise InvalidRequest("outpaint", value, allowed) from None
    if len(pads) != 4 or any(p < 0 or p > max_size for p in pads) or any(float(v) != int(float(v)) for v in value):
        raise InvalidRequest("outpaint", value, allowed)
    return pads  # type: ignore[return-value]
