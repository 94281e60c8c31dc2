"""Helpers shared by the tests; no tests of its own.

Everything here drives real things: the app as a real process on a free port, supervisord,
HTTP, files. Waits poll a condition with a bounded timeout (a loaded 2-core CI machine imports
torch, diffusers and gradio in 10-30 s), never a fixed sleep.
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
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 180.0  # process start to /ready
# 50 steps at 768x768 take about 3 s with the tiny model on an idle 2-core machine (1024x1024:
# 8 s): long enough to be caught running, short enough for a loaded CI machine.
JOB_SIZE = 768
JOB_STEPS = 50


def pixels(image):
    import numpy as np

    return np.asarray(image, dtype=np.int16)


# ------------------------------------------------------------------------------------------
# waiting


def wait_until(predicate, timeout: float = 10.0, what: str = "the condition", interval: float = 0.02):
    """Poll predicate() until it returns something true, and return that; fail after timeout seconds."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# ------------------------------------------------------------------------------------------
# HTTP and Prometheus


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0):
    """The httpx response, or None when nothing answers."""
    import httpx

    try:
        return httpx.get(url, timeout=timeout)
    except httpx.HTTPError:
        return None


def status_of(url: str, timeout: float = 5.0) -> int:
    """The HTTP status; 0 when nothing answers."""
    r = http_get(url, timeout)
    return 0 if r is None else r.status_code


def is_ready(base: str) -> bool:
    return status_of(base + "/ready") == 200


def metric_value(text: str, name: str, labels: dict | None = None) -> float | None:
    """One sample of Prometheus text: by its name and, where given, some of its labels."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return sample.value
    return None


def metric(base: str, name: str, labels: dict | None = None) -> float | None:
    """One sample from a running server's /metrics; None when it does not answer."""
    r = http_get(base + "/metrics")
    return None if r is None or r.status_code != 200 else metric_value(r.text, name, labels)


def wait_running(base: str, timeout: float = 60.0) -> None:
    """Until a job holds the GPU."""
    wait_until(lambda: (metric(base, "zimage_running_jobs") or 0) >= 1, timeout, "a job running on the engine", 0.05)


# ------------------------------------------------------------------------------------------
# the studio's API through gradio_client


def submit(client, prompt="a red bicycle", negative="", width=128, height=96, steps=4, guidance=0.0, seed=-1, count=1):
    """Start a generation through the public API; returns gradio_client's Job."""
    return client.submit(prompt, negative, width, height, steps, guidance, seed, count, api_name="/generate")


def generate(client, **kw):
    """A generation through the public API: (gallery, details)."""
    return submit(client, **kw).result(timeout=300)


def submit_job(base: str, size: int = JOB_SIZE, steps: int = JOB_STEPS, seed: int = 7):
    """A square job from a fresh client (no login)."""
    from gradio_client import Client

    client = Client(base + "/", verbose=False)
    return submit(client, prompt="a lighthouse at dusk", width=size, height=size, steps=steps, seed=seed)


# ------------------------------------------------------------------------------------------
# the app as a real process


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


class App:
    """`python app.py --model tiny ... *extra` in a temp folder and a process group of its own.

    driver: a script run with `python -c` in place of app.py, given the same arguments.
    Its cwd is the temp folder, so no zimage.yaml of the checkout is read."""

    def __init__(self, root: Path, tiny_dir: Path, *extra: str, driver: str | None = None, **settings: str):
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port = free_port()
        self.url = self.base = f"http://127.0.0.1:{self.port}"
        self.outputs = root / "outputs"
        self.log_path = root / "app.log"
        # (seconds since spawn, /health status, /ready status, /ready body) until ready
        self.observed: list[tuple[float, int, int, dict]] = []
        env = dict(os.environ, **app_env(root, **settings))
        if "auth" not in settings:
            env.pop("ZIMAGE_AUTH", None)
        args = [*app_args(self.port, tiny_dir, self.outputs), *extra]
        argv = [sys.executable, *args] if driver is None else [sys.executable, "-c", driver, *args[1:]]
        self.started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = START_TIMEOUT, on_up=None) -> App:
        """Watch /health and /ready from the start until ready; on_up(app) runs once when /health
        first answers (the model is still loading then)."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"the app exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            health, r = status_of(self.base + "/health", 2.0), http_get(self.base + "/ready", 2.0)
            if r is None:
                return False
            self.observed.append((time.monotonic() - self.started, health, r.status_code, r.json()))
            nonlocal on_up
            if on_up is not None and health == 200 and r.status_code != 200:
                on_up(self)
                on_up = None
            return r.status_code == 200

        try:
            wait_until(ready, timeout, "/ready", interval=0.05)
        except AssertionError:
            self.kill()
            raise
        return self

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, as Supervisor stops it; SIGKILL after timeout. The exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.wait(30)

    def kill(self) -> None:
        """The app's whole process group, at once."""
        if self.proc.poll() is None:
            kill_group(self.proc.pid)
        self.proc.wait(timeout=30)


def bench_model(path: Path) -> Path:
    """The full-size builder's layout with the tiny model's configs: `bench` rows in seconds on the CPU."""
    import json

    from zimage.model import tiny
    from zimage.model.fullsize import CONFIGS, build

    cfgs = json.loads(CONFIGS.read_text())
    cfgs["transformer/config.json"] = dict(_class_name="ZImageTransformer2DModel", **tiny.TRANSFORMER_CONFIG)
    cfgs["text_encoder/config.json"] = dict(tiny.TEXT_ENCODER_CONFIG, vocab_size=16384, model_type="qwen3")
    cfgs["vae/config.json"] = dict(tiny.VAE_CONFIG)
    return build(path, device="cpu", configs=cfgs)


def run_python(args: list[str], cwd: Path = ROOT, env: dict | None = None, timeout: float = 240):
    """`python *args` to its end, without the caller's ZIMAGE_AUTH; offline."""
    full = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    full.pop("ZIMAGE_AUTH", None)
    full.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------
# processes and files left behind


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


def kill_group(pgid: int | None) -> None:
    if not pgid:
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


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
        wait_until(lambda: self.ctl("pid").returncode == 0, 30, "supervisord to answer", 0.2)

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
