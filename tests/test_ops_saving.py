"""No finished image lost, in process: the store keeps what it cannot write, the engine counts and
logs it, and a shutdown never drops an image that finished as the drain ended.

The full picture (a real server, a real tmpfs filled up and made read-only) is test_ops_storage.py."""

from __future__ import annotations

import logging
import threading

import pytest
from PIL import Image

from zimage.errors import NoSpace
from zimage.service.store import TMP_PREFIX, OutputStore, read_parameters


def image(value: int = 0) -> Image.Image:
    return Image.new("RGB", (16, 16), (value, 0, 0))


def test_a_write_that_fails_keeps_the_encoded_png(tmp_path):
    blocker = tmp_path / "outputs"
    blocker.write_text("a file where the outputs folder should be")
    store = OutputStore(blocker)
    try:
        report = store.write([image(1), image(2)], [{"seed": 1, "prompt": "a"}, {"seed": 2, "prompt": "b"}])
        assert report.paths == [] and isinstance(report.error, OSError)
        assert [(u.index, u.seed) for u in report.unsaved] == [(0, 1), (1, 2)]
        (tmp_path / "kept.png").write_bytes(report.unsaved[1].data)
        assert read_parameters(tmp_path / "kept.png") == {"seed": 2, "prompt": "b"}  # parameters embedded
        assert report.unsaved[0].name.endswith("-seed1.png")
        assert store.last_failure == "a file stands where the folder should be"
        state = store.state()
        assert (
            not state.ok
            and state.reason == f"outputs folder {blocker}: saving fails (a file stands where the folder should be)"
        )
        with pytest.raises(FileExistsError):
            store.save([image()], [{"seed": 3}])  # the old API still raises
        # the folder comes back: the probe in state() sees it and forgets the failure
        blocker.unlink()
        assert store.state().ok and store.last_failure is None
        assert not [p for p in blocker.iterdir() if p.name.startswith(TMP_PREFIX)]  # the probe cleaned up
    finally:
        store.close()


def test_free_space_floor(tmp_path):
    huge = OutputStore(tmp_path / "out", min_free_bytes=1 << 60)  # more than any disk has
    with pytest.raises(NoSpace) as info:
        huge.check_space()
    message = str(info.value)
    assert message.startswith(f"Not enough free disk space to save images: the outputs folder {tmp_path / 'out'} has ")
    assert "below the 1099511627776 MiB zimage keeps free (setting min_free_mib)" in message
    state = huge.state()
    assert not state.ok and "new jobs are refused" in state.reason and state.free_bytes > 0
    OutputStore(tmp_path / "out", min_free_bytes=0).check_space()  # 0: no check
    assert OutputStore(tmp_path / "out", min_free_bytes=1 << 20).state().ok
    huge.close()


def test_a_save_after_close_is_written_here_and_now(tmp_path):
    """Shutting down closes the writer pool; a job finishing just then still gets its file."""
    store = OutputStore(tmp_path)
    store.close()
    seen = []
    future = store.save_async([image()], [{"seed": 4}], on_done=seen.append)
    (path,) = future.result(timeout=0)
    assert path.endswith("-seed4.png") and (tmp_path / path.split("/")[-1]).is_file()
    assert seen[0].paths == [path] and store.pending == 0


@pytest.fixture(scope="module")
def own_engine(make_settings, tmp_path_factory):
    """An engine of this module's own (the last test shuts it down), outputs in a folder of its own."""
    from zimage.service.engine import Engine

    engine = Engine(make_settings(outputs_dir=str(tmp_path_factory.mktemp("saving") / "outputs")))
    engine.load()
    yield engine
    engine.shutdown(grace_s=5)


def test_the_engine_counts_and_logs_an_unsaved_request(own_engine, caplog):
    engine = own_engine
    blocker = engine.store.folder
    blocker.write_text("not a folder")
    try:
        with caplog.at_level(logging.INFO, logger="zimage.service.engine"):
            result = engine.generate(engine.default_request("a cat", width=64, height=64, steps=2, seed=5, count=2))
            assert result.wait_saved(30) == []
        assert [u.seed for u in result.unsaved] == [5, 6] and result.details()["saved"] is False
        assert result.save_error == (
            "Not saved: the 2 images were made, but they could not be written to the outputs folder because a "
            "file stands where the folder should be. Download them from the result now: the page keeps them "
            "only for a few hours."
        )
        assert engine.metrics.requests.labels("unsaved")._value.get() == 1
        assert engine.metrics.requests.labels("ok")._value.get() == 0
        (line,) = [r.getMessage() for r in caplog.records if "outcome=" in r.getMessage()]
        assert "seed=5 outcome=unsaved" in line and "save error: [Errno 17] File exists" in line
        text = engine.metrics.render().decode()
        assert "zimage_storage_ok 0.0" in text
    finally:
        blocker.unlink()
    assert "zimage_storage_ok 1.0" in engine.metrics.render().decode()  # the folder can be made again


def test_shutdown_saves_an_image_finished_as_the_drain_ends(own_engine):
    """The drain cancels the running job after its grace, but the job is past its last step: it
    finishes, and shutdown waits for its image to reach the writer before closing it."""
    engine = own_engine
    ok = engine.metrics.requests.labels("ok")._value.get()
    job = engine.new_job()
    stopper: list[threading.Thread] = []

    class PauseAfterGpu:
        """The job's thread, just past the GPU, lets the shutdown run first (up to 3 s): the
        slow scheduling that lost images on a loaded machine, made certain."""

        def __init__(self, histogram):
            self.histogram = histogram

        def labels(self, *names):
            return PauseAfterGpu(self.histogram.labels(*names))

        def observe(self, value):
            stopper[0].join(3)
            self.histogram.observe(value)

    engine.metrics.latency = PauseAfterGpu(engine.metrics.latency)

    def progress(phase, done, total):
        if phase == "decode":  # the steps are done: no cancel point is left
            t = threading.Thread(target=engine.shutdown, kwargs={"grace_s": 0})
            t.start()
            stopper.append(t)
            assert job.cancel_event.wait(30)  # the drain gave up waiting and cancelled it

    result = engine.generate(engine.default_request("a cat", width=64, height=64, steps=2, seed=9), job, progress)
    stopper[0].join(60)
    assert not stopper[0].is_alive()
    (path,) = result.wait_saved(0)  # written before shutdown returned
    assert path.endswith("-seed9.png") and (engine.store.folder / path.split("/")[-1]).is_file()
    assert engine.metrics.requests.labels("ok")._value.get() == ok + 1
