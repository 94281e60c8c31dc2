"""Image to image and inpainting on the tiny model (CPU): strength, masks, feather, outpainting,
sizes, seeds, progress, metadata, and every bad input refused with a clear message."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from zimage.errors import InvalidRequest
from zimage.service.request import GenerationRequest, Limits, validate
from zimage.service.store import read_parameters, write_png

from .support import pixels

LIMITS = Limits(min_size=64, max_size=256)


def source_image(w=64, h=64):
    """A picture with structure: a colour gradient and a dark disc."""
    x = np.linspace(0, 255, w)[None, :, None]
    y = np.linspace(0, 255, h)[:, None, None]
    arr = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)), np.full((h, w, 1), 128)], 2)
    im = Image.fromarray(arr.astype(np.uint8))
    ImageDraw.Draw(im).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(20, 20, 20))
    return im


def center_mask(w=64, h=64):
    m = Image.new("L", (w, h), 0)
    ImageDraw.Draw(m).rectangle((w // 4, h // 4, 3 * w // 4 - 1, 3 * h // 4 - 1), fill=255)
    return m


def gen(engine, **kw):
    base = dict(prompt="a lighthouse", width=0, height=0, steps=4, seed=5, image=source_image())
    base.update(kw)
    return engine.generate(GenerationRequest(**base), save=False)


def dist(a, b):
    return float(np.abs(pixels(a) - pixels(b)).mean())


def vae_round_trip(engine, image):
    """The source as the model sees it: the tiny VAE's weights are random, so the pixels of even a
    zero-noise run are its decode of the source's latents, not the source itself."""
    import torch

    from zimage.service.img2img import source_pipelines

    i2i, _ = source_pipelines(engine.pipe)
    with torch.no_grad():
        x = i2i.image_processor.preprocess(image, height=image.height, width=image.width)
        return Image.fromarray(engine.runner.decode(engine.pipe.vae.encode(x).latent_dist.mode())[0].numpy())


def test_low_strength_stays_closer_to_the_source_than_high(engine):
    ref = vae_round_trip(engine, source_image())
    low, mid, high = (dist(gen(engine, strength=s).images[0], ref) for s in (0.1, 0.5, 1.0))
    assert low < mid < high and high - low > 0.5, (low, mid, high)


def test_about_ceil_strength_times_steps_run_and_progress_counts_them(engine):
    seen = []
    result = engine.generate(
        GenerationRequest("a fox", steps=8, seed=1, image=source_image(), strength=0.5),
        save=False,
        progress=lambda phase, done, total: seen.append((phase, done, total)),
    )
    assert len(result.timings.steps) == 4 and result.request.denoise_steps == 4
    assert ("denoise", 4, 4) in seen and all(total == 4 for _p, _d, total in seen)
    assert result.timings.vae_encode > 0
    assert [validated(steps=8, strength=s).denoise_steps for s in (0.6, 0.1, 0.01, 1.0)] == [5, 1, 1, 8]


def test_batch_image_i_equals_seed_s_plus_i_and_seeds_reproduce(engine):
    batch = gen(engine, seed=300, count=2, strength=0.7)
    for seed, image in zip(batch.seeds, batch.images):
        single = gen(engine, seed=seed, strength=0.7).images[0]
        assert np.abs(pixels(image) - pixels(single)).max() <= 1
    assert dist(batch.images[0], batch.images[1]) > 1


def test_output_takes_the_source_size_rounded_to_16_and_says_so(engine):
    result = gen(engine, image=source_image(100, 70), steps=2)
    assert result.images[0].size == (96, 64)
    assert any("100x70" in n and "96x64" in n for n in result.notes), result.notes
    exact = validated(image=source_image(80, 64))
    assert (exact.width, exact.height) == (80, 64) and not exact.notes
    given = validated(image=source_image(100, 70), width=128, height=64)
    assert (given.width, given.height) == (128, 64) and given.source.image.size == (128, 64)
    assert any("resized to the requested 128x64" in n for n in given.notes)
    big = validated(image=source_image(1000, 500))
    assert (big.width, big.height) == (256, 128)
    one_side = validated(image=source_image(100, 50), width=128)
    assert (one_side.width, one_side.height) == (128, 64)


def test_inpainting_changes_the_masked_area_keeps_the_rest_and_feathers_the_edge(engine):
    src, mask = source_image(), center_mask()
    sharp = pixels(gen(engine, image=src, mask=mask, strength=1.0).images[0])
    inside = np.asarray(mask) > 127
    diff = np.abs(sharp - pixels(src)).mean(axis=2)
    assert diff[inside].mean() > 10
    assert diff[~inside].max() == 0  # the source laid back exactly where the mask is black
    soft = pixels(gen(engine, image=src, mask=mask, strength=1.0, feather=4).images[0])
    soft_diff = np.abs(soft - pixels(src)).mean(axis=2)
    ring = np.zeros((64, 64), bool)
    ring[13:16, 16:48] = True  # just outside the mask's top edge (the mask starts at row 16)
    assert soft_diff[ring].mean() > 0.5
    assert soft_diff[:3].max() == 0  # far from the mask: still the source


def test_outpainting_grows_the_canvas_and_keeps_the_original_area(engine):
    src = source_image()
    result = gen(engine, image=src, outpaint=(0, 0, 32, 0))
    out = pixels(result.images[0])
    assert result.images[0].size == (96, 64)
    assert np.abs(out[:, :64] - pixels(src)).max() == 0
    edge = np.repeat(pixels(src)[:, -1:], 32, axis=1)
    assert np.abs(out[:, 64:] - edge).mean() > 5  # painted anew, not the stretched edge
    assert any("96x64" in n for n in result.notes)


