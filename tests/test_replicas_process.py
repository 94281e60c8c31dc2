"""Two replicas in child processes behind the real server (python app.py --replicas 2 on the CPU):
jobs go to the first free replica, two run at once, the pixels are the in-process ones, and a
replica whose process is killed is restarted alone while the other keeps serving: the job it held
gets a clear message, every other accepted job is served.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from .support import App, generate, metric, submit, wait_until

pytestmark = pytest.mark.slow

LONG = dict(width=512, height=512, steps=50, count=2)  # several seconds on a quiet CPU (256x256: about 1.5 s)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir):
    app = App(
        tmp_path_factory.mktemp("replicas"),
        tiny_dir,
        "--replicas",
        "2",
        "--queue-size",
        "16",
        "--max-jobs-per-user",
        "3",
    )
    app.wait_ready(300)
    yield app
    app.stop()


def _client(server):
    from gradio_client import Client

    return Client(server.url, verbose=False)


def _wait(cond, timeout: float, what: str) -> None:
    wait_until(cond, timeout, what, interval=0.05)


def _m(server, name: str, labels: dict | None = None):
    return metric(server.url, name, labels)


def _state(server, replica: str, state: str) -> bool:
    return _m(server, "zimage_replica_state", {"replica": replica, "state": state}) == 1


def test_two_replicas_serve_two_jobs_at_once(server):
    assert _state(server, "cpu0", "ready") and _state(server, "cpu1", "ready")
    clients = [_client(server), _client(server)]  # connected first: a connect can outlast a short job
    jobs = [submit(c, **LONG, seed=s) for c, s in zip(clients, (1, 2))]
    _wait(lambda: _m(server, "zimage_running_jobs") == 2, 120, "two jobs running at once")
    for job in jobs:
        job.cancel()
    log = server.log()
    assert "replicas: 2 replica(s) in child processes on cpu, cpu" in log
    # concurrency is one per replica: a third job waits in Gradio's queue, not beside the two
    assert _m(server, "zimage_running_jobs") <= 2


def test_pixels_from_a_replica_are_the_in_process_ones(server, engine):
    from PIL import Image

    from zimage.service.request import GenerationRequest

    gallery, details = generate(_client(server), width=128, height=96, steps=3, seed=4242)
    served = np.asarray(Image.open(gallery[0]["image"]).convert("RGB"))
    local = engine.generate(GenerationRequest("a red bicycle", width=128, height=96, steps=3, seed=4242), save=False)
    assert np.array_equal(served, np.asarray(local.images[0]))
    assert details["replica"] in ("cpu0", "cpu1")


def test_a_killed_replica_restarts_alone_and_no_accepted_job_is_lost(server):
    """Also: one person's cap on jobs queued or running counts across the replicas."""
    import httpx
    from gradio_client.exceptions import AppError

    _wait(lambda: _m(server, "zimage_running_jobs") == 0, 120, "idle replicas")
    victim = submit(_client(server), **LONG, seed=7)
    _wait(lambda: _state(server, "cpu0", "busy"), 60, "cpu0 running the long job")  # the first free one
    # long enough to outlast the next two calls on a quiet box (256x256 x 50 steps took under a second)
    other = submit(_client(server), width=512, height=512, steps=50, seed=8)
    _wait(lambda: _state(server, "cpu1", "busy"), 60, "cpu1 running the second job")
    queued = submit(_client(server), width=64, height=64, steps=2, seed=9)  # waits for a free replica
    _wait(lambda: _m(server, "zimage_queue_depth") >= 1, 60, "the third job waiting")
    assert _state(server, "cpu1", "busy"), "the second job ended too soon for this check"
    with pytest.raises(httpx.HTTPStatusError, match="429"):  # a fourth: over this address's cap of 3
        generate(_client(server), width=64, height=64, steps=2, seed=10)
    pid = int(_m(server, "zimage_replica_pid", {"replica": "cpu0"}))
    assert pid != server.proc.pid
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(AppError, match="GPU worker cpu0 stopped while making your picture") as info:
        victim.result(timeout=120)
    assert "Traceback" not in str(info.value)
    served = [job.result(timeout=300)[1]["seed"] for job in (other, queued)]  # every accepted job is served
    assert served == [8, 9]
    assert server.proc.poll() is None  # the server itself never went down
    _wait(lambda: _state(server, "cpu0", "ready"), 180, "cpu0 back after its restart")
    assert _m(server, "zimage_replica_restarts", {"replica": "cpu0"}) == 1
    assert _m(server, "zimage_replica_restarts", {"replica": "cpu1"}) == 0
    new_pid = int(_m(server, "zimage_replica_pid", {"replica": "cpu0"}))
    assert new_pid != pid
    # the restarted replica serves again: hold cpu1 with a long job, the next one lands on cpu0
    _wait(lambda: _m(server, "zimage_running_jobs") == 0, 120, "idle replicas")
    second = _client(server)  # connected first: a slow connect on a loaded box must not outlast the holder
    holder = submit(_client(server), **{**LONG, "count": 4}, seed=8)
    _wait(lambda: _m(server, "zimage_running_jobs") == 1, 60, "one job running")
    busy = "cpu0" if _state(server, "cpu0", "busy") else "cpu1"
    _, details = generate(second, width=64, height=64, steps=2, seed=9)
    assert not holder.done(), "the holder finished first: the check below would prove nothing"
    assert details["replica"] != busy
    holder.cancel()
    log = server.log()
    assert "replica cpu0: restarting it alone" in log and "replica cpu0: back after a restart" in log
