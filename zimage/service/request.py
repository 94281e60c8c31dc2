"""Generation requests and their pure validation (no GPU needed)."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from zimage.errors import InvalidRequest

if TYPE_CHECKING:  # pragma: no cover
    from zimage.service.sources import Source
    from zimage.settings import Settings

SEED_MAX = 2**32 - 1
GUIDANCE_MAX = 10.0
SHIFT_MIN, SHIFT_MAX = 1.0, 10.0  # the scheduler's time shift (Z-Image-Turbo's own is 3)
SIZE_MULTIPLE = 16
LORA_WEIGHT_MAX = 4.0


@dataclass(frozen=True)
class Limits:
    min_size: int = 256
    max_size: int = 2048
    max_prompt_chars: int = 2000
    max_steps: int = 50
    max_count: int = 8
    max_loras: int = 4

    @classmethod
    def from_settings(cls, s: Settings) -> Limits:
        return cls(s.min_size, s.max_size, s.max_prompt_chars, s.max_steps, s.max_count, max_loras=s.max_loras)


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
    shift: float | None = None  # the scheduler's time shift; None = the model's own
    owner: str = ""  # whose outputs folder the images go to (a logged-in user; '' = the shared one)
    # Image to image and inpainting: the raw inputs (PIL image, path, bytes); validate() turns them
    # into `source` (sized, padded, hashed). width/height 0 = take the size from the source.
    image: Any = field(default=None, compare=False, repr=False)
    mask: Any = field(default=None, compare=False, repr=False)
    strength: float | None = None  # None: 0.6 for image to image, 1.0 with a mask
    feather: int = 0  # pixels of blur on the mask's edge when the result is laid over the source
    outpaint: tuple[int, int, int, int] = (0, 0, 0, 0)  # pixels added left, top, right, bottom
    loras: tuple[tuple[str, float], ...] = ()  # (file name in lora_dir, weight)
    source: Source | None = field(default=None, compare=False, repr=False)
    notes: tuple[str, ...] = ()  # what validation changed, told to the user

    @property
    def mode(self) -> str:
        """text, img2img or inpaint."""
        if self.source is None:
            return "text"
        return "inpaint" if self.source.mask is not None else "img2img"

    @property
    def denoise_steps(self) -> int:
        """Steps that run: all of them from text; about ceil(strength x steps) from a source
        (the arithmetic of the diffusers pipelines' get_timesteps)."""
        if self.source is None or self.strength is None:
            return self.steps
        init = min(self.steps * self.strength, self.steps)
        return self.steps - int(max(self.steps - init, 0))

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

    loras = _check_loras(request.loras, limits)
    has_source = request.image is not None or request.source is not None
    sizes = {}
    for name in ("width", "height"):
        allowed = f"a multiple of {SIZE_MULTIPLE} between {limits.min_size} and {limits.max_size}"
        raw = getattr(request, name)
        if has_source and raw in (None, 0, "0", ""):  # 0: the size comes from the source
            sizes[name] = 0
            continue
        value = _as_int(name, raw, allowed)
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

    shift = request.shift
    if shift is not None and shift != "":
        shift_allowed = f"a number from {SHIFT_MIN:g} to {SHIFT_MAX:g} (the model's own is 3)"
        shift = _as_float("time shift", shift, shift_allowed)
        if not SHIFT_MIN <= shift <= SHIFT_MAX:
            raise InvalidRequest("time shift", shift, shift_allowed)
    else:
        shift = None

    edits = _check_source(request, sizes["width"], sizes["height"], limits) if has_source else _no_source(request)
    edits.setdefault("width", sizes["width"])
    edits.setdefault("height", sizes["height"])
    return replace(
        request,
        shift=shift,
        prompt=prompt,
        negative_prompt=negative,
        steps=steps,
        guidance=guidance,
        seed=seed,
        count=count,
        loras=loras,
        **edits,
    )


def _no_source(request: GenerationRequest) -> dict[str, Any]:
    """Without a source, a mask or outpainting cannot work; strength and feather do nothing."""
    if request.mask is not None:
        raise InvalidRequest("mask", "a mask without a source image", "given with a source image", "Add the picture.")
    if any(request.outpaint or ()):
        raise InvalidRequest("outpaint", tuple(request.outpaint), "used with a source image", "Add the picture.")
    return {"strength": None, "feather": 0, "outpaint": (0, 0, 0, 0)}


def _check_source(request: GenerationRequest, width: int, height: int, limits: Limits) -> dict[str, Any]:
    from zimage.service import sources

    feather_allowed = f"a whole number of pixels from 0 to {sources.FEATHER_MAX}"
    feather = _as_int("feather", request.feather or 0, feather_allowed)
    if not 0 <= feather <= sources.FEATHER_MAX:
        raise InvalidRequest("feather", feather, feather_allowed)
    outpaint = sources.check_outpaint(request.outpaint, limits.max_size)
    notes = list(request.notes)
    source = request.source
    if source is None:
        source, width, height, found = sources.prepare(
            request.image, request.mask, outpaint, width, height, limits.min_size, limits.max_size
        )
        notes += found
    elif (width, height) != source.image.size:  # already prepared: validating again changes nothing
        width, height = source.image.size
    if request.strength is None or request.strength == "":
        strength = sources.STRENGTH_INPAINT if source.mask is not None else sources.STRENGTH_IMG2IMG
    else:
        strength = _as_float("strength", request.strength, "above 0 and at most 1")
        if not 0.0 < strength <= 1.0:
            hint = "0 would return the source unchanged; 1 paints it anew." if strength == 0 else ""
            raise InvalidRequest("strength", strength, "above 0 and at most 1", hint)
    return {
        "source": source,
        "image": None,
        "mask": None,
        "width": width,
        "height": height,
        "strength": strength,
        "feather": feather,
        "outpaint": outpaint,
        "notes": tuple(notes),
    }


def _check_loras(value: Any, limits: Limits) -> tuple[tuple[str, float], ...]:
    """(name, weight) pairs: file names in lora_dir (no folders), weights within +-4, no repeats."""
    if not value:
        return ()
    allowed = f"at most {limits.max_loras} (name, weight) pairs, each name a file in the LoRA folder"
    try:
        pairs = [(p, 1.0) if isinstance(p, str) else tuple(p) for p in value]
    except TypeError:
        raise InvalidRequest("loras", value, allowed) from None
    if len(pairs) > limits.max_loras:
        raise InvalidRequest("loras", f"{len(pairs)} LoRAs", allowed)
    out: list[tuple[str, float]] = []
    for pair in pairs:
        if len(pair) != 2 or not isinstance(pair[0], str) or not pair[0].strip():
            raise InvalidRequest("loras", pair, allowed)
        name = pair[0].strip()
        if "/" in name or "\\" in name or name.startswith("."):
            raise InvalidRequest("LoRA name", name, "a file name in the LoRA folder, without folders")
        w_allowed = f"a number from {-LORA_WEIGHT_MAX:g} to {LORA_WEIGHT_MAX:g}"
        weight = _as_float(f"weight of LoRA {name!r}", pair[1], w_allowed)
        if abs(weight) > LORA_WEIGHT_MAX:
            raise InvalidRequest(f"weight of LoRA {name!r}", weight, w_allowed)
        if any(name == n for n, _ in out):
            raise InvalidRequest("loras", name, "each LoRA at most once", "Give one weight per LoRA.")
        out.append((name, weight))
    return tuple(out)


def resolve_seed(seed: int) -> int:
    """-1 becomes a concrete random seed, which is returned and shown."""
    return secrets.randbelow(SEED_MAX + 1) if seed < 0 else seed
