"""Start-up through the web server and the CLI: /ready answers 200 on the eager path and says when
full speed comes, the banner says the same, the metrics count each path; `python -m zimage
warmup` builds what the next start reads; the import manifest is read ahead."""

from __future__ import annotations

import os
import threading
import time

import pytest

from zimage.model import early
from zimage.service.engine import Engine
from zimage.web.panels import render_banner

from .support import free_port, http_get, metric_value, run_python, wait_until
from .test_startup import GatedBackend


@pytest.mark.slow
def test_ready_says_full_speed_is_coming_then_here(make_settings):
    """In process (uvicorn on a thread, a real HTTP server), with a compile held at a gate."""
    import torch._dynamo
    from gradio_client import Client

    from zimage.web.server import create_app

    torch._dynamo.reset()
    port = free_port()
    settings = make_settings(
        compile="regional", warmup=True, default_width=64, default_height=64, host="127.0.0.1", port=port
    )
    backend = GatedBackend()
    engine = Engine(settings)
    engine.compile_backend = backend
    engine.start_loading()  # as run() does: the model loads while the page is built
    web = create_app(settings, [], engine)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(web.serve()), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: (r := http_get(url + "/ready")) is not None and r.status_code == 200, 120, "/ready = 200")
        body = http_get(url + "/ready").json()
        assert body["ready"] is True and body["full_speed"] is False and body["compile"] == "compiling"
        assert body["status"].startswith("ready (full speed in about ") and body["status"].endswith(" s)")
        assert body["full_speed_in_s"] > 0
        assert "full speed in about" in render_banner(engine.status())

        client = Client(url, verbose=False, httpx_kwargs={"timeout": 120})  # two loaded cores answer slowly
        _gallery, details = client.predict("a fox", "", 64, 64, 2, 0, 5, 1, api_name="/generate")
        assert details["compute_path"] == "eager"

        backend.gate.set()
        assert engine.compiler.wait(120) and engine.compiler.live
        body = http_get(url + "/ready").json()
        assert body["status"] == "ready (full speed)" and body["full_speed"] is True and body["compile"] == "live"
        assert "full speed in" not in render_banner(engine.status())
        _gallery, details = client.predict("a fox", "", 64, 64, 2, 0, 5, 1, api_name="/generate")
        assert details["compute_path"] == "compiled"
        text = http_get(url + "/metrics").text
        assert metric_value(text, "zimage_jobs_by_path_total", {"path": "eager"}) == 1
        assert metric_value(text, "zimage_jobs_by_path_total", {"path": "compiled"}) == 1
        assert metric_value(text, "zimage_full_speed") == 1
    finally:
        backend.gate.set()
        web.request_exit(0)
        thread.join(60)
    assert codes == [0]


@pytest.mark.slow
def test_warmup_command_builds_and_says_what_it_wrote(tiny_dir, tmp_path):
    """On the CPU the compile is off unless asked: warmup says so and writes the import manifest."""
    cache = tmp_path / "cache"
    proc = run_python(
        ["-m", "zimage", "warmup", "--model", "tiny", "--tiny-dir", str(tiny_dir), "--device", "cpu"]
        + ["--compile-cache-dir", str(cache), "--outputs-dir", str(tmp_path / "out"), "--min-size", "64"]
        + ["--default-width", "64", "--default-height", "64"],
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "compile is off here" in proc.stdout
    manifests = list((cache / "zimage-artifacts").glob("imports-*.txt"))
    assert len(manifests) == 1 and f"wrote {manifests[0]}" in proc.stdout
    files = manifests[0].read_text().split()
    assert any(f.endswith(os.path.join("torch", "__init__.py")) for f in files)
    assert any(".so" in f for f in files)


def test_the_import_manifest_is_read_ahead(tmp_path):
    listed = [tmp_path / f"m{i}.py" for i in range(3)]
    for i, path in enumerate(listed):
        path.write_bytes(b"x" * (1000 * (i + 1)))
    manifest = tmp_path / "imports.txt"
    manifest.write_text("\n".join(str(p) for p in [*listed, tmp_path / "gone.py"]) + "\n")
    state = early.Early()
    early._readahead(state, manifest, wants_cuda=False)
    assert state.libraries_read.is_set() and state.manifest == str(manifest)
    assert state.readahead_files == 3 and state.readahead_bytes == 6000


def test_loaded_files_list_this_process_modules_and_libraries():
    files = early.loaded_files()
    import json as json_module

    assert json_module.__file__ in files
    assert any(f.endswith(".so") or ".so." in f for f in files)  # from /proc/self/maps


def test_warm_cuda_is_a_no_op_off_the_gpu():
    import torch  # noqa: F401 - imported before the clock starts

    t = time.perf_counter()
    assert early.warm_cuda("cpu") is None
    assert time.perf_counter() - t < 1.0
