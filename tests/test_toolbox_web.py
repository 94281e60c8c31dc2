"""The page side of the toolbox without a browser: raw Gradio payloads (page and API) to request
fields, the upload path rule, the LoRA text, "Use this result" and restoring from a PNG's metadata."""

import os

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


def test_the_page_joins_its_source_with_the_strokes_of_the_paint_editor(tmp_path):
    source_image().save(tmp_path / "src.png")
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(layer).rectangle((30, 30, 40, 40), fill=(255, 255, 255, 255))
    layer.save(tmp_path / "layer.png")
    source = file_data(tmp_path / "src.png")
    paint = {"background": source, "layers": [file_data(tmp_path / "layer.png")], "composite": None}
    joined = toolbox.with_painting(source, paint)
    fields = toolbox.request_fields(joined, None, 0.6, 0, [], 0, "", allow_under(tmp_path))
    mask = np.asarray(fields["mask"])
    assert fields["image"] == str(tmp_path / "src.png") and mask[35, 35] == 255 and mask[5, 5] == 0
    assert toolbox.with_painting(source, {"background": source, "layers": []}) is source  # nothing painted
    assert toolbox.with_painting(None, paint) is None  # strokes without a source do nothing
    with pytest.raises(
        InvalidRequest, match="Mask must be a picture uploaded"
    ):  # a stroke layer that is not the asker's file
        toolbox.request_fields(
            toolbox.with_painting(source, {"layers": [file_data("/etc/passwd")]}),
            None,
            0.6,
            0,
            [],
            0,
            "",
            allow_under(tmp_path),
        )


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


def test_the_source_and_mask_pass_the_askers_path_rule(engine, tmp_path):
    """The toolbox uses guard.py's rule: the asker's uploads and own images; /etc/passwd and another
    user's image are refused with a sentence naming the file."""
    from gradio.utils import get_upload_folder

    from zimage.web.guard import Access, Refused

    access = Access(engine.store, users=[("alice", "pa"), ("bob", "pb")])
    alice, bob = access.viewer_of("alice"), access.viewer_of("bob")

    def rule(viewer):
        return lambda path: str(access.check(path, viewer))

    with pytest.raises(Refused) as info:
        toolbox.request_fields(file_data("/etc/passwd"), None, 0.6, 0, [], 0, "", rule(bob))
    assert "'passwd' is not one of your images or uploads" in info.value.message
    result = engine.generate(engine.default_request("a fox", width=64, height=64, steps=1, seed=3, owner="alice"))
    hers = result.wait_saved(30)[0]
    assert toolbox.request_fields(file_data(hers), None, 0.5, 0, [], 0, "", rule(alice))["image"] == hers
    with pytest.raises(Refused) as info:
        toolbox.request_fields({"background": file_data(hers), "layers": []}, None, 0.5, 0, [], 0, "", rule(bob))
    assert "is not one of your images" in info.value.message
    with pytest.raises(Refused):  # the mask is checked as well, with or without a source
        toolbox.request_fields(None, file_data(hers), 0.5, 0, [], 0, "", rule(bob))
    upload = tmp_path / "up.png"
    os.makedirs(get_upload_folder(), exist_ok=True)
    upload = os.path.join(get_upload_folder(), "zimage-toolbox-rule-test.png")
    source_image().save(upload)
    try:
        with pytest.raises(Refused):  # not granted to bob: an upload is its uploader's
            toolbox.request_fields(file_data(upload), None, 0.5, 0, [], 0, "", rule(bob))
        access.grant(upload, bob)
        assert toolbox.request_fields(file_data(upload), None, 0.5, 0, [], 0, "", rule(bob))["image"].endswith(
            "zimage-toolbox-rule-test.png"
        )
    finally:
        os.remove(upload)


def test_a_mask_without_a_source_is_refused_by_the_engine_in_a_sentence(tmp_path):
    from zimage.service.request import GenerationRequest, validate

    Image.new("L", (64, 64), 255).save(tmp_path / "m.png")
    fields = toolbox.request_fields(None, file_data(tmp_path / "m.png"), 0.6, 8, [], 0, "", allow_under(tmp_path))
    with pytest.raises(InvalidRequest) as info:
        validate(GenerationRequest(prompt="a cat", width=256, height=256, steps=2, **fields))
    assert "mask" in str(info.value) and "source image" in str(info.value)


def test_the_note_says_what_each_setting_does_for_the_case_at_hand(tmp_path):
    source_image().save(tmp_path / "bg.png")
    allow = allow_under(tmp_path)
    assert toolbox.explain(None, None, 0.6, 8, [], 256, True, 8, "en", allow) == ""
    assert "do nothing" in toolbox.explain(None, None, 0.6, 8, ["left"], 256, True, 8, "en", allow)
    plain = toolbox.explain({"background": file_data(tmp_path / "bg.png"), "layers": []}, None, 0.5, 8, [], 0, True, 8)
    assert "About 4 of 8 steps" in plain and "feather does nothing without one" in plain
    assert "width and height fields are not used" in plain
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(layer).rectangle((10, 10, 20, 20), fill=(255, 255, 255, 255))
    layer.save(tmp_path / "layer.png")
    painted = {"background": file_data(tmp_path / "bg.png"), "layers": [file_data(tmp_path / "layer.png")]}
    note = toolbox.explain(painted, None, 1.0, 8, ["top"], 32, False, 8, "zh-CN", allow)
    assert "局部重绘" in note and "32" in note and "宽度和高度" in note


def test_summary_and_lora_notes_are_honest_and_bilingual(engine):
    details = {
        "mode": "inpaint",
        "strength": 0.7,
        "source_sha256": "cd" * 32,
        "mask": True,
        "loras": [{"name": "style.safetensors", "weight": 0.5, "sha256": "ef" * 32}],
    }
    line = toolbox.summary_line(details)
    assert "inpaint · strength 0.7 · source sha256 cdcdcdcdcdcd" in line and "mask yes" in line
    assert "style.safetensors ×0.5 (efefefefefef" in line
    assert toolbox.summary_line({"seed": 1}) == ""
    note = toolbox.lora_note_md(engine)
    assert "weight 0 gives the same pixels as no LoRA" in note
    assert ("No LoRA files in" in note) == (not engine.loras.names())
    assert "权重 0" in toolbox.lora_note_md(engine, "zh-CN")


def test_a_reload_puts_back_the_toolbox_while_its_files_are_still_the_askers(tmp_path):
    source_image().save(tmp_path / "bg.png")
    editor = {"background": file_data(tmp_path / "bg.png"), "layers": [], "composite": None}
    form = {"tools": (editor, None, 0.3, 4, ["left"], 64, "a.safetensors:0.5"), "source_size": False}
    back = toolbox.reload(form, allow_under(tmp_path))
    assert back[0]["background"] == str(tmp_path / "bg.png") and back[2:] == [
        0.3,
        4,
        ["left"],
        64,
        "a.safetensors:0.5",
        False,
    ]
    gone = toolbox.reload(form, lambda path: False)  # swept from the cache, or not the asker's
    assert gone[0] == {"__type__": "update"} and gone[2] == 0.3
    assert toolbox.reload({}, allow_under(tmp_path)) == [{"__type__": "update"}] * toolbox.RELOADED


def test_use_this_result_and_the_picked_loras(tmp_path):
    assert toolbox._use_result([(str(tmp_path / "r.png"), "seed 1")]) == str(tmp_path / "r.png")
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
