"""Size arithmetic for the form: resolution tiers, aspect-ratio presets, the size note (pure)."""

from __future__ import annotations

from typing import Any

from zimage.model.presets import ASPECT_RATIOS, RESOLUTION_TIERS, size_for

CUSTOM = "Custom"

# ------------------------------------------------------------------------------------------
# sizes


def size_tiers(default_size: int, max_size: int) -> tuple[int, ...]:
    """Resolution tiers offered: the preset's default (small for the tiny model) and the usual tiers."""
    tiers = {t for t in RESOLUTION_TIERS if t <= max_size}
    if default_size < min(RESOLUTION_TIERS):
        tiers |= {default_size, default_size * 2} if default_size * 2 < min(RESOLUTION_TIERS) else {default_size}
    tiers.add(default_size)
    return tuple(sorted(t for t in tiers if t <= max_size))


def ratio_label(ratio: tuple[int, int]) -> str:
    return f"{ratio[0]}:{ratio[1]}"


def preset_size(label: str, tier: int, min_size: int, max_size: int) -> tuple[int, int, str]:
    """(width, height, note): the ratio at about tier x tier pixels, scaled to fit the limits."""
    rw, rh = (int(x) for x in label.split(":"))
    w, h = size_for((rw, rh), int(tier))
    note = ""
    if max(w, h) > max_size or min(w, h) < min_size:
        scale = max_size / max(w, h) if max(w, h) > max_size else min_size / min(w, h)
        w, h = (max(min_size, min(max_size, int(round(v * scale / 16)) * 16)) for v in (w, h))
        note = f"scaled to fit the {min_size}-{max_size} px limits"
    return w, h, note


def match_preset(width: int, height: int, tiers: tuple[int, ...], min_size: int, max_size: int):
    """The (ratio label, tier) that gives exactly this size, or (CUSTOM, None)."""
    for tier in tiers:
        for ratio in ASPECT_RATIOS:
            w, h, _ = preset_size(ratio_label(ratio), tier, min_size, max_size)
            if (w, h) == (width, height):
                return ratio_label(ratio), tier
    return CUSTOM, None


def size_note(width: Any, height: Any, extra: str = "") -> str:
    try:
        w, h = int(width), int(height)
    except (TypeError, ValueError):
        return ""
    text = f"{w} × {h} px · {w * h / 1e6:.2f} MP"
    return f"{text} · {extra}" if extra else text
