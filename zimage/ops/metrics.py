"""Prometheus metrics of one engine, in a registry of its own (several engines can live in one test)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

OUTCOMES = ("ok", "invalid", "cancelled", "oom", "error", "rejected", "unready")
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0, 60.0, 120.0)


class EngineMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("zimage_requests", "Generation requests by outcome.", ["outcome"], registry=r)
        for o in OUTCOMES:
            self.requests.labels(o)
        self.latency = Histogram(
            "zimage_request_seconds",
            "Request (GPU lock taken) to decoded image, seconds.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "zimage_queue_wait_seconds", "Time a job waited for the GPU.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.stage = Histogram(
            "zimage_stage_seconds",
            "Seconds per stage of the last jobs.",
            ["stage"],
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
        self.vram = Gauge("zimage_vram_bytes", "GPU memory of this process.", ["gpu", "kind"], registry=r)
        self.host_rss = Gauge("zimage_host_rss_bytes", "Resident host memory of this process.", registry=r)
        self.mode = Gauge("zimage_memory_mode", "Memory mode in effect (label), value 1.", ["mode"], registry=r)
        self.purge_runs = Counter("zimage_purge_runs", "Purge runs by outcome.", ["outcome"], registry=r)
        self.purged_files = Counter("zimage_purged_files", "Files removed by the purge thread.", registry=r)
        self.purged_bytes = Counter("zimage_purged_bytes", "Bytes removed by the purge thread.", registry=r)
        self._refreshers: list[Callable[[], None]] = []

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
