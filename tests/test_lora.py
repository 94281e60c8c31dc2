"""LoRAs on the tiny model (CPU), with tiny LoRA files made here in the real key layouts
(diffusers/peft `transformer.<layer>.lora_A.weight`, kohya `lora_unet_<layer>.lora_down.weight` +
`.alpha`): weights, switching (adapters and hot-swap), streaming modes, bad files, metadata."""

import hashlib

import numpy as np
import pytest
import torch

from zimage.errors import BadLora
from zimage.model.lora import linear_layers
from zimage.model.lora_random import random_lora, save_lora
from zimage.service.engine import Engine
from zimage.service.request import GenerationRequest

from .support import pixels

BAD_FILES = {
    "missing.safetensors": "no such file",
    "garbage.safetensors": "not a readable safetensors file",
    "weights.ckpt": "only .safetensors files",
    "wrongkeys.safetensors": "which this model does not have",
    "wrongshape.safetensors": "is 32->32 here but the LoRA's is 48->32",
    "nan.safetensors": "NaN or infinite",
    "notlora.safetensors": "is not a LoRA weight",
    "unpaired.safetensors": "without its partner",
    "textonly.safetensors": "no LoRA weights for the Z-Image transformer",
}


@pytest.fixture(scope="module")
def layers(engine):
    return linear_layers(engine.pipe.transformer)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, layers):
    folder = tmp_path_factory.mktemp("loras")
    save_lora(random_lora(layers, rank=4, seed=1, scale=2.0), folder / "a.safetensors")
    kohya = random_lora(layers, rank=6, seed=2, scale=2.0, layout="kohya", alpha=3.0, targets=("feed_forward.w1",))
    save_lora(kohya, folder / "b.safetensors")
    # b as diffusers writes it: the same draws, alpha/rank = 0.5 folded into A
    plain = random_lora(layers, rank=6, seed=2, scale=2.0, targets=("feed_forward.w1",))
    plain = {k: v * 0.5 if ".lora_A." in k else v for k, v in plain.items()}
    save_lora(plain, folder / "b_diffusers.safetensors")
    save_lora(random_lora(layers, rank=4, seed=5, targets=("feed_forward.w1",)), folder / "c.safetensors")
    (folder / "garbage.safetensors").write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    (folder / "weights.ckpt").write_bytes(b"pickle")
    save_lora(
        {
            "transformer.layers.7.attention.to_q.lora_A.weight": torch.zeros(4, 32),
            "transformer.layers.7.attention.to_q.lora_B.weight": torch.zeros(32, 4),
        },
        folder / "wrongkeys.safetensors",
    )
    save_lora(
        {
            "transformer.layers.0.attention.to_q.lora_A.weight": torch.zeros(4, 48),
            "transformer.layers.0.attention.to_q.lora_B.weight": torch.zeros(32, 4),
        },
        folder / "wrongshape.safetensors",
    )
    nan = random_lora(layers, rank=2, seed=3)
    next(iter(nan.values()))[0, 0] = float("nan")
    save_lora(nan, folder / "nan.safetensors")
    save_lora({"transformer.layers.0.attention.to_q.weight": torch.zeros(32, 32)}, folder / "notlora.safetensors")
    save_lora(
        {"transformer.layers.0.attention.to_q.lora_A.weight": torch.zeros(4, 32)}, folder / "unpaired.safetensors"
    )
    save_lora(
        {
            "text_encoder.layers.0.q_proj.lora_A.weight": torch.zeros(4, 16),
            "text_encoder.layers.0.q_proj.lora_B.weight": torch.zeros(16, 4),
        },
        folder / "textonly.safetensors",
    )
    return folder


def make_engine(make_settings, lora_dir, **kw):
    eng = Engine(make_settings(lora_dir=str(lora_dir), **kw))
    eng.load()
    return eng


@pytest.fixture(scope="module")
def adapters(make_settings, lora_dir):
    eng = make_engine(make_settings, lora_dir, lora_mode="adapters")
    yield eng
    eng.shutdown(grace_s=5)


