"""Stage timing (CUDA events on GPU, perf_counter on CPU), the load timeline, memory readings."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("zimage.load")


def process_start_time() -> float:
    """Wall-clock time the OS started this process (so 'start to ready' includes imports)."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil missing or /proc unreadable
        return time.time()


class StageTimer:
    """Marks points on a timeline; durations between marks are resolved after one final sync.

    On CUDA each mark records an event on the current stream, so marking never blocks the
    host; `resolve()` synchronises once (the caller has already waited for the image).
    """

    def __init__(self, cuda_device: Any = None):
        self.cuda = cuda_device is not None
        self.device = cuda_device
        self._marks: list[tuple[str, Any]] = []

    def mark(self, name: str) -> Any:
        if self.cuda:
            import torch

            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(self.device))
            self._marks.append((name, ev))
            return ev
        self._marks.append((name, time.perf_counter()))
        return None

    def wait_previous(self) -> None:
        """Block until the work before the latest mark has run (CUDA); the latest stays queued."""
        if self.cuda and len(self._marks) >= 2:
            self._marks[-2][1].synchronize()

    def resolve(self) -> list[tuple[str, float]]:
        """(name, seconds since the previous mark) for every mark after the first."""
        out = []
        if self.cuda and self._marks:
            self._marks[-1][1].synchronize()
        for (_, a), (name, b) in zip(self._marks, self._marks[1:]):
            dt = a.elapsed_time(b) / 1000.0 if self.cuda else b - a
            out.append((name, dt))
        return out


@dataclass
class LoadStage:
    name: str
    start: float  # seconds since process start
    duration: float | None = None
    detail: str = ""


@dataclass
class LoadTimeline:
    """What model loading did, stage by stage, relative to process start."""

    origin: float = field(default_factory=process_start_time)
    stages: list[LoadStage] = field(default_factory=list)
    current: str = "waiting"
    percent: float = 0.0
    error: str | None = None
    ready_at: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def begin(self, name: str, detail: str = "") -> LoadStage:
        with self._lock:
            stage = LoadStage(name, time.time() - self.origin, None, detail)
            self.stages.append(stage)
            self.current = name
            self.percent = 0.0
            return stage

    def end(self, stage: LoadStage, detail: str | None = None) -> None:
        with self._lock:
            stage.duration = time.time() - self.origin - stage.start
            if detail is not None:
                stage.detail = detail
        log.info("load stage %-18s %7.2fs  %s", stage.name, stage.duration, stage.detail)

    def progress(self, fraction: float) -> None:
        self.percent = max(0.0, min(100.0, fraction * 100.0))

    def fail(self, message: str) -> None:
        with self._lock:
            self.error = message
            self.current = "failed"

    def ready(self) -> None:
        with self._lock:
            self.current = "ready"
            self.percent = 100.0
            self.ready_at = time.time() - self.origin

    def elapsed(self) -> float:
        return time.time() - self.origin

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "current": self.current,
                "percent": round(self.percent, 1),
                "elapsed_s": round(self.elapsed(), 2),
                "ready_at_s": None if self.ready_at is None else round(self.ready_at, 2),
                "error": self.error,
                "stages": [
                    {
                        "name": s.name,
                        "start_s": round(s.start, 3),
                        "duration_s": None if s.duration is None else round(s.duration, 3),
                        "detail": s.detail,
                    }
                    for s in self.stages
                ],
            }


def memory_snapshot(devices: list[Any] | None = None) -> dict[str, Any]:
    """VRAM in use / reserved / peak per GPU, and the process's host memory."""
    out: dict[str, Any] = {}
    try:
        import psutil

        out["host_rss_bytes"] = psutil.Process().memory_info().rss
    except Exception:  # noqa: BLE001
        out["host_rss_bytes"] = None
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            gpus = []
            for i in devices if devices is not None else range(torch.cuda.device_count()):
                gpus.append(
                    {
                        "index": int(i),
                        "allocated_bytes": torch.cuda.memory_allocated(i),
                        "reserved_bytes": torch.cuda.memory_reserved(i),
                        "peak_allocated_bytes": torch.cuda.max_memory_allocated(i),
                        "peak_reserved_bytes": torch.cuda.max_memory_reserved(i),
                    }
                )
            out["gpus"] = gpus
    except Exception:  # noqa: BLE001
        pass
    return out


class RecentJobs:
    """A small ring buffer of finished jobs' summaries for the profiler panel."""

    def __init__(self, size: int = 50):
        self._items: deque[dict[str, Any]] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, item: dict[str, Any]) -> None:
        with self._lock:
            self._items.append(item)

    def last(self) -> dict[str, Any] | None:
        with self._lock:
            return self._items[-1] if self._items else None
