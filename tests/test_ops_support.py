"""Helpers for the tests that run real processes (the app, supervisord); no tests of its own.

Everything here drives real things: subprocesses, HTTP, files. Timeouts are generous (a
loaded 2-core CI machine imports torch, diffusers and gradio in 10-30 s) but always bounded.
"""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .conftest import ROOT

START_TIMEOUT = 180.0  # process start to /ready
# 50 steps at 768x768 take about 3 s with the tiny model on an idle 2-core machine (1024x1024:
# 8 s): long enough to be caught running, short enough for a loaded CI machine.
JOB_SIZE = 768
JOB_STEPS = 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body); status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except (OSError, urllib.error.URLError):
        return 0, ""


def is_ready(base: str) -> bool:
    return http_get(base + "/ready")[0] == 200


def metric(base: str, name: str) -> float | None:
    status, text = http_get(base + "/metrics")
    if status != 200:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def app_args(port: int, tiny_dir: Path, outputs: Path) -> list[str]:
    return [
        str(ROOT / "app.py"),
        "--model",
        "tiny",
        "--device",
        "cpu",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--tiny-dir",
        str(tiny_dir),
        "--outputs-dir",
        str(outputs),
        "--min-size",
        "64",
    ]


def app_env(tmp: Path, **zimage: str) -> dict[str, str]:
    """The environment the app needs offline, in temp folders; ZIMAGE_* settings as keywords."""
    env = {
        "PYTHONUNBUFFERED": "1",
        "HF_HOME": str(tmp / "hf"),
        "HF_HUB_OFFLINE": "1",
        "GRADIO_TEMP_DIR": str(tmp / "gradio"),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "TOKENIZERS_PARALLELISM": "false",
        "ZIMAGE_COMPILE_CACHE_DIR": str(tmp / "inductor"),
    }
    env.update({f"ZIMAGE_{k.upper()}": str(v) for k, v in zimage.items()})
    return env


def submit_job(base: str, size: int = JOB_SIZE, steps: int = JOB_STEPS, seed: int = 7):
    """Start a generation through the studio's public API (gradio_client); returns its Job."""
    from gradio_client import Client

    client = Client(base + "/", verbose=False)
    return client.submit("a lighthouse at dusk", "", size, size, steps, 0.0, seed, 1, api_name="/generate")


def wait_job_running(base: str, timeout: float = 60.0) -> None:
    wait_until(lambda: (metric(base, "zimage_running_jobs") or 0) >= 1, timeout, "a job running on the engine")


def group_alive(pgid: int) -> list[str]:
    """Live (non-zombie) processes of a process group."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "status", "cmdline"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])[:120]}")
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return found


def family(pid: int) -> list[int]:
    """A process and all its descendants, wherever their process group."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return [pid, *(c.pid for c in proc.children(recursive=True))]
    except psutil.Error:
        return []


def still_alive(pids: list[int]) -> list[int]:
    import psutil

    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.Error:
            continue
    return alive


def check_outputs(folder: Path) -> list[Path]:
    """No half-written file: no store temp file, and every PNG decodes to its last pixel."""
    from PIL import Image

    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    assert not [n for n in names if n.startswith(".tmp-")], f"temp files left: {names}"
    pngs = sorted(folder.glob("*.png")) if folder.is_dir() else []
    for p in pngs:
        with Image.open(p) as im:
            im.load()  # raises on a truncated file
    return pngs


def kill_group(pgid: int | None) -> None:
    if not pgid:
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------------------------------
# supervisord with the shipped configuration


def supervisor_bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed")
    return found


def read_ini(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    parser.optionxform = str  # keep option names as written
    parser.read(path)
    return parser


class Supervisord:
    """A real `supervisord -n` on copies of supervisor/*.conf in a temp folder, the program section overridden."""

    def __init__(self, root: Path, **program: str):
        self.root = root
        self.conf_dir = root / "supervisor"
        self.conf_dir.mkdir(parents=True)
        (root / "logs").mkdir()
        (root / "run").mkdir()
        shutil.copy(ROOT / "supervisor" / "supervisord.conf", self.conf_dir / "supervisord.conf")
        ini = read_ini(ROOT / "supervisor" / "zimage.conf")
        for key, value in program.items():
            ini.set("program:zimage", key, value)
        with open(self.conf_dir / "zimage.conf", "w") as f:
            ini.write(f)
        self.program = dict(ini.items("program:zimage"))
        self.conf = self.conf_dir / "supervisord.conf"
        self.proc: subprocess.Popen | None = None
        self.app_pgids: set[int] = set()

    def start(self) -> None:
        out = open(self.root / "logs" / "supervisord.stdout", "wb")
        self.proc = subprocess.Popen(
            [supervisor_bin("supervisord"), "-n", "-c", str(self.conf)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: the finalizer can kill whatever is left
        )
        out.close()
        wait_until(lambda: self.ctl("pid").returncode == 0, 30, "supervisord to answer")

    def ctl(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [supervisor_bin("supervisorctl"), "-c", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def info(self) -> dict:
        """supervisord's own record of the program (statename, pid, exitstatus...), over its XML-RPC socket.

        Polled this way rather than by running supervisorctl twice a second, which costs a
        Python start each time on a 2-core machine."""
        info = self.rpc().getProcessInfo("zimage")
        if info.get("pid"):
            self.app_pgids.add(info["pid"])  # supervisord puts each child in a process group of its own
        return info

    def rpc(self):
        import xmlrpc.client

        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, self.program_url())
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor

    def stop(self, timeout: float) -> float:
        """What `supervisorctl stop zimage` does (stopsignal to the group, SIGKILL after stopwaitsecs),
        without waiting inside the RPC: supervisord busy-polls a waiting RPC at 100% of a core
        (measured with supervisor 4.3), which starves the job on a 2-core machine. Seconds taken."""
        t0 = time.monotonic()
        self.rpc().stopProcess("zimage", False)
        wait_until(lambda: self.state()[0] in ("STOPPED", "EXITED", "FATAL"), timeout, "zimage to stop", 0.25)
        return time.monotonic() - t0

    def program_url(self) -> str:
        ini = read_ini(self.conf)
        return ini.get("supervisorctl", "serverurl").replace("%(here)s", str(self.conf_dir))

    def state(self) -> tuple[str, int]:
        """(state, pid) of the zimage program; pid 0 when it has none."""
        try:
            info = self.info()
        except Exception:  # noqa: BLE001 - supervisord not answering yet
            return "?", 0
        return info["statename"], info["pid"]

    def wait_running(self, timeout: float, other_than: int = 0) -> int:
        def running():
            state, pid = self.state()
            return pid if state == "RUNNING" and pid and pid != other_than else 0

        return wait_until(running, timeout, f"zimage RUNNING (not pid {other_than})", interval=0.5)

    def log(self) -> str:
        path = self.root / "logs" / "supervisord.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def app_log(self) -> str:
        path = Path(self.program["stdout_logfile"].replace("%(here)s", str(self.conf_dir)))
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        """Always: ask supervisord to shut down, then kill whatever is left, app groups included."""
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                self.ctl("shutdown", timeout=20)
                self.proc.wait(timeout=float(self.program.get("stopwaitsecs", 60)) + 20)
        except Exception:  # noqa: BLE001 - fall through to the kill
            pass
        finally:
            kill_group(self.proc.pid)
            for pgid in self.app_pgids:
                kill_group(pgid)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
