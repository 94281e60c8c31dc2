"""Operations, the server's handle on the purge thread and the watchdog, on a real engine and real files."""

from __future__ import annotations

import json
import os
import stat
import tempfile
import time
from pathlib import Path

import pytest

from zimage.errors import SettingsError
from zimage.ops.operations import CHECKOUT, Operations, prepare_gradio_cache
from zimage.ops.watchdog import WATCHDOG_EXIT_CODE
from zimage.service.store import TMP_PREFIX

from .support import metric_value, wait_until

HOUR = 3600.0


def old_file(path, age_s=900 * HOUR, size=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (time.time() - age_s,) * 2)
    return path


def test_zimage_gets_a_gradio_cache_of_its_own(monkeypatch, tmp_path):
    """The folder is made (private), and Gradio is pointed at it: its own get_upload_folder() agrees."""
    from gradio.utils import get_upload_folder

    monkeypatch.setenv("GRADIO_TEMP_DIR", "/somewhere/else")
    folder = prepare_gradio_cache(tmp_path / "data" / "gradio")
    assert folder == (tmp_path / "data" / "gradio").resolve() and folder.is_dir()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert get_upload_folder() == str(folder)
    env: dict[str, str] = {}
    assert prepare_gradio_cache(folder, env) == folder and env == {"GRADIO_TEMP_DIR": str(folder)}


@pytest.mark.parametrize(
    "folder, message",
    [
        (Path(tempfile.gettempdir()) / "gradio", "Gradio's shared cache"),
        (Path(tempfile.gettempdir()), "the system's temp folder"),
        (Path.home(), "the home folder"),
        (Path("/"), "a folder above"),
        (CHECKOUT, "zimage's checkout"),
        (Path("/proc/nope"), "cannot create /proc/nope"),
    ],
)
def test_shared_or_impossible_gradio_cache_is_refused(folder, message):
    env: dict[str, str] = {}
    with pytest.raises(SettingsError, match="gradio_cache_dir") as info:
        prepare_gradio_cache(folder, env)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert env == {}  # Gradio is not pointed anywhere


def test_start_sweeps_temp_files_left_by_a_killed_writer(engine, make_settings, tmp_path):
    """kill -9 during a PNG write leaves .tmp-<name>.<pid>.<thread>: gone at start, even with the purge off."""
    outputs = tmp_path / "outputs"
    dead = old_file(outputs / f"{TMP_PREFIX}20250101-000000-000000-seed1.png.999999999.1", age_s=60)
    ancient = old_file(outputs / f"{TMP_PREFIX}20250101-000000-000000-seed2.png.{os.getpid()}.1", age_s=HOUR)
    live = old_file(outputs / f"{TMP_PREFIX}20250101-000000-000000-seed3.png.{os.getpid()}.2", age_s=1)
    other = old_file(outputs / ".tmp-notes.txt")  # not the store's name
    settings = make_settings(outputs_dir=str(outputs), purge_every_minutes=0)
    ops = Operations(engine, settings, lambda code: None, cache_dirs=[])
    ops.start()
    ops.stop()
    assert not dead.exists() and not ancient.exists()
    assert live.exists() and other.exists()


def test_start_purges_on_schedule_and_hooks_the_watchdog(engine, make_settings, tmp_path):
    outputs, cache = tmp_path / "outputs", tmp_path / "gradio"
    settings = make_settings(
        outputs_dir=str(outputs), purge_every_minutes=0.002, purge_max_age_hours=1, watchdog_reserved_gib=20
    )
    exits = []
    ops = Operations(engine, settings, exits.append, cache_dirs=[cache])
    before = engine.metrics.render().decode()
    ops.start()
    ops.start()  # the server may call it twice: still one thread, one listener
    try:
        assert engine.job_listeners.count(ops.watchdog) == 1
        first = old_file(outputs / "20250101-000000-000000-seed1.png")
        cached = old_file(cache / ("d" * 64) / "image.webp")
        wait_until(lambda: not first.exists() and not cached.exists(), 15)
        second = old_file(outputs / "20250101-000000-000001-seed2.png")  # a later run takes it too
        wait_until(lambda: not second.exists(), 15)
        status = ops.status()
        json.dumps(status)  # plain data, ready for the panel
        assert all(v is None or isinstance(v, (str, int, float, bool)) for v in status.values())
        assert status["purge"] == "every 0.002 min: remove older than 1 h, more than 5000 files, more than 20 GiB"
        assert status["purge_folders"] == f"{outputs.resolve()}, {cache.resolve()}"
        assert ": ok, removed" in status["purge_last_run"] and status["purge_next_run"]
        assert "0 with errors" in status["purge_totals"]
        assert "stays above 20 GiB for 3 job(s)" in status["watchdog"] and status["watchdog_exiting"] is False
        assert ops.purger.status()["running"] and ops.purger.totals["files"] >= 3
        assert ops.watchdog.status()["threshold_gib"] == 20
    finally:
        t0 = time.perf_counter()
        ops.stop()
        stopped_in = time.perf_counter() - t0
    assert stopped_in < 2.5 and not ops.purger.running
    assert ops.watchdog not in engine.job_listeners
    after = engine.metrics.render().decode()
    purged = metric_value(after, "zimage_purged_files_total") - (metric_value(before, "zimage_purged_files_total") or 0)
    assert purged >= 3
    assert exits == []  # CPU: no VRAM readings, no exit


def test_purge_every_zero_means_never_but_a_run_still_works(engine, make_settings, tmp_path):
    settings = make_settings(
        outputs_dir=str(tmp_path / "out"),
        purge_every_minutes=0,
        purge_max_age_hours=1,
        gradio_cache_dir=str(tmp_path / "gr"),
    )
    ops = Operations(engine, settings, lambda code: None)  # cache_dirs None: zimage's own Gradio cache
    ops.start()
    try:
        assert not ops.purger.running and ops.status()["purge"] == "off"
        assert ops.status()["purge_last_run"] == "never (purge_every_minutes = 0)"
        assert ops.purger.status()["folders"][1] == str((tmp_path / "gr").resolve())
        old = old_file(tmp_path / "out" / "20250101-000000-000000-seed1.png")
        cached = old_file(tmp_path / "gr" / ("e" * 64) / "image.webp")
        report = ops.purger.run_once().as_dict()
        assert report["files"] == 2 and not old.exists() and not cached.exists()
        status = ops.status()
        assert status["purge_last_removed"] == "20250101-000000-000000-seed1.png, image.webp"
        assert status["purge_totals"] == "1 run(s), 0 with errors; 2 file(s), 200 B removed"
        assert ": ok, removed 2 file(s), 200 B, in " in status["purge_last_run"] and status["purge_next_run"] is None
        assert status["watchdog"] == f"exit {WATCHDOG_EXIT_CODE} on an unrecoverable CUDA error; memory check off"
    finally:
        ops.stop()
