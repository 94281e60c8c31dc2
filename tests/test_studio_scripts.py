"""scripts/start.sh as a user runs it, on a copy of the checkout whose .venv is already installed:
no pip run and no network when nothing changed, the model's load time counted from the Python
start (not from what the script did before), and SIGTERM still stops the studio gracefully."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from .support import ROOT, START_TIMEOUT, app_env, free_port, http_get, wait_until

pytestmark = pytest.mark.slow  # a real server, started by the script

PRE_PYTHON_S = 5.0  # the wrapper makes the script's own python calls this slow
CLOCK_SLACK_S = 1.2  # a process's start time is boot time (whole seconds) + ticks


@pytest.fixture
def checkout(tmp_path):
    """The checkout's entry points and scripts, its package linked, and a .venv whose python is a
    wrapper of this one that logs every call (and is slow for `-c`, as a pip run would be)."""
    co = tmp_path / "zimage"
    (co / "scripts").mkdir(parents=True)
    for name in ("app.py", "pyproject.toml", "requirements.txt"):
        shutil.copy(ROOT / name, co / name)
    for name in ("install.sh", "start.sh"):
        shutil.copy(ROOT / "scripts" / name, co / "scripts" / name)
    (co / "zimage").symlink_to(ROOT / "zimage")
    (co / ".venv" / "bin").mkdir(parents=True)
    wrapper = co / ".venv" / "bin" / "python"
    wrapper.write_text(
        "#!/bin/sh\n"
        'echo "$$ $*" >> "$ZI_CALLS"\n'
        f'case "$1:$ZI_FAST" in -c:) sleep {PRE_PYTHON_S};; esac\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    wrapper.chmod(0o755)
    stamp = subprocess.run(
        [
            "bash",
            "-c",
            'eval "$(sed -n "/^_zi_hash() {/,/^}/p" scripts/install.sh)"; _zi_reqs=requirements.txt; _zi_hash',
        ],
        cwd=co,
        capture_output=True,
        text=True,
        env=dict(os.environ, ZI_CALLS=str(tmp_path / "stamp-calls"), ZI_FAST="1"),
        check=True,
    ).stdout.strip()
    assert len(stamp) == 16
    (co / ".venv" / ".zimage-installed").write_text(stamp + "\n")
    return co


def test_start_sh_runs_no_pip_once_installed_and_counts_the_load_from_python(checkout, tmp_path, tiny_dir):
    calls = tmp_path / "calls"
    port = free_port()
    env = dict(os.environ, **app_env(tmp_path))
    env.update(ZI_CALLS=str(calls), PIP_INDEX_URL="http://127.0.0.1:9/simple")  # no network if pip ran
    env.pop("ZI_FAST", None)
    env.pop("ZIMAGE_AUTH", None)
    args = ["--model", "tiny", "--tiny-dir", str(tiny_dir), "--device", "cpu", "--host", "127.0.0.1"]
    args += ["--port", str(port), "--outputs-dir", str(tmp_path / "outputs"), "--min-size", "64"]
    err = tmp_path / "start.err"
    t0 = time.monotonic()
    with open(err, "wb") as log:
        proc = subprocess.Popen(
            ["bash", "scripts/start.sh", *args], cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        url = f"http://127.0.0.1:{port}/ready"
        wait_until(lambda: (r := http_get(url, 2.0)) is not None and r.status_code == 200, START_TIMEOUT, "/ready")
        wall = time.monotonic() - t0
        load_s = http_get(url).json()["load_seconds"]
        text = err.read_text()
        assert "no pip run" in text, text[-2000:]
        lines = calls.read_text().splitlines()
        assert not any("-m pip" in line for line in lines), lines
        app = [line for line in lines if " app.py " in f"{line} "]
        assert len(app) == 1 and int(app[0].split()[0]) != proc.pid  # its own process, not exec'd over the script
        # the script spent PRE_PYTHON_S before Python started; the reported load time leaves it out
        assert load_s <= wall - PRE_PYTHON_S + CLOCK_SLACK_S, (load_s, wall)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(90)
    assert code == 0, err.read_text()[-3000:]
    assert "zimage stopped (exit code 0)" in err.read_text()
