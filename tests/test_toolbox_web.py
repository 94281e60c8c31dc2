"""The page side of the toolbox without a browser: raw Gradio payloads (page and API) to request
fields, the upload path rule, the LoRA text, "Use this result" and restoring from a PNG's metadata."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from zimage.errors import InvalidRequest
from zimage.web import toolbox

from .test_toolbox import source_image


def allow_under(root):
    return lambda path: str(path).startswith(str(root))


def file_data(path):
    return {"path": str(path), "url": None, "meta": {"_type": "gradio.FileData"}}


def test_editor_background_is_the_source_and_painted_layers_are_the_mask(tmp_path):
    source_image().save(tmp_path / "bg.png")
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(layer).rectangle((10, 10, 20, 20), fill=(255, 255, 255, 255))
    layer.save(tmp_path / "layer.png")
    editor = {"background": file_data(tmp_path / "bg.png"), "layers": [file_data(tmp_path / "layer.png")]}
    fields = toolbox.request_fields(
        editor, None, 0.7, 4, ["right", "top"], 32, "a.safetensors:0.5, b", allow_under(tmp_path)
    )
    assert fields["image"] == str(tmp_path / "bg.png") and fields["strength"] == 0.7 and fields["feather"] == 4
    mask = np.asarray(fields["mask"])
    assert mask[15, 15] == 255 and mask[40, 40] == 0
    assert fields["outpaint"] == (0, 32, 32, 0)
    assert fields["loras"] == (("a.safetensors", "0.5"), ("b", 1.0))


def test_an_uploaded_mask_wins_and_no_source_means_no_image_fields(tmp_path):
    source_image().save(tmp_path / "bg.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "m.png")
    fields = toolbox.request_fields(
        {"background": file_data(tmp_path / "bg.png"), "layers": []}, file_data(tmp_path / "m.png"),
        None, None, [], None, "", allow_under(tmp_path),
    )  # fmt: skip
    assert fields["mask"] == str(tmp_path / "m.png") and fields["strength"] is None and "outpaint" not in fields
    assert toolbox.request_fields(None, None, 0.6, 8, [], 256, "", allow_under(tmp_path)) == {}
    empty_editor = {"background": None, "layers": [], "composite": None}
    assert toolbox.request_fields(empty_editor, None, 0.6, 8, ["left"], 256, "x:1", allow_under(tmp_path)) == {
        "loras": (("x", "1"),)
    }


def test_files_outside_the_upload_folder_are_refused(tmp_path):
    with pytest.raises(InvalidRequest) as info:
        toolbox.request_fields(file_data("/etc/passwd"), None, 0.6, 0, [], 0, "", allow_under(tmp_path))
    assert "passwd" in str(info.value) and "uploaded to this studio" in str(info.value)


def test_the_upload_guard_allows_only_gradio_uploads_and_our_outputs(engine, tmp_path):
    from gradio.utils import get_upload_folder

    guard = toolbox.upload_guard(engine)
    assert not guard("/etc/passwd") and not guard(str(tmp_path / "nothing.png"))
    up = get_upload_folder()
    import os

    os.makedirs(up, exist_ok=True)
    inside = os.path.join(up, "zimage-guard-test.png")
    source_image().save(inside)
    try:
        assert guard(inside) and not guard(os.path.join(up, "..", "elsewhere.png"))
    finally:
        os.remove(inside)


def test_use_this_result_and_the_picked_loras(tmp_path):
    value = toolbox._use_result([(str(tmp_path / "r.png"), "seed 1")])
    assert value["background"] == str(tmp_path / "r.png") and value["layers"] == []
    assert toolbox._with_picked(["a.safetensors", "b.safetensors"], "a.safetensors:0.3") == (
        "a.safetensors:0.3, b.safetensors:1"
    )


def test_restore_fills_strength_feather_outpaint_and_present_loras(engine):
    params = {
        "strength": 0.7,
        "feather": 6,
        "outpaint": [0, 0, 128, 0],
        "mask": True,
        "source_sha256": "ab" * 32,
        "loras": [{"name": "gone.safetensors", "weight": 0.5, "sha256": "00"}],
    }
    strength, feather, sides, pad, loras, note = toolbox.restore(engine, params)
    assert (strength, feather, sides, pad, loras) == (0.7, 6, ["right"], 128, "")
    assert "gone.safetensors" in note and "abababababab" in note