@pytest.fixture(scope="module")
def hotswap(make_settings, lora_dir):
    eng = make_engine(make_settings, lora_dir, lora_mode="hotswap", lora_max_rank=10)
    yield eng
    eng.shutdown(grace_s=5)


def gen(engine, loras=(), **kw):
    base = dict(prompt="a lighthouse", width=64, height=64, steps=2, seed=4, loras=tuple(loras))
    base.update(kw)
    return engine.generate(GenerationRequest(**base), save=False)


def px(engine, loras=(), **kw):
    return pixels(gen(engine, loras, **kw).images[0])


def base_weights_digest(transformer) -> str:
    h = hashlib.sha256()
    for name, p in sorted(transformer.state_dict().items()):
        if ".lora_" not in name:
            h.update(name.replace(".base_layer", "").encode())
            h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def test_weight_zero_equals_no_lora_and_a_weight_changes_the_pixels(adapters, hotswap):
    for eng in (adapters, hotswap):
        plain = px(eng)
        assert np.array_equal(px(eng, [("a.safetensors", 0.0)]), plain)
        with_a = px(eng, [("a.safetensors", 1.0)])
        assert np.abs(with_a - plain).mean() > 1
        assert np.array_equal(px(eng), plain)  # and off again


def test_hot_swapping_gives_the_pixels_of_each_lora_loaded_fresh(hotswap, adapters):
    fresh_b = px(hotswap, [("b.safetensors", 1.0)])  # first LoRA in the slot
    with_a = px(hotswap, [("a.safetensors", 0.8)])
    swapped_b = px(hotswap, [("b.safetensors", 1.0)])
    assert np.array_equal(swapped_b, fresh_b)
    assert np.abs(with_a - fresh_b).mean() > 1
    # the same LoRA through diffusers' own adapters, loaded on their own
    assert np.abs(px(adapters, [("b.safetensors", 1.0)]) - fresh_b).max() <= 1
    assert np.abs(px(adapters, [("a.safetensors", 0.8)]) - with_a).max() <= 1
    both = [("a.safetensors", 0.7), ("b.safetensors", -0.5)]
    together = px(hotswap, both)
    assert np.abs(px(adapters, both) - together).max() <= 1
    assert np.abs(together - with_a).mean() > 0.5


def test_kohya_layout_with_alpha_equals_the_diffusers_layout(adapters):
    kohya = px(adapters, [("b", 1.0)])  # the name without .safetensors works too
    assert np.abs(px(adapters, [("b_diffusers.safetensors", 1.0)]) - kohya).max() <= 1


def test_a_bad_file_is_refused_with_its_name_and_why_and_nothing_changes(adapters):
    before_px, before_w = px(adapters), base_weights_digest(adapters.pipe.transformer)
    for name, why in BAD_FILES.items():
        with pytest.raises(BadLora) as info:
            gen(adapters, [("a.safetensors", 1.0), (name, 1.0)])
        message = str(info.value)
        assert name in message and why in message, message
        assert "Traceback" not in message and message.endswith((".", ")")), message
    assert base_weights_digest(adapters.pipe.transformer) == before_w
    assert np.array_equal(px(adapters), before_px)


def test_ranks_beyond_the_hotswap_slot_are_refused_and_the_slot_keeps_serving(hotswap):
    before = px(hotswap, [("a.safetensors", 1.0)])
    with pytest.raises(BadLora) as info:
        gen(hotswap, [("a.safetensors", 1.0), ("b.safetensors", 1.0), ("c.safetensors", 1.0)])  # 4 + 6 + 4 > 10
    assert "lora_max_rank=10" in str(info.value) and "rank 14" in str(info.value)
    assert np.array_equal(px(hotswap, [("a.safetensors", 1.0)]), before)


