"""The purge thread on real files: ages, caps oldest first, symlinks, files being written, errors."""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from zimage.ops.metrics import EngineMetrics
from zimage.ops.purge import FileInfo, PurgePolicy, Purger, choose
from zimage.service.store import TMP_PREFIX, OutputStore, is_output_name, output_name

from .support import wait_until

HOUR = 3600.0
NOW = time.time()


def make(folder: Path, name: str, age_s: float, size: int = 100) -> Path:
    """A real file of `size` bytes, last modified `age_s` seconds ago."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    when = time.time() - age_s
    os.utime(path, (when, when))
    return path


def out_name(i: int, age_s: float = 0) -> str:
    """An output name as the store makes it; i keeps names distinct."""
    return output_name(i, datetime(2026, 1, 1) + timedelta(seconds=i) - timedelta(seconds=age_s))


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ------------------------------------------------------------------------------------------


def test_store_names_are_purge_candidates(tmp_path):
    assert is_output_name(output_name(0))
    assert is_output_name(output_name(2**32 - 1, datetime(2026, 11, 21, 17, 45, 1, 123)))
    assert is_output_name("20260101-000000-000000-seed7~2.png")  # two in one microsecond, one seed
    for other in ("photo.png", ".tmp-20260101-000000-000000-seed7.png.1.2", "20260101-seed7.png", "a.txt"):
        assert not is_output_name(other)


def test_real_store_outputs_are_purged(tmp_path):
    from PIL import Image

    store = OutputStore(tmp_path)
    try:
        paths, _ = store.save([Image.new("RGB", (8, 8))] * 3, [{"seed": s} for s in (1, 2, 2)])
    finally:
        store.close()
    for p in paths:
        os.utime(p, (NOW - 10 * HOUR, NOW - 10 * HOUR))
    report = Purger(tmp_path, policy=PurgePolicy(max_age_s=HOUR)).run_once()
    assert report.files == 3 and names(tmp_path) == set()


def test_old_files_removed_recent_kept(tmp_path):
    old = [make(tmp_path, out_name(i), 50 * HOUR) for i in range(3)]
    new = [make(tmp_path, out_name(10 + i), 2 * HOUR) for i in range(2)]
    metrics = EngineMetrics()
    purger = Purger(tmp_path, policy=PurgePolicy(max_age_s=24 * HOUR), metrics=metrics)
    report = purger.run_once()
    assert names(tmp_path) == {p.name for p in new}
    assert (report.outcome, report.files, report.bytes, report.by_reason) == ("ok", 3, 300, {"age": 3})
    assert sorted(report.removed) == sorted(str(p.resolve()) for p in old)
    text = metrics.render().decode()
    assert 'zimage_purge_runs_total{outcome="ok"} 1.0' in text
    assert "zimage_purged_files_total 3.0" in text and "zimage_purged_bytes_total 300.0" in text
    status = purger.status()
    assert status["last"]["files"] == 3 and status["totals"] == {
        "runs": 1,
        "errors": 0,
        "files": 3,
        "bytes": 300,
        "dirs": 0,
    }


def test_count_cap_removes_oldest_first(tmp_path):
    files = [make(tmp_path, out_name(i), (20 - i) * 60) for i in range(10)]  # files[0] is the oldest
    report = Purger(tmp_path, policy=PurgePolicy(max_count=4)).run_once()
    assert names(tmp_path) == {p.name for p in files[6:]}
    assert report.by_reason == {"count": 6}


def test_size_cap_removes_oldest_first(tmp_path):
    files = [make(tmp_path, out_name(i), (20 - i) * 60, size=1000) for i in range(10)]
    report = Purger(tmp_path, policy=PurgePolicy(max_bytes=3500)).run_once()
    assert names(tmp_path) == {p.name for p in files[7:]}  # 3000 bytes <= 3500
    assert (report.files, report.bytes, report.by_reason) == (7, 7000, {"size": 7})


def test_age_then_count_then_size(tmp_path):
    ancient = make(tmp_path, out_name(0), 100 * HOUR, size=10)
    mid = [make(tmp_path, out_name(1 + i), (10 - i) * 60, size=400) for i in range(6)]
    report = Purger(tmp_path, policy=PurgePolicy(max_age_s=HOUR, max_count=5, max_bytes=1300)).run_once()
    assert not ancient.exists()
    assert names(tmp_path) == {p.name for p in mid[3:]}
    assert report.by_reason == {"age": 1, "count": 1, "size": 2}


def test_only_zimage_outputs_are_touched(tmp_path):
    """A mis-set outputs_dir (a home folder, '.') must not cost anyone their files."""
    keep = [
        make(tmp_path, "holiday.png", 900 * HOUR),
        make(tmp_path, "notes.txt", 900 * HOUR),
        make(tmp_path, os.sep.join(["sub", "deeper", out_name(1)]), 900 * HOUR),  # never below users' folders
        make(tmp_path, out_name(2).replace(".png", ".jpg"), 900 * HOUR),
    ]
    (tmp_path / out_name(3)).mkdir()  # a folder named like an output
    gone = make(tmp_path, out_name(4), 900 * HOUR)
    Purger(tmp_path, policy=PurgePolicy(max_age_s=HOUR, max_count=1, max_bytes=1)).run_once()
    assert all(p.exists() for p in keep) and (tmp_path / out_name(3)).is_dir()
    assert not gone.exists()


def test_symlink_to_outside_file_is_not_followed(tmp_path):
    outputs, outside = tmp_path / "outputs", tmp_path / "precious"
    outputs.mkdir()
    target = make(outside, out_name(1), 900 * HOUR, size=5000)
    link = outputs / out_name(2)
    link.symlink_to(target)
    os.utime(link, (NOW - 900 * HOUR,) * 2, follow_symlinks=False)
    dir_link = outputs / "linked"
    dir_link.symlink_to(outside, target_is_directory=True)
    real = make(outputs, out_name(3), 900 * HOUR)
    report = Purger(outputs, policy=PurgePolicy(max_age_s=HOUR, max_count=1, max_bytes=1)).run_once()
    assert target.exists() and target.stat().st_size == 5000
    assert link.is_symlink() and dir_link.is_symlink()  # links are neither followed nor removed
    assert not real.exists()
    assert report.files == 1 and report.bytes == 100  # the link's target is not counted either


def test_outputs_folder_swapped_for_a_symlink_is_not_followed(tmp_path):
    outputs, outside = tmp_path / "outputs", tmp_path / "elsewhere"
    outputs.mkdir()
    purger = Purger(outputs, policy=PurgePolicy(max_age_s=HOUR))  # resolved here, once
    victim = make(outside, out_name(1), 900 * HOUR)
    outputs.rmdir()
    outputs.symlink_to(outside, target_is_directory=True)
    report = purger.run_once()
    assert victim.exists()
    assert report.outcome == "error" and report.files == 0


def test_symlinked_outputs_dir_given_by_the_user_is_resolved_once(tmp_path):
    """outputs_dir may itself be a link the operator made (to a bigger disk): that is followed, once."""
    real, link = tmp_path / "disk", tmp_path / "outputs"
    old = make(real, out_name(1), 900 * HOUR)
    link.symlink_to(real, target_is_directory=True)
    purger = Purger(link, policy=PurgePolicy(max_age_s=HOUR))
    assert purger.outputs_dir == real.resolve()
    assert purger.run_once().files == 1 and not old.exists()


def test_files_being_written_are_spared(tmp_path):
    # the store's temp name, written by this (live) process a moment ago
    tmp_file = make(tmp_path, f"{TMP_PREFIX}{out_name(1)}.png.{os.getpid()}.456", 2)
    fresh = make(tmp_path, out_name(2), 1)  # just renamed into place
    future = make(tmp_path, out_name(3), -HOUR)  # clock skew: dated in the future
    old = [make(tmp_path, out_name(10 + i), 900 * HOUR) for i in range(3)]
    report = Purger(tmp_path, policy=PurgePolicy(max_age_s=HOUR, max_count=1, max_bytes=1)).run_once()
    assert tmp_file.exists() and fresh.exists() and future.exists()
    assert not any(p.exists() for p in old)
    assert report.files == 3


def test_stale_temp_files_are_swept_whatever_the_limits(tmp_path):
    """A kill -9 during a PNG write leaves the temp file: removed once its writer is gone or it is old."""
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # a process that has exited
    dead = make(tmp_path, f"{TMP_PREFIX}{out_name(1)}.{dead_pid}.7", 30)
    ancient = make(tmp_path, f"{TMP_PREFIX}{out_name(2)}.{os.getpid()}.7", 2 * HOUR)  # ours, but abandoned
    dead_but_young = make(tmp_path, f"{TMP_PREFIX}{out_name(3)}.{dead_pid}.8", 1)  # may be another box's
    writing = make(tmp_path, f"{TMP_PREFIX}{out_name(4)}.{os.getpid()}.9", 60)  # this process, still writing
    not_ours = make(tmp_path, f"{TMP_PREFIX}holiday.jpg", 900 * HOUR)  # no pid, no thread: not our name
    outside = make(tmp_path / "elsewhere", "precious.png", 900 * HOUR)
    link = tmp_path / f"{TMP_PREFIX}{out_name(5)}.{dead_pid}.1"
    link.symlink_to(outside)
    os.utime(link, (NOW - 900 * HOUR,) * 2, follow_symlinks=False)
    kept = make(tmp_path, out_name(6), 900 * HOUR)
    report = Purger(tmp_path, policy=PurgePolicy()).run_once()  # no limits at all
    assert not dead.exists() and not ancient.exists()
    assert dead_but_young.exists() and writing.exists() and not_ours.exists() and kept.exists()
    assert link.is_symlink() and outside.exists()
    assert report.by_reason == {"stale temp": 2} and report.outcome == "ok"
    # the start-up sweep, alone (the purge thread may be off)
    again = make(tmp_path, f"{TMP_PREFIX}{out_name(7)}.{dead_pid}.3", 30)
    assert Purger(tmp_path, policy=PurgePolicy()).sweep_temp_files() == 1 and not again.exists()


def test_a_file_written_during_purges_is_never_removed(tmp_path):
    """A writer appends to an old-named file while purge runs back to back with every cap at its tightest."""
    path = make(tmp_path, out_name(1), 900 * HOUR)
    purger = Purger(tmp_path, policy=PurgePolicy(max_age_s=1, max_count=1, max_bytes=1, fresh_s=5.0))
    stop = threading.Event()

    def writer():
        with open(path, "ab") as f:
            while not stop.is_set():
                f.write(b"y" * 1000)
                f.flush()
                time.sleep(0.02)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_until(lambda: path.stat().st_size > 100)  # the writer has begun
        for _ in range(20):
            assert purger.run_once().files == 0
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join()
    assert path.exists() and path.stat().st_size > 100


def test_gradio_cache_is_cleaned_by_its_layout(tmp_path):
    outputs, cache = tmp_path / "outputs", tmp_path / "gradio"
    outputs.mkdir()
    h = [f"{i:064x}" for i in range(1, 6)]
    old = make(cache, f"{h[0]}/image.webp", 900 * HOUR)
    old_upload = make(cache, f"{h[1]}/my photo.png", 900 * HOUR)
    fresh = make(cache, f"{h[2]}/image.webp", 1)
    staging = make(cache, f"{h[2]}/.image.webp.abc123", 900 * HOUR)
    (cache / h[3]).mkdir()  # empty and old: removed
    os.utime(cache / h[3], (NOW - 900 * HOUR,) * 2)
    (cache / h[4]).mkdir()  # empty but just made: Gradio is about to write into it
    root_file = make(cache, "tmpabc123", 900 * HOUR)  # an upload in progress sits at the root
    other_dir = make(cache, "not-a-hash/x.webp", 900 * HOUR)
    report = Purger(outputs, [cache], PurgePolicy(max_age_s=HOUR)).run_once()
    assert not old.exists() and not old_upload.exists()
    assert fresh.exists() and staging.exists() and root_file.exists() and other_dir.exists()
    assert not (cache / h[3]).exists() and (cache / h[4]).is_dir()
    assert report.files == 2 and report.dirs == 1
    # The folders emptied by this run go on the next run, once they have been left alone.
    report = Purger(outputs, [cache], PurgePolicy(max_age_s=HOUR), metrics=None).run_once(now=time.time() + 60)
    assert not (cache / h[0]).exists() and not (cache / h[1]).exists() and report.dirs >= 2


def test_gradio_cache_symlinked_hash_folder_is_not_followed(tmp_path):
    outputs, cache, outside = tmp_path / "outputs", tmp_path / "gradio", tmp_path / "precious"
    outputs.mkdir()
    cache.mkdir()
    victim = make(outside, "image.webp", 900 * HOUR)
    (cache / ("a" * 64)).symlink_to(outside, target_is_directory=True)
    (cache / ("b" * 64)).mkdir()
    (cache / ("b" * 64) / "image.webp").symlink_to(victim)
    Purger(outputs, [cache], PurgePolicy(max_age_s=HOUR, max_count=1, max_bytes=1)).run_once()
    assert victim.exists() and (cache / ("a" * 64)).is_symlink() and (cache / ("b" * 64) / "image.webp").is_symlink()


def test_missing_folders_are_not_an_error(tmp_path):
    report = Purger(tmp_path / "not-yet", [tmp_path / "nor-this"], PurgePolicy(max_age_s=HOUR)).run_once()
    assert report.outcome == "ok" and report.files == 0


def test_an_error_in_one_run_does_not_stop_the_next(tmp_path):
    """The real thread: the first runs fail (the outputs path is a file), later runs work again."""
    outputs = tmp_path / "outputs"
    outputs.write_text("not a folder")
    metrics = EngineMetrics()
    purger = Purger(outputs, policy=PurgePolicy(max_age_s=HOUR), every_s=0.1, metrics=metrics)
    assert purger.start()
    try:
        wait_until(lambda: purger.totals["errors"] >= 2)
        assert purger.last.outcome == "error" and "outputs" in purger.last.errors[0]
        outputs.unlink()
        old = make(outputs, out_name(1), 900 * HOUR)
        wait_until(lambda: not old.exists())
        wait_until(lambda: purger.last.outcome == "ok")
    finally:
        purger.stop()
    assert not purger.running
    text = metrics.render().decode()
    assert 'zimage_purge_runs_total{outcome="error"}' in text and "zimage_purged_files_total 1.0" in text
    assert purger.status()["totals"]["files"] == 1


def test_an_error_in_one_folder_does_not_stop_the_others(tmp_path):
    outputs, cache = tmp_path / "outputs", tmp_path / "gradio"
    outputs.write_text("not a folder")
    old = make(cache, f"{'c' * 64}/image.webp", 900 * HOUR)
    report = Purger(outputs, [cache], PurgePolicy(max_age_s=HOUR)).run_once()
    assert report.outcome == "error" and not old.exists() and report.files == 1


def test_stop_is_prompt_and_zero_means_never(tmp_path):
    purger = Purger(tmp_path, policy=PurgePolicy(max_age_s=HOUR), every_s=3600)
    assert purger.start()
    wait_until(lambda: purger.last is not None)
    t0 = time.perf_counter()
    purger.stop()
    assert time.perf_counter() - t0 < 1.0 and not purger.running
    never = Purger(tmp_path, policy=PurgePolicy(max_age_s=HOUR), every_s=0)
    assert not never.start() and not never.running and never.status()["enabled"] is False


def test_an_endless_interval_does_not_kill_the_thread(tmp_path):
    """Event.wait(inf) raises OverflowError: the thread used to die after its first run, the app running on."""
    purger = Purger(tmp_path, policy=PurgePolicy(max_age_s=HOUR), every_s=float("inf"))
    assert purger.start()
    wait_until(lambda: purger.next_run is not None, 10, "the first run")  # done; now it waits
    purger._thread.join(timeout=0.5)
    assert purger.running
    purger.stop()
    assert not purger.running


@pytest.mark.parametrize(
    "ages, sizes, policy, expected",
    [
        ([5, 4, 3], [1, 1, 1], PurgePolicy(max_age_s=3.5, fresh_s=0), [("a", "age"), ("b", "age")]),
        ([5, 4, 3], [1, 1, 1], PurgePolicy(max_count=1, fresh_s=0), [("a", "count"), ("b", "count")]),
        ([5, 4, 3], [10, 1, 1], PurgePolicy(max_bytes=5, fresh_s=0), [("a", "size")]),
        ([5, 4, 3], [1, 1, 1], PurgePolicy(max_count=1, fresh_s=4.5), [("a", "count")]),  # b, c are fresh
        ([5, 4, 3], [1, 1, 1], PurgePolicy(), []),  # no limits
        ([], [], PurgePolicy(max_count=1), []),
    ],
)
def test_choose_table(ages, sizes, policy, expected):
    files = [FileInfo(n, s, 100.0 - a) for n, a, s in zip("abc", ages, sizes)]
    assert [(f.name, why) for f, why in choose(files, policy, now=100.0)] == expected
