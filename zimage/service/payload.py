"""A result as plain data, for the trip from a replica in another process (service.worker's child,
or a Ray Serve replica) back to the studio: uint8 pixels instead of PIL images, the stage timings,
seeds and notes. One shape both ways, so a picture made in a child process or on a Ray replica
comes back as the same GenerationResult the in-process replica returns."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from zimage.service.jobs import Job
    from zimage.service.request import GenerationRequest
    from zimage.service.result import GenerationResult


def to_payload(result: GenerationResult) -> dict[str, Any]:
    """The result's fields a replica sends: one uint8 (H, W, 3) array per image."""
    import numpy as np

    return {
        "pixels": [np.asarray(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8) for im in result.images],
        "seeds": list(result.seeds),
        "timings": result.timings,
        "notes": list(result.notes),
        "model": result.model,
        "memory_mode": str(result.memory_mode),
        "device": result.device,
        "compute_path": result.compute_path,
    }


def from_payload(payload: dict[str, Any], request: GenerationRequest, job: Job, replica: str = "") -> GenerationResult:
    """The GenerationResult a payload stands for (the request is the caller's own copy)."""
    from PIL import Image

    from zimage.service.result import GenerationResult

    return GenerationResult(
        request=request,
        images=[Image.fromarray(a) for a in payload["pixels"]],
        seeds=payload["seeds"],
        timings=payload["timings"],
        model=payload["model"],
        memory_mode=payload["memory_mode"],
        device=payload["device"],
        job_id=job.id,
        replica=replica,
        notes=list(payload["notes"]),
        compute_path=payload.get("compute_path", "eager"),
    )


def relay_progress(job: Job, progress: Any, phase: str, done: int, total: int) -> None:
    """A replica's ("progress", phase, done, total) message, passed on: the job's step (the panel and
    the queue read it) and the caller's progress callback."""
    if phase == "denoise":
        job.step = done
    if progress is not None:
        progress(phase, done, total)


def last_run(t0: float, outcome: str, request: GenerationRequest) -> dict[str, Any]:
    """A replica's last job as its status row shows it (t0: time.perf_counter() at its start)."""
    return {
        "when": time.time(),
        "seconds": round(time.perf_counter() - t0, 4),
        "outcome": outcome,
        "size": f"{request.width}x{request.height}",
        "steps": request.steps,
    }
