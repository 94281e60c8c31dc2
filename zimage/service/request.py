"""Generation requests and their pure validation (no GPU needed)."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from zimage.errors import InvalidRequest

if TYPE_CHECKING:  # pragma: no cover
    from zimage.settings import Settings

SEED_MAX = 2**32 - 1
GUIDANCE_MAX = 10.0
SIZE_MULTIPLE = 16


@dataclass(frozen=True)
class Limits:
    min_size: int = 256
    max_size: int = 2048
    max_prompt_chars: int = 2000
    max_steps: int = 50
    max_count: int = 8

    @classmethod
    def from_settings(cls, s: Settings) -> Limits:
        return cls(s.min_size, s.max_size, s.max_prompt_chars, s.max_steps, s.max_count)


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    steps: int = 8
    guidance: float = 0.0
    seed: int = -1
    count: int = 1
    user: str = ""  # who asked (for logs); never affects the image
    owner: str = ""  # whose outputs folder the images go to (a logged-in user; '' = the shared one)

    def seeds(self) -> list[int]:
        """Seeds of the images, s, s+1, ...; the seed must be resolved first."""
        if self.seed < 0:
            raise ValueError("resolve the seed before asking for seeds")
        return [(self.seed + i) % (SEED_MAX + 1) for i in range(self.count)]


def _as_int(field_name: str, value: Any, allowed: str) -> int:
    if isinstance(value, bool):
        raise InvalidRequest(field_name, value, allowed)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise InvalidRequest(field_name, value, allowed)


def _as_float(field_name: str, value: Any, allowed: str) -> float:
    if isinstance(value, bool):
        raise InvalidRequest(field_name, value, allowed)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidRequest(field_name, value, allowed) from None
    if not math.isfinite(number):
        raise InvalidRequest(field_name, value, allowed)
    return number


def snap_size(value: int, limits: Limits = Limits()) -> int:
    """Nearest multiple of 16 within the limits (for UI presets and hints)."""
    snapped = int(round(value / SIZE_MULTIPLE)) * SIZE_MULTIPLE
    return max(limits.min_size, min(limits.max_size, snapped))


def validate(request: GenerationRequest, limits: Limits = Limits()) -> GenerationRequest:
    """Return a normalised copy of the request or raise InvalidRequest naming the first bad field."""
    prompt = request.prompt
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequest("prompt", prompt, "a non-empty text", "Describe the picture you want.")
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidRequest("prompt", prompt, f"at most {limits.max_prompt_chars} characters")
    negative = request.negative_prompt or ""
    if not isinstance(negative, str):
        raise InvalidRequest("negative prompt", negative, "a text")
    if len(negative) > limits.max_prompt_chars:
        raise InvalidRequest("negative prompt", negative, f"at most {limits.max_prompt_chars} characters")

    sizes = {}
    for name in ("width", "height"):
        allowed = f"a multiple of {SIZE_MULTIPLE} between {limits.min_size} and {limits.max_size}"
        value = _as_int(name, getattr(request, name), allowed)
        if value % SIZE_MULTIPLE:
            hint = f"Try {snap_size(value, limits)}."
            raise InvalidRequest(name, value, allowed, hint)
        if not limits.min_size <= value <= limits.max_size:
            raise InvalidRequest(name, value, allowed)
        sizes[name] = value

    steps = _as_int("steps", request.steps, f"a whole number from 1 to {limits.max_steps}")
    if not 1 <= steps <= limits.max_steps:
        raise InvalidRequest("steps", steps, f"a whole number from 1 to {limits.max_steps}")

    guidance = _as_float("guidance", request.guidance, f"a number from 0 to {GUIDANCE_MAX:g}")
    if not 0.0 <= guidance <= GUIDANCE_MAX:
        raise InvalidRequest("guidance", guidance, f"a number from 0 to {GUIDANCE_MAX:g}")

    seed_allowed = f"-1 (random) or a whole number from 0 to {SEED_MAX}"
    seed = _as_int("seed", request.seed, seed_allowed)
    if not (seed == -1 or 0 <= seed <= SEED_MAX):
        raise InvalidRequest("seed", seed, seed_allowed)

    count = _as_int("count", request.count, f"a whole number from 1 to {limits.max_count}")
    if not 1 <= count <= limits.max_count:
        raise InvalidRequest("count", count, f"a whole number from 1 to {limits.max_count}")

    return replace(
        request,
        prompt=prompt,
        negative_prompt=negative,
        width=sizes["width"],
        height=sizes["height"],
        steps=steps,
        guidance=guidance,
        seed=seed,
        count=count,
    )


def resolve_seed(seed: int) -> int:
    """-1 becomes a concrete random seed, which is returned and shown."""
    return secrets.randbelow(SEED_MAX + 1) if seed < 0 else seed
