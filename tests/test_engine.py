"""The engine with the tiny model on the CPU: seeds, batches, cancel, timings, the lock."""

import threading
import time

import numpy as np
import pytest

from zimage.errors import Cancelled, InvalidRequest, NotReady
from zimage.service.engine import Engine
from zimage.service.request import GenerationRequest

from .support import pixels, wait_until


def gen(engine, **kw):
    base = dict(prompt="a red fox in the snow", width=128, height=128, steps=4, seed=11)
    base.update(kw)
    return engine.generate(GenerationRequest(**base), save=False)


def test_same_seed_same_pixels_different_seed_different(engine):
    a = gen(engine, seed=123).images[0]
    b = gen(engine, seed=123).images[0]
    c = gen(engine, seed=124).images[0]
    assert np.array_equal(pixels(a), pixels(b))
    assert np.abs(pixels(a) - pixels(c)).mean() > 5


def test_image_has_requested_size(engine):
    result = gen(engine, width=192, height=96)
    assert result.images[0].size == (192, 96) and result.images[0].mode == "RGB"


def test_batch_gives_seeds_s_s1_and_matches_single_images(engine):
    batch = gen(engine, seed=500, count=3)
    assert batch.seeds == [500, 501, 502] and len(batch.images) == 3
    for seed, image in zip(batch.seeds, batch.images):
        single = gen(engine, seed=seed).images[0]
        assert np.abs(pixels(image) - pixels(single)).max() <= 1


def test_random_seed_is_resolved_and_reproducible(engine):
    result = gen(engine, seed=-1)
    assert result.request.seed >= 0 and result.seeds == [result.request.seed]
    again = gen(engine, seed=result.request.seed)
    assert np.array_equal(pixels(result.images[0]), pixels(again.images[0]))


def test_every_stage_is_timed(engine):
    t = gen(engine, steps=5).timings
    assert len(t.steps) == 5 and all(s > 0 for s in t.steps)
    assert t.text_encoder > 0 and t.vae_decode > 0
    assert t.gpu_total >= t.text_encoder + t.denoise + t.vae_decode - 1e-6
    assert t.it_per_s > 0


def test_cancel_stops_within_one_step(engine):
    job = engine.new_job()
    steps_at_cancel = []

    def progress(phase, done, total):
        if phase == "denoise" and done == 3 and not steps_at_cancel:
            steps_at_cancel.append(done)
            job.cancel()

    with pytest.raises(Cancelled):
        engine.generate(
            GenerationRequest("a long job", width=128, height=128, steps=50, seed=1), job=job, progress=progress
        )
    assert job.state == "cancelled"
    assert job.step - steps_at_cancel[0] <= 1, (job.step, steps_at_cancel)
    # the engine is healthy afterwards
    assert gen(engine).images


def test_cancel_from_another_thread(engine):
    job = engine.new_job()
    started = threading.Event()

    def progress(phase, done, total):
        if phase == "denoise":
            started.set()
            time.sleep(0.02)  # a slow step, so the cancel lands mid-run

    errors = []

    def run():
        try:
            engine.generate(GenerationRequest("x", width=128, height=128, steps=50, seed=1), job=job, progress=progress)
        except Cancelled as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    assert started.wait(10)
    at = job.step
    job.cancel()
    t.join(10)
    assert errors and job.step - at <= 2 and job.step < 50


def test_cancel_while_queued(engine):
    """A job cancelled while it waits for the GPU never starts."""
    hold = threading.Event()
    release = threading.Event()

    def slow(phase, done, total):
        hold.set()
        release.wait(5)

    first = threading.Thread(
        target=engine.generate,
        args=(GenerationRequest("x", width=64, height=64, steps=2, seed=1),),
        kwargs={"progress": slow, "save": False},
    )
    first.start()
    assert hold.wait(10)
    queued = engine.new_job()
    outcome = []

    def second():
        try:
            engine.generate(GenerationRequest("y", width=64, height=64, steps=2, seed=2), job=queued, save=False)
            outcome.append("ran")
        except Cancelled:
            outcome.append("cancelled")

    t = threading.Thread(target=second)
    t.start()
    wait_until(lambda: engine.queue_depth == 1, what="the second job to wait for the GPU")
    queued.cancel()
    t.join(5)
    release.set()
    first.join(10)
    assert outcome == ["cancelled"] and queued.step == 0


def test_lock_serialises_concurrent_jobs(engine):
    """Four threads generate at once: each job runs whole (text encoder to decode) alone, and every
    one of them finishes with its image."""
    inside = []
    overlaps = []
    results = {}

    def progress(phase, done, total):
        if phase == "text":
            inside.append(1)
            if len(inside) > 1:
                overlaps.append(True)
        if phase == "decode":
            inside.pop()

    def run(seed):
        # an exception here fails the test too (pytest: unhandled thread exceptions are errors)
        results[seed] = engine.generate(
            GenerationRequest("p", width=64, height=64, steps=3, seed=seed), progress=progress, save=False
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not overlaps
    assert sorted(results) == [0, 1, 2, 3]
    for seed, result in results.items():
        assert result.seeds == [seed] and result.images[0].size == (64, 64)


def test_invalid_request_is_refused_before_the_gpu(engine):
    before = engine.metrics.requests.labels("invalid")._value.get()
    with pytest.raises(InvalidRequest, match="Width must be a multiple of 16"):
        gen(engine, width=100)
    assert engine.metrics.requests.labels("invalid")._value.get() == before + 1


def test_saved_pngs_carry_their_seed(engine, tmp_path):
    from zimage.service.store import read_parameters

    result = engine.generate(GenerationRequest("a boat", width=64, height=64, steps=2, seed=77, count=2))
    paths = result.wait_saved(10)
    assert len(paths) == 2
    got = [read_parameters(p) for p in paths]
    assert [g["seed"] for g in got] == [77, 78]
    assert got[0]["prompt"] == "a boat" and got[0]["memory_mode"] == "cpu" and got[0]["steps"] == 2
    assert result.timings.png is not None and result.timings.png > 0


def test_not_ready_engine_says_so(make_settings):
    idle = Engine(make_settings())
    with pytest.raises(NotReady, match="still loading"):
        idle.generate(GenerationRequest("x", width=64, height=64))


def test_status_reports_mode_device_and_timeline(engine):
    gen(engine)
    st = engine.status()
    assert st["ready"] and st["memory_mode"] == "cpu" and st["device"] == "cpu"
    names = [s["name"] for s in st["load"]["stages"]]
    assert names[:6] == [
        "find model",
        "import torch",
        "plan memory",
        "import libraries",
        "read weights",
        "assemble pipeline",
    ]
    assert st["last"]["timings"].steps


def test_shutdown_refuses_new_jobs(make_settings):
    from zimage.errors import ShuttingDown

    eng = Engine(make_settings())
    eng.load()
    assert eng.shutdown(grace_s=1)
    with pytest.raises(ShuttingDown):
        eng.generate(GenerationRequest("x", width=64, height=64))
