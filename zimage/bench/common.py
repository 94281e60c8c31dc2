"""Shared pieces of the benchmark: the prompt, the row marker, small number helpers, the page cache."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

PROMPT = (
    "A weathered lighthouse on a rocky cliff at dusk, waves crashing below, warm light in the "
    "windows, seagulls, dramatic clouds"
)
MARK = "BENCH_ROW "


def now() -> float:
    return time.time()


def origin() -> float:
    from zimage.ops.profiler import process_start_time

    return process_start_time()


def emit(row: dict[str, Any]) -> None:
    print(MARK + json.dumps(row), flush=True)


def gib(n: float) -> float:
    return round(n / 2**30, 3)


def peak(torch) -> dict[str, float]:
    if not torch.cuda.is_available():
        import psutil

        return {"peak_host_rss_gib": gib(psutil.Process().memory_info().rss)}
    return {
        "peak_allocated_gib": gib(torch.cuda.max_memory_allocated()),
        "peak_reserved_gib": gib(torch.cuda.max_memory_reserved()),
    }


def median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 4) if xs else None


def drop_caches(files: list[Path]) -> str:
    """Drop the page cache: the whole of it when we may (root), else these files' pages."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        from zimage.model.weights import drop_page_cache

        drop_page_cache(files)
        return "fadvise"


def versions() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    for name in ("torch", "diffusers", "transformers", "accelerate", "safetensors"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            info[name] = None
    try:
        import torch

        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
            info["gpu_total_gib"] = gib(torch.cuda.get_device_properties(0).total_memory)
        else:
            info["device"] = "cpu"
    except Exception:  # noqa: BLE001
        info["device"] = None
    info["cpus"] = os.cpu_count()
    return info
