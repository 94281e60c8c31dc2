"""Parameters of other tools' PNGs: the A1111-style `parameters` text into our fields."""

from __future__ import annotations

from zimage.service.store import parameters_text, parse_a1111, read_parameters

A1111 = """masterpiece, a cozy cabin in the snow, (warm light:1.2)
at night
Negative prompt: blurry, lowres,
bad hands
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, Size: 832x1216, Model hash: 6ce0161689, Model: sdxl_base, Lora hashes: "detail: 1a2b, style: 3c4d", Version: v1.10.1"""


def test_an_a1111_text_fills_our_fields():
    got = parse_a1111(A1111)
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
    # Forge writes Shift for flow models; a broken value is skipped, not fatal
    got = parse_a1111("a cat\nSteps: 8, Seed: x1, Shift: 3.5, Size: 1024x768")
    assert got == {"prompt": "a cat", "steps": 8, "shift": 3.5, "width": 1024, "height": 768}


def test_our_own_text_reads_back(tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    meta = {"prompt": "一只猫\nsecond line", "negative_prompt": "dogs", "seed": 7, "width": 256, "height": 192}
    meta |= {"steps": 8, "guidance": 0.0, "model": "tiny", "shift": 4.0}
    assert parse_a1111(parameters_text(meta)) == {k: v for k, v in meta.items()}
    # a PNG that carries only the text (no zimage JSON), as other tools write it
    info = PngInfo()
    info.add_text("parameters", A1111)
    path = tmp_path / "other.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    assert read_parameters(path)["seed"] == 3141592653
