"""Parameters of other tools' PNGs: the A1111-style `parameters` text into our fields, typed and
checked by clean_parameters like our own."""

from __future__ import annotations

from zimage.service.pngmeta import clean_parameters, parse_a1111, read_parameters_checked
from zimage.service.store import parameters_text

A1111 = """masterpiece, a cozy cabin in the snow, (warm light:1.2)
at night
Negative prompt: blurry, lowres,
bad hands
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, Size: 832x1216, Model hash: 6ce0161689, Model: sdxl_base, Lora hashes: "detail: 1a2b, style: 3c4d", Version: v1.10.1"""


def test_an_a1111_text_fills_our_fields():
    got, dropped = clean_parameters(parse_a1111(A1111))
    assert dropped == []
    assert got == {
        "prompt": "masterpiece, a cozy cabin in the snow, (warm light:1.2)\nat night",
        "negative_prompt": "blurry, lowres,\nbad hands",
        "steps": 28,
        "guidance": 6.5,
        "seed": 3141592653,
        "width": 832,
        "height": 1216,
        "model": "sdxl_base",
    }


def test_a_prompt_without_a_parameters_line_is_all_prompt():
    assert parse_a1111("just a prompt, with commas: and a colon") == {
        "prompt": "just a prompt, with commas: and a colon"
    }
    assert parse_a1111("") == {}
    # Forge writes Shift for flow models; a broken value is left out and named
    got, dropped = clean_parameters(parse_a1111("a cat\nSteps: 8, Seed: x1, Shift: 3.5, Size: 1024x768"))
    assert got == {"prompt": "a cat", "steps": 8, "shift": 3.5, "width": 1024, "height": 768}
    assert dropped == ["seed ('x1')"]


def test_our_own_text_reads_back_and_other_tools_pngs_load(tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    meta = {"prompt": "一只猫\nsecond line", "negative_prompt": "dogs", "seed": 7, "width": 256, "height": 192}
    meta |= {"steps": 8, "guidance": 0.0, "model": "tiny", "shift": 4.0}
    assert clean_parameters(parse_a1111(parameters_text(meta)))[0] == meta
    # a PNG that carries only the text (no zimage JSON), as other tools write it
    info = PngInfo()
    info.add_text("parameters", A1111)
    path = tmp_path / "other.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    params, dropped = read_parameters_checked(path)
    assert params["seed"] == 3141592653 and params["width"] == 832 and dropped == []
