"""`python -m zimage generate --image ... --mask ... --lora FILE:WEIGHT` in a real subprocess."""

import numpy as np
import pytest
from PIL import Image

from zimage.model.lora import linear_layers
from zimage.model.lora_random import random_lora, save_lora
from zimage.service.store import read_parameters

from .test_cli import run
from .test_toolbox import center_mask, source_image

pytestmark = pytest.mark.slow  # every test runs python -m zimage in a subprocess


def test_strength_zero_or_above_one_or_without_a_source_is_refused_with_exit_2(tiny_dir, tmp_path):
    source_image().save(tmp_path / "in.png")
    out = run(
        ["generate", "--model", "tiny", "--prompt", "x", "--image", "in.png", "--strength", "0"], tiny_dir, tmp_path
    )
    assert out.returncode == 2, out.stderr
    assert "Strength must be above 0 and at most 1 (got 0.0)" in out.stderr and "Traceback" not in out.stderr
    out = run(
        ["generate", "--model", "tiny", "--prompt", "x", "--strength", "1.5", "--lora", "nope:1"], tiny_dir, tmp_path
    )
    assert out.returncode == 2 and "need a source picture" in out.stderr, out.stderr


def test_inpaint_with_a_lora_file_writes_the_png_and_its_metadata(tiny_dir, tmp_path, engine):
    src = source_image(80, 64)
    src.save(tmp_path / "in.png")
    center_mask(80, 64).save(tmp_path / "mask.png")
    lora = save_lora(
        random_lora(linear_layers(engine.pipe.transformer), rank=2, seed=1), tmp_path / "x" / "s.safetensors"
    )
    args = ["generate", "--model", "tiny", "--min-size", "64", "--prompt", "a fox", "--steps", "2", "--seed", "3"]
    args += ["--image", "in.png", "--mask", "mask.png", "--strength", "0.8", "--lora", f"{lora}:0.5", "-o", "o.png"]
    out = run(args, tiny_dir, tmp_path)
    assert out.returncode == 0, out.stderr
    image = Image.open(tmp_path / "o.png")
    assert image.size == (80, 64)
    meta = read_parameters(tmp_path / "o.png")
    assert meta["strength"] == 0.8 and meta["mask"] is True and meta["mode"] == "inpaint"
    assert meta["loras"][0]["name"] == "s.safetensors" and meta["loras"][0]["weight"] == 0.5
    kept = np.asarray(image.convert("RGB"), dtype=int)[:8] - np.asarray(src, dtype=int)[:8]
    assert np.abs(kept).max() == 0
