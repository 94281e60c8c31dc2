"""Replicas without child processes: the layout policy, the pool's shared queue over two real
in-process tiny-model replicas, the settings, and load-aware steps."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from zimage.errors import Cancelled, SettingsError, ShuttingDown
from zimage.model.memory import GiB, GPUInfo, Hardware
from zimage.ops.profiler import LoadTimeline
from zimage.service.jobs import Job
from zimage.service.layout import plan_replicas
from zimage.service.replicas import READY, LocalReplica, Replica, ReplicaPool
from zimage.service.request import GenerationRequest
from zimage.settings import Settings, from_sources

from .support import pixels


def _hw(*free_gib: float) -> Hardware:
    return Hardware(tuple(GPUInfo(i, "H200", 141 * GiB, int(f * GiB)) for i, f in enumerate(free_gib)))


# --- where the replicas go ---------------------------------------------------------------


def test_auto_gives_one_replica_per_gpu_that_holds_the_model():
    plan = plan_replicas(Settings(device="auto"), _hw(130, 130), need=24 * GiB)
    assert plan.devices == ("cuda:0", "cuda:1") and plan.processes and plan.size == 2
    assert "fits on each of 2 GPUs" in plan.reason
    # a GPU too full to hold the model gets no replica; one left means the in-process default
    plan = plan_replicas(Settings(device="auto"), _hw(130, 10), need=24 * GiB)
    assert plan.devices == ("auto",) and not plan.processes


def test_one_gpu_or_none_stays_in_process():
    assert plan_replicas(Settings(device="auto"), _hw(130), need=24 * GiB).processes is False
    assert plan_replicas(Settings(device="auto"), Hardware(), need=24 * GiB).size == 1
    assert plan_replicas(Settings(device="cpu")).devices == ("cpu",)
    assert plan_replicas(Settings(device="cuda:1")).devices == ("cuda:1",)
    # split mode is one pipeline over the GPUs, not one per GPU
    assert plan_replicas(Settings(device="auto", memory_mode="multi-gpu"), _hw(130, 130), need=1).size == 1


def test_gpus_and_a_number_pick_the_gpus():
    plan = plan_replicas(Settings(device="auto", gpus="1,2"), _hw(130, 130, 130), need=24 * GiB)
    assert plan.devices == ("cuda:1", "cuda:2")
    plan = plan_replicas(Settings(device="auto", replicas="2"), _hw(130, 130, 130), need=24 * GiB)
    assert plan.devices == ("cuda:0", "cuda:1")
    plan = plan_replicas(Settings(device="auto", gpus="2"), _hw(130, 130, 130), need=24 * GiB)
    assert plan.devices == ("cuda:2",) and not plan.processes
    assert plan_replicas(Settings(device="cpu", replicas="2")).devices == ("cpu", "cpu")
    with pytest.raises(SettingsError, match="replicas' is 3 but 2 GPU"):
        plan_replicas(Settings(device="auto", replicas="3"), _hw(130, 130), need=1)
    with pytest.raises(SettingsError, match="names GPU 5, which does not exist"):
        plan_replicas(Settings(device="auto", gpus="0,5"), _hw(130, 130), need=1)


@pytest.mark.parametrize(
    "cli, message",
    [
        ({"replicas": "two"}, "'replicas' must be auto or a whole number"),
        ({"replicas": "0"}, "'replicas' must be auto or a whole number"),
        ({"gpus": "0,x"}, "'gpus' must be GPU indices"),
        ({"gpus": "0,0"}, "names a GPU twice"),
        ({"gpus": "0", "replicas": "2"}, "selects only 1 GPU"),
        ({"gpus": "0,1", "device": "cuda:0"}, "set only one"),
        ({"replicas": "2", "memory_mode": "multi-gpu"}, "use one or the other"),
        ({"load_aware_queue": "-1"}, "'load_aware_queue' must be at least 0"),
        ({"load_aware_min_steps": "0"}, "'load_aware_min_steps' must be within"),
    ],
)
def test_settings_are_checked(cli, message):
    with pytest.raises(SettingsError, match=message):
        from_sources(cli=cli, environ={})


def test_settings_from_the_environment():
    s = from_sources(environ={"ZIMAGE_REPLICAS": "2", "ZIMAGE_GPUS": "0,1", "ZIMAGE_LOAD_AWARE_QUEUE": "3"})
    assert (s.replicas, s.gpus, s.load_aware_queue, s.load_aware_min_steps) == ("2", "0,1", 3, 4)


# --- the pool over two real in-process replicas ------------------------------------------


@pytest.fixture(scope="module")
def two_local(make_settings):
    settings = make_settings()
    replicas = [LocalReplica(f"cpu{i}", settings, _metrics(), LoadTimeline()) for i in range(2)]
    pool = ReplicaPool(replicas)
    pool.start()
    yield pool
    pool.close()


def _metrics():
    from zimage.ops.metrics import EngineMetrics

    return EngineMetrics()


def _req(**kw):
    base = dict(prompt="a red fox", width=64, height=64, steps=2, seed=5)
    base.update(kw)
    return GenerationRequest(**base)


def test_local_replica_is_a_replica(two_local):
    assert all(isinstance(r, Replica) for r in two_local.replicas)
    assert two_local.size == 2 and [r.state for r in two_local.replicas] == [READY, READY]


def test_a_job_goes_to_the_first_free_replica(two_local):
    """A long job holds cpu0; the next job does not wait for it but runs on cpu1 at once."""
    long_job, short_job = Job(), Job()
    started = threading.Event()
    out: dict = {}

    def progress(phase, done, total):
        if phase == "denoise":
            started.set()

    def long_run():
        try:
            out["long"] = two_local.run(_req(steps=40, width=128, height=128), long_job, progress)
        except Cancelled:
            out["cancelled"] = True

    t = threading.Thread(target=long_run)
    t.start()
    assert started.wait(60)
    t0 = time.time()
    short = two_local.run(_req(), short_job, None)
    assert short.replica != long_job.replica and long_job.state == "running"
    assert short_job.started - t0 < 1.0  # it did not wait for the long job
    long_job.cancel()
    t.join(60)
    assert out == {"cancelled": True} and long_job.replica == "cpu0" and short.replica == "cpu1"


def test_same_seed_same_pixels_on_either_replica(two_local):
    a = two_local.run(_req(seed=77), Job(), None)
    job = Job()
    with two_local.turn(job) as first:  # hold one replica so the next run lands on the other
        b = two_local.run(_req(seed=77), Job(), None)
    assert first.name != b.replica
    assert np.array_equal(pixels(a.images[0]), pixels(b.images[0]))


def test_waiting_jobs_are_served_first_come_first_served_and_cancel_reaches_them(two_local):
    holders = [Job(), Job()]
    order: list[str] = []
    with two_local.turn(holders[0]), two_local.turn(holders[1]):  # both replicas taken
        jobs = [Job(id=f"w{i}") for i in range(3)]
        threads = []
        for job in jobs:

            def wait_turn(job=job):
                try:
                    with two_local.turn(job):
                        order.append(job.id)
                except Cancelled:
                    order.append(f"cancelled {job.id}")

            threads.append(threading.Thread(target=wait_turn))
            threads[-1].start()
            while two_local.waiting < len(threads):  # each in the queue before the next
                time.sleep(0.01)
        jobs[1].cancel()
        deadline = time.monotonic() + 5
        while "cancelled w1" not in order and time.monotonic() < deadline:
            time.sleep(0.01)
        assert order == ["cancelled w1"] and two_local.waiting == 2
    for t in threads:
        t.join(10)
    assert order == ["cancelled w1", "w0", "w2"]


def test_drain_refuses_waiting_jobs_and_lets_running_ones_finish(make_settings):
    pool = ReplicaPool([LocalReplica("cpu0", make_settings(), _metrics(), LoadTimeline())])
    pool.start()
    holder = Job()
    refused: list = []
    with pool.turn(holder):
        t = threading.Thread(target=lambda: _expect(ShuttingDown, pool, refused))
        t.start()
        while pool.waiting < 1:
            time.sleep(0.01)
        drained = threading.Thread(target=lambda: refused.append(pool.drain(10)))
        drained.start()
        t.join(5)
        assert refused and isinstance(refused[0], ShuttingDown)
    drained.join(10)
    assert refused[-1] is True  # the running job finished on its own


def _expect(cls, pool, out):
    try:
        with pool.turn(Job()):
            pass
    except cls as exc:
        out.append(exc)


# --- load-aware steps ---------------------------------------------------------------------


def test_load_aware_steps_run_fewer_steps_and_say_so(make_settings):
    from zimage.service.engine import Engine

    eng = Engine(make_settings(load_aware_queue=2, load_aware_min_steps=2))
    eng.load()
    try:
        eng.waiting_elsewhere = lambda: 2  # not more than the threshold: the usual steps
        usual = eng.generate(_req(steps=4), save=False)
        assert usual.request.steps == 4 and usual.steps_asked is None
        assert "load_aware_steps" not in usual.metadata(usual.seeds[0])
        eng.waiting_elsewhere = lambda: 3
        fast = eng.generate(_req(steps=4), save=False)
        assert fast.request.steps == 2 and len(fast.timings.steps) == 2 and fast.steps_asked == 4
        meta = fast.metadata(fast.seeds[0])
        assert meta["steps"] == 2 and meta["steps_asked"] == 4 and meta["load_aware_steps"] is True
        assert any("ran 2 steps instead of 4 because 3 jobs were waiting" in n for n in fast.details()["notes"])
        assert eng.metrics.registry.get_sample_value("zimage_load_aware_reduced_total") == 1
        from zimage.web.panels import summary_markdown

        assert "Load-aware steps" in summary_markdown(fast.details())
    finally:
        eng.shutdown(grace_s=5)


def test_load_aware_steps_are_off_by_default(engine):
    engine.waiting_elsewhere = lambda: 100
    try:
        result = engine.generate(_req(steps=4), save=False)
    finally:
        engine.waiting_elsewhere = lambda: 0
    assert result.request.steps == 4 and result.steps_asked is None


def test_profiler_panel_has_a_row_per_replica():
    from zimage.web.panels import render_profiler

    rows = [
        {"name": "gpu0", "state": "busy", "step": (3, 8), "vram": {"allocated_bytes": 21 << 30}, "last_run": None},
        {
            "name": "gpu1",
            "state": "restarting",
            "restarts": 1,
            "error": "the worker process ended while running a job",
            "last_run": {"seconds": 0.91, "outcome": "error"},
        },
    ]
    html = render_profiler({"replicas": rows})
    assert "Replicas · 2" in html and "busy 3/8 · 21.00 GiB · no run yet" in html
    assert "restarting · - · 910 ms error · 1 restart(s)" in html
    assert "Replicas ·" not in render_profiler({"replicas": rows[:1]})  # one replica: the other cards say it
