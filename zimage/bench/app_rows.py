"""Rows through the real app: `python app.py` started as scripts/start.sh starts it (minus pip),
timed from the process start to /ready = 200 and to the first image returned through
gradio_client, then images back to back until the compiled path has served a few, which gives
the time to full speed (the first image within 5 % of the warm median).

The orchestrator (runner.run) prepares the page cache and the compile artifacts for the row,
then calls `app_row` in its own process; the app is a child process, stopped with SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from zimage.bench.common import PROMPT, median

FULL_SPEED_MARGIN = 0.05
TIMELINE_MARK = "load timeline "  # the engine logs its timeline as JSON after this


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_command(model: str, port: int, workdir: Path, cache: Path, size: int) -> list[str]:
    """The command scripts/start.sh execs, with the bench's folders (no pip)."""
    return [
        sys.executable,
        "app.py",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--outputs-dir",
        str(workdir / "outputs"),
        "--compile-cache-dir",
        str(cache),
        "--min-size",
        str(min(256, size)),
        "--default-width",
        str(size),
        "--default-height",
        str(size),
    ]


def full_speed_at(images: list[dict[str, Any]], warm_median: float | None) -> float | None:
    """Seconds since start at which the first image within 5 % of the warm median came back."""
    if not warm_median:
        return None
    for image in images:
        if image["latency_s"] <= warm_median * (1 + FULL_SPEED_MARGIN):
            return image["done_at_s"]
    return None


def app_row(
    model: str,
    workdir: Path,
    cache: Path,
    size: int,
    steps: int,
    warm_images: int = 5,
    timeout: float = 300.0,
    root: Path | None = None,
) -> dict[str, Any]:
    import httpx
    import psutil
    from gradio_client import Client

    root = root or Path(__file__).resolve().parents[2]
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / "app.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log_file:
        t_spawn = time.time()
        proc = subprocess.Popen(
            app_command(model, port, workdir, cache, size),
            cwd=root,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            origin = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            origin = t_spawn
        out: dict[str, Any] = {"command": "python app.py (as scripts/start.sh, minus pip)", "port": port}
        try:
            out.update(_drive(proc, url, origin, size, steps, warm_images, timeout, httpx, Client))
        finally:
            _stop(proc, out)
    text = log_path.read_text(errors="replace")
    out["load_timeline"], out["compile_timeline"] = _timelines(text)
    out["page_built_s"] = _page_built(text)
    out["log_tail"] = log_path.read_text(errors="replace")[-3000:] if "error" in out else None
    return out


def _drive(proc, url, origin, size, steps, warm_images, timeout, httpx, Client) -> dict[str, Any]:
    def since() -> float:
        return time.time() - origin

    out: dict[str, Any] = {}
    end = time.time() + timeout
    statuses: list[tuple[float, str]] = []
    with httpx.Client(timeout=5.0) as http:
        # the page serves first (Gradio's config for the client), the model a little later
        while time.time() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"the app exited with code {proc.returncode} before serving")
            try:
                if http.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        out["page_up_s"] = round(since(), 3)
        client = Client(url, verbose=False)
        out["client_connected_s"] = round(since(), 3)
        while time.time() < end:
            r = http.get(url + "/ready")
            if r.status_code == 200:
                body = r.json()
                out["ready_s"] = round(since(), 3)
                out["ready_body"] = body
                statuses.append((out["ready_s"], body.get("status", "")))
                break
            if proc.poll() is not None:
                raise RuntimeError(f"the app exited with code {proc.returncode} while loading")
            time.sleep(0.05)
        else:
            raise TimeoutError("the app was not ready in time")

        images: list[dict[str, Any]] = []
        compiled_after_live = 0
        while time.time() < end:
            t = time.time()
            _gallery, details = client.predict(PROMPT, "", size, size, steps, 0, 42, 1, api_name="/generate")
            done = time.time()
            timings = details.get("timings", {})
            images.append(
                {
                    "done_at_s": round(done - origin, 3),
                    "latency_s": round(done - t, 4),
                    "engine_total_s": timings.get("total_s"),
                    "path": details.get("compute_path"),
                }
            )
            if len(images) == 1:
                out["first_image_s"] = images[0]["done_at_s"]
                out["first_image_latency_s"] = images[0]["latency_s"]
            body = http.get(url + "/ready").json()
            if not statuses or statuses[-1][1] != body.get("status"):
                statuses.append((round(since(), 3), body.get("status", "")))
            # a warm image: compiled, or made by an app whose compiled path is not coming
            if details.get("compute_path") == "compiled" or body.get("compile") in ("eager-only", "failed"):
                compiled_after_live += 1
            if compiled_after_live >= warm_images:
                break
        warm = [i["latency_s"] for i in images[-warm_images:]] if compiled_after_live >= warm_images else []
        out["warm_latency_median_s"] = median(warm)
        out["warm_engine_median_s"] = median(
            [i["engine_total_s"] for i in images[-warm_images:] if i["engine_total_s"]]
        )
        out["full_speed_s"] = full_speed_at(images, out["warm_latency_median_s"])
        out["images"] = images
        out["statuses"] = statuses
        out["eager_latency_s"] = (
            statistics.median([i["latency_s"] for i in images if i["path"] == "eager"] or [0]) or None
        )
        try:
            out["metrics_paths"] = [
                ln for ln in http.get(url + "/metrics").text.splitlines() if ln.startswith("zimage_jobs_by_path_total")
            ]
        except httpx.HTTPError:
            pass
    return out


def _stop(proc: subprocess.Popen, out: dict[str, Any]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    out["exit_code"] = proc.returncode


def _page_built(log: str) -> float | None:
    """When the page was built (Gradio imported), in seconds since the start, as the app logged it."""
    import re

    m = re.search(r"page built ([0-9.]+)s after the process started", log)
    return float(m.group(1)) if m else None


def _timelines(log: str) -> tuple[list[Any] | None, Any]:
    """The engine's load timeline and compile timeline, as it logged them (JSON after a marker)."""
    load = compile_ = None
    for line in log.splitlines():
        at = line.find(TIMELINE_MARK)
        if at < 0:
            continue
        try:
            data = json.loads(line[at + len(TIMELINE_MARK) :])
        except ValueError:
            continue
        load = data.get("stages", load)
        compile_ = data.get("speed", compile_)
    return load, compile_
