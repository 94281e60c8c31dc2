"""What the engine says about itself, as plain data: the profiler panel's and /ready's status,
how far the compile beside serving is (eager or full speed, over every replica), and the gauges
/metrics reads at each scrape. Reads the engine; changes nothing but the metrics."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from zimage.ops.profiler import memory_snapshot

if TYPE_CHECKING:  # pragma: no cover
    from zimage.service.engine import Engine


def engine_status(engine: Engine) -> dict[str, Any]:
    """Everything the profiler panel and /ready show, as plain data."""
    m = engine.model
    running = engine.running_job
    replicas = engine.pool.status()
    first = {} if m else next((r for r in replicas if r.get("state") in ("ready", "busy")), {})
    return {
        "ready": engine.ready,
        "load": engine.timeline.snapshot(),
        "model": m.source.name if m else engine.settings.model,
        "device": m.device if m else first.get("device", "cpu"),
        "device_name": m.device_name if m else first.get("device_name", "CPU"),
        "dtype": m.dtype_name if m else "",
        "memory_mode": str(m.plan.mode) if m else first.get("memory_mode"),
        "memory_reason": m.plan.reason if m else first.get("memory_reason"),
        "notes": list(engine.notes) if m else list(first.get("notes", [])),
        "queue_depth": engine.pool.waiting,
        "running": running.id if running else None,
        "running_step": (running.step, running.total) if running else None,
        "replicas": replicas,
        "replica_plan": engine.replica_plan.describe(),
        "images_made": engine.images_made,
        "uptime_s": time.time() - engine.started,
        "memory": memory_snapshot(),
        "last": engine.recent.last(),
        "pending_writes": engine.store.pending,
        "speed": engine.speed_status(replicas),
    }


def speed_phrase(sp: dict[str, Any]) -> str:
    """'ready (full speed)', 'ready (full speed in about 12 s)' or why it stays eager."""
    if sp.get("full_speed"):
        return "ready (full speed)"
    if sp.get("state") == "failed":
        return "ready (eager speed: the compile failed)"
    eta = sp.get("eta_s")
    return f"ready (full speed in about {eta:.0f} s)" if eta is not None else "ready (compiling)"


def speed_over_replicas(rows: list[dict[str, Any]], ready: bool) -> dict[str, Any]:
    """Eager or compiled, and when full speed comes, over every replica's status row: full speed
    once each ready replica's compiled blocks are live (or it compiles nothing); the wait is the
    longest."""
    speeds = [r["speed"] for r in rows if r.get("speed") and r.get("state") in ("ready", "busy")]
    if not speeds:
        return {"state": "eager-only" if ready else "loading", "full_speed": ready, "eta_s": 0.0}
    if all(sp.get("full_speed") for sp in speeds):
        live = any(sp.get("state") == "live" for sp in speeds)
        return {"state": "live" if live else "eager-only", "full_speed": True, "eta_s": 0.0}
    if all(sp.get("state") in ("failed", "live", "eager-only") for sp in speeds):
        return {"state": "failed", "full_speed": False, "eta_s": None}
    etas = [sp.get("eta_s") for sp in speeds if sp.get("eta_s") is not None]
    return {"state": "compiling", "full_speed": False, "eta_s": max(etas) if etas else None}


def refresh_metrics(engine: Engine) -> None:
    """At each /metrics scrape: storage, queue, memory of this process's GPUs, every replica's row."""
    metrics, pool = engine.metrics, engine.pool
    engine.storage()
    metrics.queue_depth.set(pool.waiting)
    metrics.running.set(len(pool.running))
    snap = memory_snapshot()
    if snap.get("host_rss_bytes") is not None:
        metrics.host_rss.set(snap["host_rss_bytes"])
    local = pool.replicas[0].name if engine.model is not None and pool.replicas else "-"
    for g in snap.get("gpus", []):  # this process's GPUs: the in-process replica's
        for kind in ("allocated", "reserved", "peak_allocated", "peak_reserved"):
            metrics.vram.labels(local, str(g["index"]), kind).set(g[f"{kind}_bytes"])
    metrics.refresh_replicas(pool.status())