def test_metadata_records_each_lora_and_restores_the_ones_present(adapters, lora_dir, tmp_path):
    from zimage.service.store import read_parameters, write_png

    result = gen(adapters, [("a.safetensors", 0.75)])
    meta = result.metadata(result.seeds[0])
    digest = hashlib.sha256((lora_dir / "a.safetensors").read_bytes()).hexdigest()
    assert meta["loras"] == [{"name": "a.safetensors", "weight": 0.75, "sha256": digest}]
    back = read_parameters(write_png(result.images[0], tmp_path / "l.png", meta))
    found, notes = adapters.loras.restore(back["loras"] + [{"name": "gone.safetensors", "weight": 1, "sha256": "0"}])
    assert found == [("a.safetensors", 0.75)]
    assert any("gone.safetensors" in n and "left out" in n for n in notes)
    renamed, notes = adapters.loras.restore([{"name": "old-name.safetensors", "weight": 0.5, "sha256": digest}])
    assert renamed == [("a.safetensors", 0.5)] and "same file" in notes[0]


def test_the_library_lists_the_folder(adapters):
    names = adapters.loras.names()
    assert {"a.safetensors", "b.safetensors", "garbage.safetensors"} <= set(names)
    assert "weights.ckpt" not in names


def test_streaming_mode_loads_switches_and_evicts_adapters(make_settings, lora_dir, adapters):
    """lowvram on the CPU runs diffusers' group-offload hooks (CPU to CPU): adapters load under them,
    and an evicted adapter's hooks are renewed."""
    eng = make_engine(make_settings, lora_dir, memory_mode="lowvram", lora_mode="adapters", lora_cache=1)
    try:
        assert str(eng.plan.mode) == "lowvram"
        for name in ("a.safetensors", "b.safetensors", "a.safetensors"):
            assert np.abs(px(eng, [(name, 1.0)]) - px(adapters, [(name, 1.0)])).max() <= 1
        assert len(eng.runner.loras._loaded) == 1
        assert np.abs(px(eng) - px(adapters)).max() <= 1
    finally:
        eng.shutdown(grace_s=5)


@pytest.mark.slow
def test_with_compile_switching_loras_recompiles_nothing(make_settings, lora_dir):
    """Regional compile on the CPU (Inductor): the slot is made before the first compiled run, so
    swapping LoRAs (and going back to none) adds no graph."""
    from torch._dynamo.utils import counters

    eng = make_engine(make_settings, lora_dir, compile="regional")
    try:
        assert eng.runner.loras.mode == "hotswap"
        if eng.compiler is not None:  # the compile beside serving: its graphs are made before we count
            eng.compiler.wait()
        plain = px(eng)
        graphs = counters["stats"]["unique_graphs"]
        outs = [px(eng, [(n, 1.0)]) for n in ("a.safetensors", "b.safetensors", "a.safetensors")]
        assert counters["stats"]["unique_graphs"] == graphs
        assert np.array_equal(outs[0], outs[2]) and np.abs(outs[0] - outs[1]).mean() > 1
        assert np.array_equal(px(eng), plain)
    finally:
        eng.shutdown(grace_s=5)


def test_a_bad_lora_error_crosses_process_boundaries_as_itself():
    """A replica in a child process (or Ray) sends its error back: rebuilt from the message, or pickled."""
    import pickle

    error = BadLora("x.safetensors", "it holds no LoRA weights for the Z-Image transformer.")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is BadLora and str(again) == str(error) == str(BadLora(str(error)))
    assert "x.safetensors" in str(error) and again.field == "loras"


def test_lora_files_outside_the_folder_are_offered_by_name_in_every_library(tmp_path, make_settings):
    """settings.lora_files reach each replica's own library (in any process): `generate --lora PATH`."""
    from zimage.model.lora import LoraLibrary

    outside = tmp_path / "elsewhere" / "style.safetensors"
    outside.parent.mkdir()
    outside.write_bytes(b"x")
    settings = make_settings(lora_dir=str(tmp_path / "loras"), lora_files=(str(outside),))
    for library in (LoraLibrary.from_settings(settings), LoraLibrary.from_settings(settings)):
        assert library.names() == ["style.safetensors"] and library.resolve("style.safetensors") == outside.resolve()
