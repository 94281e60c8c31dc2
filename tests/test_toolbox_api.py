"""The documented generate endpoint with the toolbox's optional arguments, on a real server (tiny
model, logins on) driven by gradio_client and raw HTTP: text-to-image calls keep working; a source,
a mask, strength and LoRAs reach the engine; a bad LoRA is refused naming the file while the
server keeps serving; a hostile client naming /etc/passwd or another user's image is refused."""

import json

import numpy as np
import pytest
from PIL import Image

from zimage.model.lora import linear_layers
from zimage.model.lora_random import random_lora, save_lora
from zimage.service.pngmeta import read_parameters

from .support import App
from .test_security_web import fd, queued
from .test_toolbox import center_mask, source_image

pytestmark = pytest.mark.slow  # a real server in a subprocess

USERS = {"alice": "pa", "bob": "pb"}
LEAKS = ("Traceback", "object at 0x", 'File "')


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_dir, engine):
    work = tmp_path_factory.mktemp("toolbox-server")
    loras = work / "loras"
    save_lora(
        random_lora(linear_layers(engine.pipe.transformer), rank=2, seed=1, scale=2.0), loras / "style.safetensors"
    )
    (loras / "broken.safetensors").write_bytes(b"\x00\x01 not a safetensors file" * 8)
    users = work / "users.txt"
    users.write_text("".join(f"{u}:{p}\n" for u, p in USERS.items()))
    server = App(work, tiny_dir, "--lora-dir", str(loras), "--auth-file", str(users)).wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    c = Client(served.url, auth=("alice", USERS["alice"]), verbose=False)
    yield c
    c.close()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    source_image(64, 64).save(folder / "in.png")
    center_mask(64, 64).save(folder / "mask.png")
    return folder


def rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=float)


def test_text_to_image_calls_keep_working(client):
    gallery, details = client.predict("a cat", api_name="/generate")
    assert len(gallery) == 1 and details["prompt"] == "a cat" and "strength" not in details
    gallery, details = client.predict("a fox", "", 64, 64, 2, 0.0, 7, 1, 3.0, api_name="/generate")
    assert details["seed"] == 7 and "loras" not in details and "source_sha256" not in details


def test_image_to_image_low_strength_stays_closer_to_the_source(client, pictures):
    from gradio_client import handle_file

    source = np.asarray(source_image(64, 64), dtype=float)
    far = {}
    for strength in (0.25, 1.0):
        gallery, details = client.predict(
            "a lighthouse", "", 0, 0, 4, 0.0, 5, 1, 3.0, handle_file(str(pictures / "in.png")), None, strength,
            api_name="/generate",
        )  # fmt: skip
        assert details["mode"] == "img2img" and details["strength"] == strength and details["mask"] is False
        assert (details["width"], details["height"]) == (64, 64)  # 0 x 0: the source's size
        far[strength] = np.abs(rgb(gallery[0]["image"]) - source).mean()
        meta = read_parameters(gallery[0]["image"])
        assert meta["strength"] == strength and meta["source_sha256"] == details["source_sha256"]
    assert far[0.25] < far[1.0], far


def test_inpainting_changes_the_masked_area_more_than_the_rest(client, pictures):
    from gradio_client import handle_file

    image, mask = handle_file(str(pictures / "in.png")), handle_file(str(pictures / "mask.png"))
    gallery, details = client.predict(
        "a red door", image=image, mask=mask, strength=1.0, feather=0, width=0, height=0, steps=3, seed=9,
        api_name="/generate",
    )  # fmt: skip
    assert details["mode"] == "inpaint" and details["mask"] is True
    change = np.abs(rgb(gallery[0]["image"]) - np.asarray(source_image(64, 64), dtype=float)).mean(axis=2)
    inside = np.asarray(center_mask(64, 64)) > 127
    assert change[inside].mean() > 4 * change[~inside].mean() + 1, (change[inside].mean(), change[~inside].mean())


def test_a_lora_changes_the_pixels_and_weight_zero_does_not(client):
    def run(loras):
        gallery, details = client.predict("a fox", "", 64, 64, 2, 0.0, 11, 1, 3.0, loras=loras, api_name="/generate")
        return rgb(gallery[0]["image"]), details

    plain, _ = run("")
    zero, details = run("style.safetensors:0")
    assert np.array_equal(plain, zero)
    styled, details = run("style.safetensors:1.5")
    assert np.abs(styled - plain).max() > 0
    (entry,) = details["loras"]
    assert entry["name"] == "style.safetensors" and entry["weight"] == 1.5 and len(entry["sha256"]) == 64


def test_a_bad_lora_is_refused_by_name_and_the_server_keeps_serving(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        client.predict("a fox", "", 64, 64, 2, 0.0, 7, 1, 3.0, loras="broken.safetensors:1", api_name="/generate")
    message = str(info.value)
    assert "broken.safetensors" in message and not any(leak in message for leak in LEAKS), message
    with pytest.raises(AppError) as info:
        client.predict("a fox", loras="nope.safetensors", api_name="/generate")
    assert "nope.safetensors" in str(info.value) and "no such file" in str(info.value)
    gallery, details = client.predict("a fox", "", 64, 64, 2, 0.0, 7, 1, 3.0, api_name="/generate")
    assert details["seed"] == 7 and len(gallery) == 1


def test_strength_out_of_range_is_refused_in_a_sentence(client, pictures):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        client.predict("a fox", image=handle_file(str(pictures / "in.png")), strength=0, api_name="/generate")
    assert "Strength must be above 0 and at most 1" in str(info.value)


def test_a_hostile_client_cannot_name_other_files_as_source_or_mask(served, client):
    import httpx

    gallery, _details = client.predict("alice's own", "", 64, 64, 1, 0.0, 3, 1, 3.0, api_name="/generate")
    alices = sorted((served.outputs / "alice").glob("*.png"))[-1]
    bob = httpx.Client(base_url=served.url, timeout=60)
    assert bob.post("/login", data={"username": "bob", "password": USERS["bob"]}).status_code == 200
    config = bob.get("/config").json()
    fns = {d.get("api_name"): d["id"] for d in config["dependencies"]}
    editor = {"background": fd(alices), "layers": [], "composite": None}
    cases = [
        (fns["generate"], [*["x", "", 0, 0, 2, 0.0, 1, 1, 3.0], fd("/etc/passwd")], "'passwd' is not one of your"),
        (fns["generate"], [*["x", "", 0, 0, 2, 0.0, 1, 1, 3.0], fd(alices)], "is not one of your images"),
        (fns["generate"], [*["x", "", 64, 64, 2, 0.0, 1, 1, 3.0], None, fd(alices)], "is not one of your images"),
    ]
    for fn, data, expected in cases:
        status, msg = queued(bob, fn, data, "bob-hostile")
        text = json.dumps(msg)
        assert status == 200 and not msg.get("success") and expected in msg["output"]["error"], text
        assert not any(leak in text for leak in LEAKS), text
    # the page's own Generate (a private event, found by its handler's name) refuses the same way
    page = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "generate_ui")
    page_data = ["x", "", 64, 64, 2, 0.0, 1, 1, 3.0, True, "c", editor, None, 0.6, 8, [], 256, "", True]
    status, msg = queued(bob, page, page_data, "bob-hostile-page")
    assert not msg.get("success") and "is not one of your images" in msg["output"]["error"], msg
    bob.close()
