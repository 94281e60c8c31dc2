"""Output files: metadata round-trip, atomic writes, names that sort by time and carry the seed."""

import json
import re
import threading
import time

import pytest
from PIL import Image

from zimage.service.store import TMP_PREFIX, OutputStore, output_name, parameters_text, read_parameters, write_png

META = {
    "prompt": "a lighthouse, 灯塔\nsecond line",
    "negative_prompt": "blurry",
    "seed": 4242,
    "width": 64,
    "height": 48,
    "steps": 8,
    "guidance": 2.5,
    "model": "tiny",
    "memory_mode": "cpu",
    "timings": {"total_s": 0.12, "text_encoder_s": 0.01},
}


def image(w=64, h=48, value=120):
    return Image.new("RGB", (w, h), (value, 10, 200))


def test_metadata_round_trip(tmp_path):
    path = write_png(image(), tmp_path / "a.png", META)
    assert read_parameters(path) == json.loads(json.dumps(META))
    with Image.open(path) as im:
        assert "Seed: 4242" in im.text["parameters"] and "Negative prompt: blurry" in im.text["parameters"]
        assert im.size == (64, 48)


def test_text_chunk_alone_is_enough(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters_text(META))
    path = tmp_path / "only-text.png"
    image().save(path, pnginfo=info)
    got = read_parameters(path)
    assert got["seed"] == 4242 and got["width"] == 64 and got["steps"] == 8 and got["guidance"] == 2.5
    assert got["prompt"] == META["prompt"] and got["negative_prompt"] == "blurry"


def test_privacy_option_writes_no_metadata(tmp_path):
    store = OutputStore(tmp_path, metadata=False)
    paths, _ = store.save([image()], [META])
    assert read_parameters(paths[0]) == {}
    with Image.open(paths[0]) as im:
        assert "parameters" not in im.info and "zimage" not in im.info


def test_foreign_png_has_no_parameters(tmp_path):
    path = tmp_path / "plain.png"
    image().save(path)
    assert read_parameters(path) == {}


def test_names_sort_by_time_and_carry_seed(tmp_path):
    name = output_name(17)
    assert re.fullmatch(r"\d{8}-\d{6}-\d{6}-seed17\.png", name)
    store = OutputStore(tmp_path)
    first, _ = store.save([image()], [dict(META, seed=5)])
    time.sleep(0.002)
    second, _ = store.save([image()], [dict(META, seed=3)])
    assert [p.name for p in store.history()] == [second[0].split("/")[-1], first[0].split("/")[-1]]


def test_same_seed_same_instant_never_collides(tmp_path):
    store = OutputStore(tmp_path)
    futures = [store.save_async([image(value=i)], [dict(META, seed=1)]) for i in range(12)]
    paths = [f.result()[0] for f in futures]
    assert len(set(paths)) == 12


def test_write_is_atomic(tmp_path):
    """A reader never sees a partial file under the final name: it is renamed into place."""
    target = tmp_path / "big.png"
    big = Image.effect_noise((1024, 1024), 64).convert("RGB")
    seen_partial = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if target.exists():
                try:
                    with Image.open(target) as im:
                        im.load()
                except Exception as exc:  # noqa: BLE001
                    seen_partial.append(exc)
                return

    t = threading.Thread(target=watch)
    t.start()
    write_png(big, target, META, compress_level=9)
    stop.set()
    t.join()
    assert not seen_partial
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_failed_write_leaves_nothing(tmp_path):
    class Broken:
        def save(self, f, **kw):
            f.write(b"partial")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):  # the caller hears of it
        write_png(Broken(), tmp_path / "x.png", META)
    assert list(tmp_path.iterdir()) == []


def test_history_ignores_temp_and_other_files(tmp_path):
    store = OutputStore(tmp_path)
    store.save([image()], [META])
    (tmp_path / f"{TMP_PREFIX}half.png.1.2").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    assert len(store.history()) == 1
