"""Graceful shutdown of the real app process: signals during a job, and the watchdog's exit code."""

from __future__ import annotations

import os
import signal
import textwrap
import time

import pytest

from zimage.ops.watchdog import WATCHDOG_EXIT_CODE

from .support import (
    JOB_SIZE,
    JOB_STEPS,
    ROOT,
    START_TIMEOUT,
    App,
    check_outputs,
    group_alive,
    http_get,
    submit_job,
    wait_running,
    wait_until,
)

pytestmark = pytest.mark.slow  # every test here starts the app as a real process


@pytest.fixture
def app_factory(tiny_dir, tmp_path_factory):
    apps: list[App] = []

    def make(**kw) -> App:
        app = App(tmp_path_factory.mktemp("app"), tiny_dir, **kw)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.kill()


def stop_during_job(app: App, sig: int, size: int = JOB_SIZE) -> tuple[int, float]:
    app.wait_ready()
    job = submit_job(app.base, size=size)
    wait_running(app.base)
    t0 = time.monotonic()
    os.kill(app.proc.pid, sig)
    code = app.proc.wait(timeout=120)
    elapsed = time.monotonic() - t0
    try:
        job.result(timeout=5)
    except Exception:  # noqa: BLE001 - the client may or may not get its answer before the exit
        pass
    return code, elapsed


def test_sigterm_cancels_a_job_that_outlasts_the_grace(app_factory):
    app = app_factory(shutdown_grace_s="1")
    code, elapsed = stop_during_job(app, signal.SIGTERM, size=1024)  # 1024x1024: outlasts the 1 s grace
    log = app.log()
    assert code == 0, log[-3000:]
    assert elapsed < 30, f"took {elapsed:.1f}s"
    assert "job cancelled" in log and "outcome=cancelled" in log
    assert check_outputs(app.outputs) == []  # cancelled: no PNG, and nothing half-written
    assert not group_alive(app.proc.pid)


def test_sigint_lets_the_running_job_finish_and_write(app_factory):
    app = app_factory(shutdown_grace_s="60")
    code, elapsed = stop_during_job(app, signal.SIGINT)
    log = app.log()
    assert code == 0, log[-3000:]
    drain = log.index("shutting down (SIGINT)")
    assert drain < log.index(f"size={JOB_SIZE}x{JOB_SIZE} steps={JOB_STEPS} count=1 seed=7 outcome=ok")
    (png,) = check_outputs(app.outputs)
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (JOB_SIZE, JOB_SIZE)
    assert not group_alive(app.proc.pid)


def test_sigterm_drains_the_running_job_and_takes_no_new_one(app_factory):
    """SIGTERM (what Supervisor sends) while a job runs: /ready says 503 and why, a later job is
    refused, the running one finishes, reaches its client and is flushed to disk, exit code 0."""
    from gradio_client.exceptions import AppError

    app = app_factory(shutdown_grace_s="60")
    app.wait_ready()
    first = submit_job(app.base)
    wait_running(app.base)
    os.kill(app.proc.pid, signal.SIGTERM)
    wait_until(lambda: "shutting down (SIGTERM)" in app.log(), 30, "the drain to begin")
    # The server serves until the drain ends, and the drain waits for the job (seconds more):
    # so /ready answers, and says 503, so that a balancer stops sending.
    ready = http_get(app.base + "/ready")
    assert ready is not None and ready.status_code == 503, ready
    assert ready.json() == {"ready": False, "reason": "shutting down: no new jobs"}
    late = submit_job(app.base, size=256, steps=2, seed=8)  # queued behind the running job, then refused
    gallery, details = first.result(timeout=120)
    assert details["seeds"] == [7] and len(gallery) == 1
    with pytest.raises(AppError, match="The server is shutting down and takes no new jobs"):
        late.result(timeout=60)
    assert app.proc.wait(timeout=120) == 0
    (png,) = check_outputs(app.outputs)  # the running job's picture, whole, and no other
    assert [png.name] == details["files"]
    log = app.log()
    assert log.index("shutting down (SIGTERM)") < log.index(f"size={JOB_SIZE}x{JOB_SIZE} steps={JOB_STEPS}")
    assert "size=256x256 steps=2 count=1 seed=8 outcome=ok" not in log
    assert "exit code 0" in log and "Traceback" not in log, log[-3000:]
    assert not group_alive(app.proc.pid)


def test_watchdog_exit_reaches_the_process_exit_code(app_factory):
    """The real server and Operations in a real process. CUDA cannot fail on this CPU machine, so
    the one synthetic part is the error handed to the watchdog listener, as the engine would after
    a job; everything after it (request_exit, the drain, serve()'s return value, the exit code)
    is the real path."""
    driver = textwrap.dedent(
        f"""
        import logging, sys, threading
        sys.path.insert(0, {str(ROOT)!r})
        from zimage.cli import build_parser
        from zimage.settings import from_namespace
        from zimage.web.server import create_app

        ns = build_parser().parse_args(["serve", *sys.argv[1:]])
        settings = from_namespace(ns)
        logging.basicConfig(level=logging.INFO, stream=sys.stdout)
        server = create_app(settings)

        def fail_after_ready():
            server.engine.wait_ready(120)
            import httpx

            ready = httpx.get(f"http://127.0.0.1:{{settings.port}}/ready", timeout=10).status_code
            print(f"ready before the error: {{ready}}", flush=True)
            error = RuntimeError("CUDA error: an illegal memory access was encountered")
            server.ops.watchdog(server.engine, None, error)

        threading.Thread(target=fail_after_ready, daemon=True).start()
        code = server.serve()
        print(f"serve returned {{code}}; draining: {{server.draining.is_set()}}", flush=True)
        sys.exit(code)
        """
    )
    app = app_factory(driver=driver)
    code = app.proc.wait(timeout=START_TIMEOUT)
    log = app.log()
    assert code == WATCHDOG_EXIT_CODE, log[-3000:]
    assert f"watchdog: exiting with code {WATCHDOG_EXIT_CODE}" in log and "illegal memory access" in log
    assert "ready before the error: 200" in log
    assert f"shutting down (exit requested with code {WATCHDOG_EXIT_CODE})" in log
    assert f"serve returned {WATCHDOG_EXIT_CODE}; draining: True" in log
    assert not group_alive(app.proc.pid)
