"""The shipped Supervisor configuration: parsed by Supervisor itself, then run for real with `supervisord -n`."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time

import pytest

from zimage.ops.watchdog import WATCHDOG_EXIT_CODE
from zimage.settings import from_sources

from .support import (
    JOB_SIZE,
    JOB_STEPS,
    ROOT,
    START_TIMEOUT,
    Supervisord,
    app_args,
    app_env,
    check_outputs,
    family,
    free_port,
    group_alive,
    is_ready,
    still_alive,
    submit_job,
    wait_running,
    wait_until,
)


def realize(conf_path):
    """The program config as supervisord builds it from a config file."""
    from supervisor.options import ServerOptions

    options = ServerOptions()
    options.realize(args=["-c", str(conf_path)])
    (group,) = options.process_group_configs
    (program,) = group.process_configs
    return program


@pytest.fixture
def shipped(tmp_path):
    """The shipped files in a checkout-like folder (Supervisor wants the log folders to exist)."""
    shutil.copytree(ROOT / "supervisor", tmp_path / "supervisor")
    (tmp_path / "logs").mkdir()
    (tmp_path / "run").mkdir()
    return tmp_path


def test_shipped_config_parses_and_fits_the_app(shipped):
    """supervisord.conf and the zimage.conf it includes, as Supervisor itself reads them."""
    p = realize(shipped / "supervisor" / "supervisord.conf")
    from supervisor.datatypes import RestartUnconditionally

    here = str(shipped / "supervisor")
    assert p.name == "zimage" and p.command == f"{here}/../.venv/bin/python {here}/../app.py"
    assert p.directory == f"{here}/.."
    # restarts after the watchdog's exit, after a crash and after a signal
    assert p.autorestart is RestartUnconditionally and p.exitcodes == [0]
    assert WATCHDOG_EXIT_CODE not in p.exitcodes
    # Quick crashes never lead to FATAL: with a back-off of 1 s, 2 s, 3 s... it would take
    # startretries of them in a row, n(n+1)/2 seconds (over 1000 years); later crashes restart at once.
    assert p.startsecs <= 15 and p.startretries * (p.startretries + 1) / 2 > 1000 * 365 * 86400
    assert p.stopsignal in (signal.SIGTERM, signal.SIGINT) and p.stopasgroup and p.killasgroup
    assert p.redirect_stderr and p.stdout_logfile == f"{here}/../logs/zimage.log"
    assert p.stdout_logfile_maxbytes >= 1 << 20 and p.stdout_logfile_backups >= 1
    env = p.environment
    assert env["PYTHONUNBUFFERED"] == "1" and env["HF_HOME"] and "GRADIO_TEMP_DIR" not in env
    # every ZIMAGE_ variable is a real setting with a valid value
    settings = from_sources(environ={k: v for k, v in env.items() if k.startswith("ZIMAGE_")})
    assert settings.outputs_dir == f"{here}/../outputs" and settings.port == 7860
    assert settings.gradio_cache_dir == f"{here}/../.cache/gradio" and settings.min_free_mib > 0
    assert settings.purge_every_minutes > 0 and settings.log_level == "INFO"
    # SIGKILL only after the grace given to the running job, a cancelled step and the flush
    assert p.stopwaitsecs >= settings.shutdown_grace_s + 45


@pytest.mark.slow  # runs sed
def test_system_supervisor_variant(tmp_path):
    """README's recipe for a system supervisord, run as written: sed fills in the checkout and the user."""
    import getpass
    import subprocess

    checkout = tmp_path / "opt" / "zimage"
    (checkout / "logs").mkdir(parents=True)
    user = getpass.getuser()
    sed = ["sed", "-e", rf"s|%(here)s/\.\.|{checkout}|g", "-e", f"s|^; user=zimage.*|user={user}|"]
    text = subprocess.run([*sed, str(ROOT / "supervisor" / "zimage.conf")], capture_output=True, text=True, check=True)
    assert not [line for line in text.stdout.splitlines() if "%(here)s" in line and not line.startswith(";")]
    confd = tmp_path / "etc" / "conf.d"
    confd.mkdir(parents=True)
    (confd / "zimage.conf").write_text(text.stdout)
    (tmp_path / "etc" / "supervisord.conf").write_text(
        f"[supervisord]\nlogfile={tmp_path}/sd.log\npidfile={tmp_path}/sd.pid\n[include]\nfiles = conf.d/*.conf\n"
    )
    p = realize(tmp_path / "etc" / "supervisord.conf")
    assert p.command == f"{checkout}/.venv/bin/python {checkout}/app.py" and p.directory == str(checkout)
    assert p.environment["ZIMAGE_OUTPUTS_DIR"] == f"{checkout}/outputs" and p.uid == os.getuid()


@pytest.mark.slow
def test_watchdog_exit_code_makes_supervisor_restart(tmp_path_factory):
    """A real supervisord with the shipped program options: a process exiting 75 is started again."""
    root = tmp_path_factory.mktemp("sup75")
    stand_in = (
        f'{sys.executable} -c "import sys, time; time.sleep(1.5); sys.exit({WATCHDOG_EXIT_CODE})"'  # after startsecs
    )
    sup = Supervisord(root, command=stand_in, directory=str(root), startsecs="1", environment='PYTHONUNBUFFERED="1"')
    try:
        sup.start()
        first = sup.wait_running(30)
        wait_until(
            lambda: f"exit status {WATCHDOG_EXIT_CODE}; not expected" in sup.log(), 30, "the exit in the log", 0.2
        )
        second = sup.wait_running(30, other_than=first)
        assert second != first
        assert "FATAL" not in sup.log() and "gave up" not in sup.log()
    finally:
        sup.close()


