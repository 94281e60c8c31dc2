"""Prometheus metrics of one engine, in a registry of its own (several engines can live in one test)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# unsaved: the image was made and handed to the user, but writing its PNG failed;
# nospace: refused before it ran, the outputs disk being below min_free_mib.
OUTCOMES = ("ok", "unsaved", "nospace", "invalid", "cancelled", "oom", "error", "rejected", "unready")
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0, 60.0, 120.0)


class EngineMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("zimage_requests", "Generation requests by outcome.", ["outcome"], registry=r)
        for o in OUTCOMES:
            self.requests.labels(o)
        self.latency = Histogram(
            "zimage_request_seconds",
            "Request (GPU lock taken) to decoded image, seconds, by replica.",
            ["replica"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "zimage_queue_wait_seconds", "Time a job waited for the GPU.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.stage = Histogram(
            "zimage_stage_seconds",
            "Seconds per stage of the last jobs, by replica.",
            ["stage", "replica"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.images = Counter("zimage_images", "Images generated.", registry=r)
        self.oom = Counter("zimage_oom", "CUDA out-of-memory errors met during requests.", registry=r)
        self.load_seconds = Gauge("zimage_model_load_seconds", "Process start to model ready, seconds.", registry=r)
        self.ready = Gauge("zimage_ready", "1 once the model is loaded and warmed.", registry=r)
        self.full_speed = Gauge(
            "zimage_full_speed", "1 once new jobs run at full speed (compiled blocks live, or no compile).", registry=r
        )
        self.jobs_by_path = Counter(
            "zimage_jobs_by_path", "Finished jobs by the path that ran them: eager or compiled.", ["path"], registry=r
        )
        for p in ("eager", "compiled"):
            self.jobs_by_path.labels(p)
        self.queue_depth = Gauge("zimage_queue_depth", "Jobs waiting for the GPU.", registry=r)
        self.running = Gauge("zimage_running_jobs", "Jobs running on the GPU (0 or 1).", registry=r)
        self.vram = Gauge(
            "zimage_vram_bytes", "GPU memory of each replica (its process).", ["replica", "gpu", "kind"], registry=r
        )
        self.replica_images = Counter("zimage_replica_images", "Images made, by replica.", ["replica"], registry=r)
        self.replica_state = Gauge(
            "zimage_replica_state", "State of each replica (label), value 1.", ["replica", "state"], registry=r
        )
        self.replica_restarts = Gauge(
            "zimage_replica_restarts", "Times each replica was restarted alone.", ["replica"], registry=r
        )
        self.replica_pid = Gauge("zimage_replica_pid", "Process id of each replica.", ["replica"], registry=r)
        self.replica_last_run = Gauge(
            "zimage_replica_last_run_seconds", "Seconds of each replica's last run.", ["replica"], registry=r
        )
        self.load_aware = Counter(
            "zimage_load_aware_reduced",
            "Jobs run with fewer steps than asked because the queue was long (load-aware steps).",
            registry=r,
        )
        self.host_rss = Gauge("zimage_host_rss_bytes", "Resident host memory of this process.", registry=r)
        self.mode = Gauge("zimage_memory_mode", "Memory mode in effect (label), value 1.", ["mode"], registry=r)
        self.outputs_free = Gauge(
            "zimage_outputs_free_bytes", "Free space on the disk of the outputs folder.", registry=r
        )
        self.storage_ok = Gauge(
            "zimage_storage_ok",
            "1 while outputs can be saved (enough free space, writable, last save fine), else 0.",
            registry=r,
        )
        self.purge_runs = Counter("zimage_purge_runs", "Purge runs by outcome.", ["outcome"], registry=r)
        self.purged_files = Counter("zimage_purged_files", "Files removed by the purge thread.", registry=r)
        self.purged_bytes = Counter("zimage_purged_bytes", "Bytes removed by the purge thread.", registry=r)
        self._refreshers: list[Callable[[], None]] = []
        self._replica_series: dict[str, set[tuple[str, str]]] = {}  # replica -> its (gpu, kind) VRAM series

    def refresh_replicas(self, rows: list[dict]) -> None:
        """Per-replica state, restarts, last run and (for child-process replicas) VRAM. A replica no
        longer listed (a Ray Serve replica replaced or scaled down) loses its series."""
        from zimage.service.replicas import STATES

        names = {row.get("name", "?") for row in rows}
        for gone in set(self._replica_series) - names:
            for gauge, labels in (
                *((self.replica_state, (gone, state)) for state in STATES),
                (self.replica_restarts, (gone,)),
                (self.replica_pid, (gone,)),
                (self.replica_last_run, (gone,)),
                *((self.vram, (gone, gpu, kind)) for gpu, kind in self._replica_series[gone]),
            ):
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)
            del self._replica_series[gone]
        for row in rows:
            self._replica_series.setdefault(row.get("name", "?"), set())
            name = row.get("name", "?")
            for state in STATES:
                self.replica_state.labels(name, state).set(1 if row.get("state") == state else 0)
            self.replica_restarts.labels(name).set(row.get("restarts") or 0)
            if row.get("pid"):
                self.replica_pid.labels(name).set(row["pid"])
            last = row.get("last_run") or {}
            if last.get("seconds") is not None:
                self.replica_last_run.labels(name).set(last["seconds"])
            vram = row.get("vram")
            if vram and row.get("kind") != "local":  # the local replica's VRAM is this process's, read directly
                gpu = str(row.get("gpu") or row.get("device") or "")
                for kind in ("allocated", "reserved", "peak_allocated"):
                    if vram.get(f"{kind}_bytes") is not None:
                        self.vram.labels(name, gpu, kind).set(vram[f"{kind}_bytes"])
                        self._replica_series[name].add((gpu, kind))

    def on_scrape(self, fn: Callable[[], None]) -> None:
        """Run fn before each export (to read VRAM, queue depth...)."""
        self._refreshers.append(fn)

    def render(self) -> bytes:
        for fn in self._refreshers:
            try:
                fn()
            except Exception:  # noqa: BLE001 - a reading must never break /metrics
                pass
        return generate_latest(self.registry)
