"""Several-GPU benchmark (issue 13), run on a two-GPU box by bench/gpus_session.sh.

  row    one engine in this process (single GPU, split mode, balanced): start to ready,
         warm image median, stage split, peak VRAM; with --decode-peak also the decode alone
  serve  the real server (app.py, as scripts/start.sh starts it) with the given flags, then N
         requests from C concurrent gradio_client clients: wall time, throughput, per-image
         latency (the engine's request-to-decoded time and the client's round trip)
Each writes one JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = (
    "A weathered lighthouse on a rocky cliff at dusk, waves crashing below, warm light in the "
    "windows, seagulls, dramatic clouds"
)
GiB = 1 << 30


def _median(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 4) if xs else None


def row(a: argparse.Namespace) -> dict:
    import torch

    from zimage.service.engine import Engine
    from zimage.service.request import GenerationRequest
    from zimage.settings import Settings

    extra = json.loads(a.settings or "{}")
    s = Settings(model=a.model, outputs_dir="/tmp/zw/outputs", compile_cache_dir=a.compile_cache, **extra)
    if a.cap_gib:
        index = torch.device(s.device).index if s.device.startswith("cuda:") else 0
        total = torch.cuda.get_device_properties(index).total_memory
        s = s.replace(memory_fraction=min(1.0, a.cap_gib * GiB / total))
    t0 = time.perf_counter()
    eng = Engine(s)
    eng.load()
    ready = time.perf_counter() - t0
    req = GenerationRequest(PROMPT, width=a.size, height=a.size, steps=a.steps, seed=42)
    for d in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(d)
    first = time.perf_counter()
    eng.generate(req, save=False)
    first = time.perf_counter() - first
    warm, results = [], []
    for _ in range(a.runs):
        t = time.perf_counter()
        results.append(eng.generate(req, save=False))
        warm.append(time.perf_counter() - t)
    out = {
        "settings": extra,
        "cap_gib": a.cap_gib,
        "start_to_ready_s": round(ready, 2),
        "first_image_s": round(first, 4),
        "warm_s": [round(x, 4) for x in warm],
        "warm_median_s": _median(warm),
        "text_encoder_s": _median([r.timings.text_encoder for r in results]),
        "denoise_s": _median([r.timings.denoise for r in results]),
        "vae_decode_s": _median([r.timings.vae_decode for r in results]),
        "memory_mode": str(eng.plan.mode),
        "placement": eng.plan.placement,
        "notes": eng.notes,
        "result_notes": results[-1].notes,
        "peak_alloc_gib": {
            d: round(torch.cuda.max_memory_allocated(d) / GiB, 3) for d in range(torch.cuda.device_count())
        },
        "cudnn_wscap": os.environ.get("CUDNN_CONV_WSCAP_DBG"),
    }
    if a.decode_peak:
        dev = torch.device(
            eng.plan.placement["vae"] if eng.plan.placement["vae"] != "cpu" else eng.plan.execution_device
        )
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        z = torch.randn(1, 16, a.size // 8, a.size // 8, device=dev)
        with torch.no_grad():
            eng.runner.decode(z)
        torch.cuda.synchronize(dev)
        out["decode_alone"] = {
            "allocated_before_gib": round(base / GiB, 3),
            "peak_gib": round(torch.cuda.max_memory_allocated(dev) / GiB, 3),
            "decode_activations_gib": round((torch.cuda.max_memory_allocated(dev) - base) / GiB, 3),
        }
    eng.shutdown(5)
    return out


def serve(a: argparse.Namespace) -> dict:
    import httpx
    from gradio_client import Client

    port = a.port
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", GRADIO_TEMP_DIR=f"/tmp/zw/gradio-{port}", GRADIO_ANALYTICS_ENABLED="False")
    log_path = Path(a.log)
    cmd = [
        sys.executable,
        str(ROOT / "app.py"),
        "--model",
        a.model,
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--outputs-dir",
        f"/tmp/zw/out-{port}",
        "--compile-cache-dir",
        a.compile_cache,
        "--queue-size",
        "64",
        *a.flags.split(),
    ]
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    url = f"http://127.0.0.1:{port}"
    ready = None
    try:
        while time.perf_counter() - t0 < a.ready_timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}")
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    ready = time.perf_counter() - t0
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        if ready is None:
            raise RuntimeError("server not ready in time")
        clients = [Client(url + "/", verbose=False) for _ in range(a.clients)]
        per_client = a.requests // a.clients
        records: list[dict] = []
        lock = threading.Lock()

        def work(i: int) -> None:
            for j in range(per_client):
                t = time.perf_counter()
                _, details = clients[i].predict(
                    PROMPT, "", a.size, a.size, a.steps, 0.0, 1000 + i * 10 + j, 1, api_name="/generate"
                )
                rt = time.perf_counter() - t
                with lock:
                    records.append(
                        {
                            "client_s": round(rt, 4),
                            "engine_s": details["timings"]["total_s"],
                            "queue_s": details["timings"]["queue_wait_s"],
                            "replica": details.get("replica"),
                        }
                    )

        wall = time.perf_counter()
        threads = [threading.Thread(target=work, args=(i,)) for i in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - wall
        metrics = httpx.get(url + "/metrics", timeout=10).text
        by_replica: dict[str, int] = {}
        for r in records:
            by_replica[r["replica"]] = by_replica.get(r["replica"], 0) + 1
        return {
            "flags": a.flags,
            "start_to_ready_s": round(ready, 2),
            "requests": len(records),
            "clients": a.clients,
            "wall_s": round(wall, 3),
            "images_per_s": round(len(records) / wall, 3),
            "engine_latency_median_s": _median([r["engine_s"] for r in records]),
            "client_latency_median_s": _median([r["client_s"] for r in records]),
            "by_replica": by_replica,
            "records": records,
            "replica_metrics": [
                line for line in metrics.splitlines() if line.startswith(("zimage_replica_", "zimage_vram_bytes{"))
            ],
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("row", "serve"))
    p.add_argument("--model", default="/tmp/zmodel")
    p.add_argument("--compile-cache", default="/tmp/zw/inductor")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--settings", default="")
    p.add_argument("--cap-gib", type=float, default=0.0)
    p.add_argument("--decode-peak", action="store_true")
    p.add_argument("--flags", default="")
    p.add_argument("--port", type=int, default=7861)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--ready-timeout", type=float, default=300)
    p.add_argument("--log", default="/tmp/zb/serve.log")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    try:
        out = row(a) if a.what == "row" else serve(a)
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON, the session goes on
        import traceback

        out = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    Path(a.out).write_text(json.dumps(out, indent=1, default=str))
    print(a.out, json.dumps({k: v for k, v in out.items() if k not in ("records", "traceback")}, default=str)[:1500])
    return 0


if __name__ == "__main__":
    sys.exit(main())
