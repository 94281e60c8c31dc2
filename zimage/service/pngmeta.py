"""Parameters read back from a PNG: its text chunks are walked without decoding a pixel, and
every field is checked, because a PNG dropped on the page may come from anywhere.

A 13000x13000 PNG with its text after the pixel data made Pillow decode half a gigabyte to reach
the text; here the pixel data is skipped by its length, compressed text is inflated to at most
MAX_TEXT_CHUNK bytes, and an image larger than MAX_PNG_SIDE on a side is refused outright.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import zlib
from pathlib import Path
from typing import IO, Any

from zimage.errors import UnreadableImage

JSON_KEY = "zimage"  # iTXt: the parameters as JSON
TEXT_KEY = "parameters"  # tEXt: A1111's human-readable layout

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_SIDE = 16384  # pixels; zimage makes at most max_size (2048 by default)
MAX_TEXT_CHUNK = 1 << 20  # a text chunk larger than 1 MiB is skipped, unread
MAX_CHUNKS = 100_000
_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
_KEYS = (JSON_KEY, TEXT_KEY)


def read_png_text(source: str | Path | IO[bytes], keys: tuple[str, ...] = _KEYS) -> dict[str, str]:
    """The text chunks named `keys`, wherever they lie (before or after the pixel data), without
    decompressing the pixels: every other chunk is skipped by its length. Raises UnreadableImage
    when the file is not a PNG, or is one larger than MAX_PNG_SIDE on a side."""
    if isinstance(source, (str, Path)):
        with open(source, "rb") as f:
            return read_png_text(f, keys)
    f = source
    if f.read(8) != PNG_SIGNATURE:
        raise UnreadableImage("The file is not a PNG image.")
    head = f.read(8 + 13)
    if len(head) < 21 or head[4:8] != b"IHDR":
        raise UnreadableImage("The PNG image is damaged (it has no header chunk).")
    width, height = struct.unpack(">II", head[8:16])
    if not (0 < width <= MAX_PNG_SIDE and 0 < height <= MAX_PNG_SIDE):
        raise UnreadableImage(
            f"The PNG image is {width}x{height} pixels; the loader reads images of at most "
            f"{MAX_PNG_SIDE}x{MAX_PNG_SIDE}."
        )
    f.seek(4, os.SEEK_CUR)  # the header's CRC
    found: dict[str, str] = {}
    for _ in range(MAX_CHUNKS):
        header = f.read(8)
        if len(header) < 8:
            break
        length, kind = struct.unpack(">I4s", header)
        if kind == b"IEND":
            break
        if kind in _TEXT_CHUNKS and length <= MAX_TEXT_CHUNK:
            data = f.read(length)
            f.seek(4, os.SEEK_CUR)
            if len(data) < length:
                break
            item = _text_chunk(kind, data, keys)
            if item is not None and item[0] not in found:
                found[item[0]] = item[1]
        else:
            f.seek(length + 4, os.SEEK_CUR)  # pixel data and everything else: not read
    return found


def _text_chunk(kind: bytes, data: bytes, keys: tuple[str, ...]) -> tuple[str, str] | None:
    """(key, text) of one tEXt/zTXt/iTXt chunk when its key is wanted; None otherwise or when damaged."""
    key_bytes, sep, rest = data.partition(b"\0")
    if not sep:
        return None
    key = key_bytes.decode("latin-1")
    if key not in keys:
        return None
    try:
        if kind == b"tEXt":
            return key, rest.decode("latin-1")
        if kind == b"zTXt":
            return key, _inflate(rest[1:]).decode("latin-1")
        compressed, method = rest[0], rest[1]  # iTXt: flag, method, language\0, translated key\0, text
        _lang, _, rest = rest[2:].partition(b"\0")
        _translated, _, text = rest.partition(b"\0")
        if compressed:
            if method != 0:
                return None
            text = _inflate(text)
        return key, text.decode("utf-8")
    except (IndexError, UnicodeDecodeError, zlib.error, ValueError):
        return None


def _inflate(data: bytes) -> bytes:
    """zlib-decompress at most MAX_TEXT_CHUNK bytes (a small chunk can inflate to gigabytes)."""
    d = zlib.decompressobj()
    out = d.decompress(data, MAX_TEXT_CHUNK)
    if d.unconsumed_tail:
        raise ValueError("text chunk too large once decompressed")
    return out


def read_parameters(source: str | Path | IO[bytes]) -> dict[str, Any]:
    """The parameters a zimage PNG carries, checked and typed by `clean_parameters`; {} when it
    carries none. Raises UnreadableImage for a file that is not a PNG (or too large a one)."""
    return read_parameters_checked(source)[0]


def read_parameters_checked(source: str | Path | IO[bytes]) -> tuple[dict[str, Any], list[str]]:
    """(parameters, the fields left out because they were unusable, each as "name (value)")."""
    text = read_png_text(source)
    raw: Any = {}
    if text.get(JSON_KEY):
        try:
            raw = json.loads(text[JSON_KEY])
        except ValueError:
            raw = {}
    if not (isinstance(raw, dict) and raw) and text.get(TEXT_KEY):
        raw = _parse_parameters_text(text[TEXT_KEY])
    return clean_parameters(raw if isinstance(raw, dict) else {})


# One "Key: value" of A1111's last line; a value with commas is quoted ("a: 1, b: 2").
_A1111_PARAM = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_NEGATIVE = "Negative prompt:"
_A1111_FIELDS = {"steps": "steps", "cfg scale": "guidance", "seed": "seed", "shift": "shift", "model": "model"}


def parse_a1111(text: str) -> dict[str, Any]:
    """Our fields from the `parameters` text that AUTOMATIC1111, Forge, Fooocus (A1111 mode) and zimage
    write: prompt lines, "Negative prompt: ..." lines, then one "Steps: 20, Sampler: ..., Seed: 1" line
    (values quoted when they hold commas). Values stay text (clean_parameters types and checks them);
    keys we have no field for (sampler, model hash, LoRA hashes...) are left out."""
    lines = text.strip().splitlines()
    if not lines:
        return {}
    params = dict(_A1111_PARAM.findall(lines[-1]))
    if len(params) >= 3:  # A1111's own test: a real parameters line has at least three pairs
        lines = lines[:-1]
    else:
        params = {}
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        if line.startswith(_NEGATIVE):
            in_negative = True
            line = line[len(_NEGATIVE) :].strip()
        (negative if in_negative else prompt).append(line)
    out: dict[str, Any] = {"prompt": "\n".join(prompt).strip()}
    if negative:
        out["negative_prompt"] = "\n".join(negative).strip()
    fields = {k.strip().lower(): v.strip().strip('"') for k, v in params.items()}
    for key, name in _A1111_FIELDS.items():
        if key in fields:
            out[name] = fields[key]
    if "size" in fields:
        w, _, h = fields["size"].partition("x")
        out["width"], out["height"] = w.strip(), h.strip()
    return out


_parse_parameters_text = parse_a1111


# field -> (kind, low, high); text fields: (str, max length, None)
_FIELDS: dict[str, tuple[type, Any, Any]] = {
    "prompt": (str, 20_000, None),
    "negative_prompt": (str, 20_000, None),
    "model": (str, 500, None),
    "memory_mode": (str, 100, None),
    "device": (str, 200, None),
    "created": (str, 100, None),
    "generator": (str, 100, None),
    "seed": (int, 0, 2**32 - 1),
    "batch_seed": (int, -1, 2**32 - 1),
    "batch_count": (int, 1, 10_000),
    "width": (int, 1, MAX_PNG_SIDE),
    "height": (int, 1, MAX_PNG_SIDE),
    "steps": (int, 1, 10_000),
    "guidance": (float, 0.0, 1000.0),
    "shift": (float, 0.0, 1000.0),
    # image to image, inpainting and LoRAs (zimage/service/result.py: GenerationResult.toolbox)
    "mode": (str, 20, None),
    "strength": (float, 0.0, 1.0),
    "feather": (int, 0, 10_000),
    "source_sha256": (str, 64, None),
}


def clean_parameters(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Only known fields, each of its type and within sane bounds: (clean, ["width ('abc')", ...]).

    Metadata comes from files anyone can write; nothing downstream should meet a width of 'abc'."""
    clean: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in raw.items():
        spec = _FIELDS.get(key)
        if spec is None:
            if key == "timings" and isinstance(value, dict):
                clean["timings"] = _timings(value)
            elif key in _TOOLBOX:
                checked = _TOOLBOX[key](value)
                if checked is None:
                    dropped.append(f"{key} ({_shown(value)})")
                else:
                    clean[key] = checked
            continue
        kind, low, high = spec
        if kind is str:
            if isinstance(value, str) and len(value) <= low:
                clean[key] = value
            else:
                dropped.append(f"{key} ({_shown(value)})")
            continue
        number = _number(value, kind, low, high)
        if number is None:
            dropped.append(f"{key} ({_shown(value)})")
        else:
            clean[key] = number
    return clean, dropped


