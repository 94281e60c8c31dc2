"""Model presets and size presets (aspect ratios x resolution tiers)."""

from __future__ import annotations

from dataclasses import dataclass

from zimage.settings import DEFAULT_MODEL


@dataclass(frozen=True)
class ModelPreset:
    name: str
    kind: str  # "hub", "local" or "tiny"
    default_size: int
    default_steps: int = 8
    description: str = ""


TINY = ModelPreset(
    "tiny",
    "tiny",
    256,
    8,
    "Random-weight model of the real architecture, for tests and the offline demo. Its pictures are noise.",
)


def model_preset(model: str) -> ModelPreset:
    """The preset for a --model value: 'tiny', a local folder, or a hub repo id."""
    if model == "tiny":
        return TINY
    from pathlib import Path

    if Path(model).expanduser().is_dir():
        return ModelPreset(model, "local", 1024, 8, f"Local diffusers folder {model}")
    desc = "Z-Image-Turbo (6B DiT, Qwen3-4B text encoder, 8 steps)" if model == DEFAULT_MODEL else model
    return ModelPreset(model, "hub", 1024, 8, desc)


# Aspect ratios offered in the UI, widest first within each orientation.
ASPECT_RATIOS: tuple[tuple[int, int], ...] = (
    (1, 1),
    (4, 3),
    (3, 4),
    (3, 2),
    (2, 3),
    (16, 9),
    (9, 16),
    (21, 9),
    (9, 21),
)
RESOLUTION_TIERS: tuple[int, ...] = (1024, 1280, 1536)


def size_for(ratio: tuple[int, int], tier: int, multiple: int = 16) -> tuple[int, int]:
    """Width and height with about tier*tier pixels at the given ratio, multiples of 16."""
    rw, rh = ratio
    area = tier * tier
    height = (area * rh / rw) ** 0.5
    width = height * rw / rh
    snap = lambda v: max(multiple, int(round(v / multiple)) * multiple)  # noqa: E731
    return snap(width), snap(height)


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' -> (1024, 768)."""
    w, _, h = text.lower().replace("×", "x").partition("x")
    return int(w), int(h)