def test_mask_of_another_size_is_resized_with_a_note():
    req = validated(mask=center_mask(32, 32))
    assert req.source.mask.size == (64, 64) and (req.width, req.height) == (64, 64)
    assert any("mask (32x32) was resized" in n for n in req.notes)


def test_painted_layer_alpha_is_the_mask():
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(layer).rectangle((16, 16, 47, 47), fill=(255, 0, 0, 255))  # red strokes on transparency
    mask = np.asarray(validated(mask=layer).source.mask)
    assert mask[:16].max() == 0 and mask[16:48, 16:48].min() == 255


def test_metadata_records_strength_source_hash_mask_and_a_png_round_trips(engine, tmp_path):
    result = gen(engine, mask=center_mask(), strength=0.9, feather=2, steps=2)
    meta = result.metadata(result.seeds[0])
    assert meta["strength"] == 0.9 and meta["mask"] is True and meta["feather"] == 2 and meta["mode"] == "inpaint"
    assert meta["source_sha256"] == validated().source.sha256 and len(meta["source_sha256"]) == 64
    assert validated(image=source_image(64, 80)).source.sha256 != meta["source_sha256"]
    path = write_png(result.images[0], tmp_path / "x.png", meta)
    back = read_parameters(path)
    assert back["strength"] == 0.9 and back["source_sha256"] == meta["source_sha256"] and back["mask"] is True
    assert result.details()["strength"] == 0.9


def test_text_to_image_is_unchanged_by_the_new_fields(engine):
    req = dict(prompt="a fox", width=64, height=64, steps=2, seed=3)
    a = engine.generate(GenerationRequest(**req), save=False)
    b = engine.generate(GenerationRequest(**req, strength=0.3, feather=5), save=False)
    assert np.array_equal(pixels(a.images[0]), pixels(b.images[0])) and b.request.strength is None
    assert "strength" not in a.metadata(3) and "loras" not in a.metadata(3)


def validated(**kw):
    base = dict(prompt="a cat", width=0, height=0, image=source_image())
    base.update(kw)
    return validate(GenerationRequest(**base), LIMITS)


def test_validation_is_idempotent_and_keeps_the_prepared_source():
    once = validated(outpaint=(16, 0, 0, 0), mask=center_mask())
    twice = validate(once, LIMITS)
    assert twice.source is once.source and (twice.width, twice.height) == (80, 64)
    assert once.strength == 1.0 and validated().strength == 0.6


BAD = [
    (dict(strength=0), "strength", ["above 0 and at most 1", "got 0.0", "unchanged"]),
    (dict(strength=1.5), "strength", ["above 0 and at most 1", "1.5"]),
    (dict(strength="lots"), "strength", ["above 0 and at most 1", "lots"]),
    (dict(image=None, width=64, height=64, mask=center_mask()), "mask", ["source image"]),
    (dict(image=None, width=64, height=64, outpaint=(0, 0, 16, 0)), "outpaint", ["source image"]),
    (dict(mask=Image.new("L", (64, 64), 0)), "mask", ["white", "all black"]),
    (dict(image=Image.new("RGB", (8, 8))), "source image", ["between 16 and 8192", "8x8"]),
    (dict(image=Image.new("RGB", (9000, 16))), "source image", ["8192", "9000x16"]),
    (dict(image=b"this is not a picture"), "source image", ["readable image file"]),
    (dict(image="/nonexistent/picture.png"), "source image", ["readable image file", "picture.png"]),
    (dict(image=12), "source image", ["an image"]),
    (dict(feather=-1), "feather", ["0 to 256"]),
    (dict(feather=1000), "feather", ["0 to 256"]),
    (dict(outpaint=(0, -5, 0, 0)), "outpaint", ["left, top, right, bottom"]),
    (dict(outpaint=(0, 0, 0)), "outpaint", ["four whole numbers"]),
    (dict(width=100, height=64), "width", ["multiple of 16"]),
    (dict(loras=[("../secret", 1.0)]), "LoRA name", ["without folders"]),
    (dict(loras=[("a.safetensors", 9)]), "weight of LoRA 'a.safetensors'", ["-4 to 4"]),
    (dict(loras=[("a", 1), ("a", 0.5)]), "loras", ["at most once"]),
    (dict(loras=[("a", 1)] * 2 + [("b", 1), ("c", 1), ("d", 1)]), "loras", ["at most 4"]),
]


@pytest.mark.parametrize("changes,field,fragments", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs_are_refused_clearly(changes, field, fragments):
    with pytest.raises(InvalidRequest) as info:
        validated(**changes)
    assert info.value.field == field
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "Traceback" not in message and message.endswith((".", ")"))


def test_image_to_image_keeps_the_shared_weights_in_their_dtype(make_settings):
    """diffusers' from_pipe casts every shared module to float32 unless told the dtype: on a GPU that
    made text-to-image 10x slower (and twice the memory) after the first image-to-image run."""
    import torch

    from zimage.service.engine import Engine

    eng = Engine(make_settings(dtype="bfloat16"))
    eng.load()
    try:
        dtypes = {name: next(getattr(eng.pipe, name).parameters()).dtype for name in ("transformer", "text_encoder")}
        assert dtypes == {"transformer": torch.bfloat16, "text_encoder": torch.bfloat16}
        eng.generate(
            GenerationRequest("a boat", width=64, height=64, steps=2, seed=3, image=source_image(), strength=0.5),
            save=False,
        )
        after = {name: next(getattr(eng.pipe, name).parameters()).dtype for name in dtypes}
        assert after == dtypes
    finally:
        eng.shutdown(grace_s=5)
