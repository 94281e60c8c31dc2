"""The documented generate endpoint with the toolbox's optional arguments, on a real server (tiny
model): prompt-only positional calls still work; a source, a mask, strength and LoRAs work too."""

import numpy as np
import pytest
from PIL import Image

from zimage.model.lora import linear_layers, random_lora, save_lora
from zimage.service.store import read_parameters

from .support import App
from .test_toolbox import center_mask, source_image

pytestmark = pytest.mark.slow  # a real server in a subprocess


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_dir, engine):
    work = tmp_path_factory.mktemp("toolbox-server")
    save_lora(random_lora(linear_layers(engine.pipe.transformer), rank=2, seed=1), work / "loras" / "style.safetensors")
    server = App(work, tiny_dir, "--lora-dir", str(work / "loras"), "--warmup-sizes", "64x64").wait_ready()
    yield server, work
    server.stop()


def test_generate_api_takes_source_mask_strength_and_loras(served, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    server, _work = served
    client = Client(server.url, verbose=False)
    gallery, details = client.predict("a fox", "", 64, 64, 2, 0.0, 7, 1, api_name="/generate")
    assert details["seed"] == 7 and "strength" not in details
    source_image(80, 64).save(tmp_path / "in.png")
    center_mask(80, 64).save(tmp_path / "mask.png")
    editor = {"background": handle_file(str(tmp_path / "in.png")), "layers": [], "composite": None}
    gallery, details = client.predict(
        "a fox", "", 0, 0, 2, 0.0, 7, 1, editor, handle_file(str(tmp_path / "mask.png")), 0.9, 0, [], 0,
        "style.safetensors:0.5", api_name="/generate",
    )  # fmt: skip
    assert details["width"] == 80 and details["strength"] == 0.9 and details["mask"] is True
    assert details["loras"][0]["name"] == "style.safetensors" and details["loras"][0]["weight"] == 0.5
    meta = read_parameters(gallery[0]["image"])
    assert meta["source_sha256"] == details["source_sha256"]
    kept = np.asarray(Image.open(gallery[0]["image"]).convert("RGB"), dtype=int)[:8]
    assert np.abs(kept - np.asarray(source_image(80, 64), dtype=int)[:8]).max() == 0
    with pytest.raises(AppError) as info:
        client.predict("a fox", "", 0, 0, 2, 0.0, 7, 1, editor, None, 0, api_name="/generate")
    assert "Strength must be above 0 and at most 1" in str(info.value)
    with pytest.raises(AppError) as info:
        client.predict("a fox", "", 64, 64, 2, 0.0, 7, 1, None, None, 0.6, 0, [], 0, "nope:1", api_name="/generate")
    assert "nope" in str(info.value) and "no such file" in str(info.value)