@pytest.mark.slow
def test_quick_crashes_never_make_supervisor_give_up(tiny_dir, tmp_path_factory):
    """The real app, shipped startsecs/startretries: five crashes in a row within a second or two of
    each start (a bad zimage.yaml: exit 2), then the file is fixed and Supervisor brings it back,
    RUNNING and /ready, without anyone restarting it."""
    root = tmp_path_factory.mktemp("crashloop")
    port = free_port()
    config = root / "zimage.yaml"
    config.write_text("max_count: 0\n")  # refused at start: one line, exit 2
    env = app_env(root, log_level="INFO")
    sup = Supervisord(
        root,
        command=" ".join([sys.executable, *app_args(port, tiny_dir, root / "outputs")]),
        directory=str(root),  # the app reads zimage.yaml from here
        environment=",".join(f'{k}="{v}"' for k, v in env.items()),
    )
    assert int(sup.program["startsecs"]) <= 15  # the shipped values, not the test's
    base = f"http://127.0.0.1:{port}"
    crash = "exited: zimage (exit status 2; not expected)"
    try:
        sup.start()

        def five_crashes() -> bool:
            log = sup.log()
            assert "gave up" not in log, f"Supervisor gave up after {log.count(crash)} quick crash(es)"
            return log.count(crash) >= 5

        wait_until(five_crashes, 120, "five quick crashes", interval=0.1)
        config.write_text("max_count: 4\n")  # the operator fixes the file; nobody touches Supervisor
        crashes = sup.log().count(crash)
        pid = sup.wait_running(120)
        wait_until(lambda: is_ready(base), START_TIMEOUT, "/ready after the crash loop")
        log = sup.log()
        assert "gave up" not in log and "FATAL" not in log
        assert log.count("entered RUNNING state") == 1 and sup.state() == ("RUNNING", pid)
        assert 5 <= crashes <= 6 and log.count(crash) == crashes  # a sixth may start before the fix
        app_log = sup.app_log()
        assert app_log.count("error: Setting 'max_count' must be within 1..256 (got 0).") == crashes
        assert "Traceback" not in app_log
    finally:
        sup.close()


@pytest.mark.slow
def test_app_under_supervisord(tiny_dir, tmp_path_factory):
    """RUNNING and /ready; kill -9 gives a new pid and /ready again; SIGTERM during a job drains cleanly."""
    root = tmp_path_factory.mktemp("sup")
    port = free_port()
    outputs = root / "outputs"
    env = app_env(root, shutdown_grace_s="60", log_level="INFO")
    sup = Supervisord(
        root,
        command=" ".join([sys.executable, *app_args(port, tiny_dir, outputs)]),
        directory=str(ROOT),
        startsecs="3",  # the tiny model loads in well under a second
        environment=",".join(f'{k}="{v}"' for k, v in env.items()),
    )
    base = f"http://127.0.0.1:{port}"
    stopwaitsecs = float(sup.program["stopwaitsecs"])
    try:
        sup.start()
        first = sup.wait_running(START_TIMEOUT)
        wait_until(lambda: is_ready(base), START_TIMEOUT, "/ready after start", 0.2)

        # kill -9: Supervisor starts a fresh process, which gets ready again
        t0 = time.monotonic()
        os.kill(first, signal.SIGKILL)
        second = sup.wait_running(START_TIMEOUT, other_than=first)
        wait_until(lambda: is_ready(base), START_TIMEOUT, "/ready after kill -9", 0.2)
        recovered_s = time.monotonic() - t0
        assert not group_alive(first)

        # SIGTERM (supervisorctl stop) while a job runs: it finishes, its PNG is written, exit 0
        job = submit_job(base)
        wait_running(base)
        children = family(second)  # the app and anything it started, wherever their group
        stopped_s = sup.stop(timeout=stopwaitsecs + 30)
        assert stopped_s < stopwaitsecs
        info = sup.info()
        assert (info["statename"], info["exitstatus"]) == ("STOPPED", 0), info  # not SIGKILLed: exit 0
        assert "stopped: zimage (exit status 0)" in sup.log()
        assert not group_alive(second) and not still_alive(children), f"left behind of {children}"
        (png,) = check_outputs(outputs)  # the running job finished and was written, whole
        from PIL import Image

        with Image.open(png) as im:
            assert im.size == (JOB_SIZE, JOB_SIZE)
        log = sup.app_log()
        drain = log.index("shutting down (SIGTERM)")
        done = log.index(f"size={JOB_SIZE}x{JOB_SIZE} steps={JOB_STEPS} count=1 seed=7 outcome=ok")
        assert drain < done, "the job should still have been running when SIGTERM came"
        try:
            job.result(timeout=5)
        except Exception:  # noqa: BLE001 - the client may or may not get its answer before the exit
            pass
        print(f"kill -9 to /ready again: {recovered_s:.1f}s; SIGTERM with a job running to exit 0: {stopped_s:.1f}s")
    finally:
        sup.close()
    assert not group_alive(first) and not group_alive(second)