def _ints(value: Any, n: int) -> list[int] | None:
    if not isinstance(value, list) or len(value) != n:
        return None
    out = [_number(v, int, 0, MAX_PNG_SIDE) for v in value]
    return None if None in out else out


def _loras(value: Any) -> list[dict[str, Any]] | None:
    """[{name, weight, sha256}], at most 16, each checked; anything else drops the field."""
    if not isinstance(value, list) or len(value) > 16:
        return None
    out = []
    for entry in value:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or len(entry["name"]) > 255:
            return None
        weight = _number(entry.get("weight", 1.0), float, -100.0, 100.0)
        sha = entry.get("sha256", "")
        if weight is None or not isinstance(sha, str) or len(sha) > 64:
            return None
        out.append({"name": entry["name"], "weight": weight, "sha256": sha})
    return out


_TOOLBOX = {
    "mask": lambda v: v if isinstance(v, bool) else None,
    "outpaint": lambda v: _ints(v, 4),
    "source_size": lambda v: _ints(v, 2),
    "loras": _loras,
}


def _timings(value: dict[str, Any]) -> dict[str, Any]:
    """Stage times: numbers (or lists of numbers, or None) under short names; the rest is left out."""
    out: dict[str, Any] = {}
    for name, v in list(value.items())[:50]:
        if not isinstance(name, str) or len(name) > 40:
            continue
        if v is None:
            out[name] = None
        elif isinstance(v, list) and len(v) <= 10_000:
            numbers = [_number(x, float, 0.0, 1e9) for x in v]
            if None not in numbers:
                out[name] = numbers
        else:
            number = _number(v, float, 0.0, 1e9)
            if number is not None:
                out[name] = number
    return out


def _number(value: Any, kind: type, low: Any, high: Any) -> Any:
    if isinstance(value, bool):
        return None
    try:
        if kind is int:
            if isinstance(value, float):
                number = int(value) if value.is_integer() else None
            else:
                number = int(str(value).strip()) if isinstance(value, (int, str)) else None
        else:
            number = float(value) if isinstance(value, (int, float, str)) else None
            if number is not None and not math.isfinite(number):
                number = None
    except (ValueError, OverflowError):
        return None
    if number is None or not low <= number <= high:
        return None
    return number


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
