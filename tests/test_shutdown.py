"""Graceful shutdown of the real app process: signals during a job, and the watchdog's exit code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from zimage.ops.watchdog import WATCHDOG_EXIT_CODE

from .conftest import ROOT
from .test_ops_support import (
    JOB_SIZE,
    JOB_STEPS,
    START_TIMEOUT,
    app_args,
    app_env,
    check_outputs,
    free_port,
    group_alive,
    http_get,
    is_ready,
    kill_group,
    submit_job,
    wait_job_running,
    wait_until,
)


class App:
    """`python app.py ...` in a process group of its own; the finalizer kills what is left."""

    def __init__(self, root: Path, tiny_dir: Path, driver: str | None = None, **settings: str):
        self.root = root
        self.port = free_port()
        self.outputs = root / "outputs"
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "app.log"
        env = dict(os.environ, **app_env(root, **settings))
        args = app_args(self.port, tiny_dir, self.outputs)
        # python app.py ..., or a driver script given the same settings
        argv = [sys.executable, *args] if driver is None else [sys.executable, "-c", driver, *args[1:]]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self) -> None:
        wait_until(lambda: is_ready(self.base) or self.proc.poll() is not None, START_TIMEOUT, "/ready")
        assert self.proc.poll() is None, self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            kill_group(self.proc.pid)
        self.proc.wait(timeout=30)


@pytest.fixture
def app_factory(tiny_dir, tmp_path_factory):
    apps: list[App] = []

    def make(**kw) -> App:
        app = App(tmp_path_factory.mktemp("app"), tiny_dir, **kw)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


def stop_during_job(app: App, sig: int, size: int = JOB_SIZE) -> tuple[int, float]:
    app.wait_ready()
    job = submit_job(app.base, size=size)
    wait_job_running(app.base)
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


def test_no_new_jobs_while_draining(app_factory):
    app = app_factory(shutdown_grace_s="60")
    app.wait_ready()
    first = submit_job(app.base)
    wait_job_running(app.base)
    os.kill(app.proc.pid, signal.SIGTERM)
    wait_until(lambda: "shutting down (SIGTERM)" in app.log(), 30, "the drain to begin")
    assert http_get(app.base + "/ready")[0] in (0, 503)  # not ready any more: a balancer stops sending
    try:
        late = submit_job(app.base, size=256, steps=2, seed=8)
    except Exception:  # noqa: BLE001 - the server may already refuse connections: also "no new job"
        late = None
    assert app.proc.wait(timeout=120) == 0
    for job in (first, late):
        try:
            if job is not None:
                job.result(timeout=5)
        except Exception:  # noqa: BLE001 - the late job is refused; the first may lose its answer
            pass
    (png,) = check_outputs(app.outputs)  # the running job's picture, and no other
    log = app.log()
    assert log.index("shutting down (SIGTERM)") < log.index(f"size={JOB_SIZE}x{JOB_SIZE} steps={JOB_STEPS}")
    assert "size=256x256 steps=2 count=1 seed=8 outcome=ok" not in log


def test_watchdog_exit_reaches_the_process_exit_code(app_factory):
    """The real server and Operations in a real process. CUDA cannot fail on this CPU machine, so
    the one synthetic part is the error handed to the watchdog listener, as the engine would after
    a job; everything after it (request_exit, the drain, the exit code) is the real path."""
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
            error = RuntimeError("CUDA error: an illegal memory access was encountered")
            server.ops.watchdog(server.engine, None, error)

        threading.Thread(target=fail_after_ready, daemon=True).start()
        sys.exit(server.serve())
        """
    )
    app = app_factory(driver=driver)
    code = app.proc.wait(timeout=START_TIMEOUT)
    log = app.log()
    assert code == WATCHDOG_EXIT_CODE, log[-3000:]
    assert f"watchdog: exiting with code {WATCHDOG_EXIT_CODE}" in log and "illegal memory access" in log
    assert not group_alive(app.proc.pid)
