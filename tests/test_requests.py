"""Every validation rule, table-driven: the field, the value and what is allowed appear in the message."""

import pytest

from zimage.errors import InvalidRequest
from zimage.service.request import SEED_MAX, GenerationRequest, Limits, resolve_seed, snap_size, validate

LIMITS = Limits(min_size=256, max_size=2048, max_prompt_chars=2000, max_steps=50, max_count=8)


def req(**kw):
    base = dict(prompt="a cat", width=1024, height=1024, steps=8, guidance=0.0, seed=-1, count=1)
    base.update(kw)
    return GenerationRequest(**base)


BAD = [
    # (changes, field, fragments expected in the message)
    (dict(prompt=""), "prompt", ["Prompt", "non-empty"]),
    (dict(prompt="   \n"), "prompt", ["Prompt", "non-empty"]),
    (dict(prompt="x" * 2001), "prompt", ["at most 2000 characters", "2001 characters"]),
    (dict(prompt=None), "prompt", ["Prompt"]),
    (dict(negative_prompt="y" * 2001), "negative prompt", ["Negative prompt", "at most 2000"]),
    (dict(width=1000), "width", ["Width", "multiple of 16", "(got 1000)", "Try 992"]),
    (dict(height=1030), "height", ["Height", "multiple of 16", "(got 1030)"]),
    (dict(width=240), "width", ["between 256 and 2048", "(got 240)"]),
    (dict(width=2064), "width", ["between 256 and 2048", "(got 2064)"]),
    (dict(height=0), "height", ["(got 0)"]),
    (dict(width=-512), "width", ["(got -512)"]),
    (dict(width=512.5), "width", ["Width"]),
    (dict(width="wide"), "width", ["'wide'"]),
    (dict(width=True), "width", ["Width"]),
    (dict(steps=0), "steps", ["from 1 to 50", "(got 0)"]),
    (dict(steps=51), "steps", ["from 1 to 50", "(got 51)"]),
    (dict(steps=2.5), "steps", ["Steps"]),
    (dict(guidance=-0.1), "guidance", ["from 0 to 10", "(got -0.1)"]),
    (dict(guidance=10.5), "guidance", ["from 0 to 10"]),
    (dict(guidance=float("nan")), "guidance", ["Guidance"]),
    (dict(guidance="lots"), "guidance", ["Guidance"]),
    (dict(seed=-2), "seed", ["-1 (random)", f"0 to {SEED_MAX}", "(got -2)"]),
    (dict(seed=SEED_MAX + 1), "seed", [f"(got {SEED_MAX + 1})"]),
    (dict(seed=1.5), "seed", ["Seed"]),
    (dict(count=0), "count", ["from 1 to 8", "(got 0)"]),
    (dict(count=9), "count", ["from 1 to 8", "(got 9)"]),
]


@pytest.mark.parametrize("changes,field,fragments", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_field_value_and_allowed(changes, field, fragments):
    with pytest.raises(InvalidRequest) as info:
        validate(req(**changes), LIMITS)
    assert info.value.field == field
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


GOOD = [
    # (changes, the values validate gives back: the request's own, as numbers of the right type)
    (dict(), dict(width=1024, height=1024, steps=8, guidance=0.0, seed=-1, count=1)),
    (dict(width=256, height=2048), dict(width=256, height=2048)),
    (dict(width=2048, height=256), dict(width=2048, height=256)),
    (dict(steps=1), dict(steps=1)),
    (dict(steps=50), dict(steps=50)),
    (dict(guidance=0), dict(guidance=0.0)),
    (dict(guidance=10), dict(guidance=10.0)),
    (dict(seed=0), dict(seed=0)),
    (dict(seed=SEED_MAX), dict(seed=SEED_MAX)),
    (dict(count=8), dict(count=8)),
    (dict(prompt="x" * 2000), dict(prompt="x" * 2000)),
    (dict(prompt="一只猫坐在窗台上"), dict(prompt="一只猫坐在窗台上")),
    # widgets send floats and strings
    (
        dict(width=1024.0, height="768", steps="8", guidance="2.5", seed="42", count=2.0),
        dict(width=1024, height=768, steps=8, guidance=2.5, seed=42, count=2),
    ),
]


@pytest.mark.parametrize("changes,expected", GOOD)
def test_good_input_is_accepted_and_normalised(changes, expected):
    out = validate(req(**changes), LIMITS)
    got = {k: getattr(out, k) for k in expected}
    assert got == expected
    assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in expected.items()}
    assert all(type(getattr(out, k)) is int for k in ("width", "height", "steps", "seed", "count"))
    assert type(out.guidance) is float


def test_bounds_are_settings():
    small = Limits(min_size=64, max_size=512, max_prompt_chars=10, max_steps=4, max_count=2)
    validate(req(width=64, height=64, prompt="short", steps=4, count=2), small)
    with pytest.raises(InvalidRequest, match="between 64 and 512"):
        validate(req(width=1024, height=64, prompt="short"), small)
    with pytest.raises(InvalidRequest, match="at most 10 characters"):
        validate(req(prompt="much too long"), small)


def test_seed_resolution_and_batch_seeds():
    assert resolve_seed(7) == 7
    seeds = {resolve_seed(-1) for _ in range(20)}
    assert all(0 <= s <= SEED_MAX for s in seeds) and len(seeds) > 1
    assert req(seed=10, count=3).seeds() == [10, 11, 12]
    assert req(seed=SEED_MAX, count=2).seeds() == [SEED_MAX, 0]
    with pytest.raises(ValueError):
        req(seed=-1).seeds()


def test_snap_size():
    assert snap_size(1000) == 992
    assert snap_size(1009) == 1008
    assert snap_size(10) == 256
    assert snap_size(9999) == 2048
