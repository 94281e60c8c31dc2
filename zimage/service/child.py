"""The child side of a process replica (see zimage.service.worker): load and warm up one
replica, then run the jobs the parent sends until it says close. Kept free of torch at import,
so CUDA_VISIBLE_DEVICES is set before torch starts in this process."""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from zimage.errors import Cancelled, ZImageError
from zimage.model.compiler import speed_of
from zimage.service.replicas import LocalReplica

if TYPE_CHECKING:  # pragma: no cover
    from zimage.settings import Settings

log = logging.getLogger(__name__)


def _vram(device: str) -> dict[str, Any] | None:
    import torch

    if not (str(device).startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    i = torch.device(device).index or 0
    return {
        "allocated_bytes": torch.cuda.memory_allocated(i),
        "reserved_bytes": torch.cuda.memory_reserved(i),
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(i),
        "total_bytes": torch.cuda.get_device_properties(i).total_memory,
    }


def child_main(name: str, settings: Settings, visible_devices: str | None, conn: Any, cancel: Any) -> None:
    """The child process: load and warm up one replica, then run jobs until told to close."""
    if visible_devices is not None:  # before torch is imported in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices
    logging.basicConfig(
        level=getattr(logging, settings.log_level, logging.INFO),
        format=f"%(asctime)s %(levelname)s [{name}] %(name)s: %(message)s",
    )
    from zimage.ops.metrics import EngineMetrics
    from zimage.ops.profiler import LoadTimeline

    send_lock = threading.Lock()

    def send(msg: tuple) -> None:
        with send_lock:
            conn.send(msg)

    timeline = LoadTimeline()
    metrics = EngineMetrics()
    replica = LocalReplica(name, settings, metrics, timeline)
    loading = threading.Event()

    def report_load() -> None:
        while not loading.wait(0.5):
            try:
                send(("load", timeline.snapshot()))
            except (OSError, ValueError):
                return

    reporter = threading.Thread(target=report_load, name="load-report", daemon=True)
    reporter.start()
    try:
        replica.start()
    except BaseException as exc:  # noqa: BLE001 - told to the parent, which decides
        loading.set()
        text = str(exc) if isinstance(exc, ZImageError) else f"{type(exc).__name__}: {str(exc)[:300]}"
        log.exception("loading failed")
        send(("failed", text))
        return
    loading.set()
    reporter.join()
    timeline.ready()
    m = replica.model
    info = {
        "device": m.device,
        "device_name": m.device_name,
        "memory_mode": str(m.plan.mode),
        "memory_reason": m.plan.reason,
        "notes": list(m.notes),
        "vram": _vram(m.device),
        "load": timeline.snapshot(),
        "pid": os.getpid(),
        "speed": speed_of(replica.compiler, True),
    }
    send(("ready", info))
    _serve(name, settings, replica, metrics, conn, send, cancel)


def _serve(name, settings, replica, metrics, conn, send, cancel) -> None:
    from collections import deque

    from zimage.model.memory import is_unrecoverable_cuda
    from zimage.ops.watchdog import cuda_reserved_bytes, decide, error_chain_text
    from zimage.service.jobs import Job

    threshold = int(max(0.0, settings.watchdog_reserved_gib) * (1 << 30))
    history: deque[int | None] = deque(maxlen=max(settings.watchdog_strikes, 8))
    device = replica.model.device
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if msg[0] == "close":
            return
        if msg[0] != "run":
            continue
        _, request, job_id, *more = msg
        job = Job(id=job_id, cancel_event=cancel, want_preview=bool(more and more[0]))

        def progress(phase: str, done: int, total: int, job: Job = job, sent: list[Any] = [None]) -> None:  # noqa: B006
            send(("progress", phase, done, total))
            frame = job.preview
            if frame is not None and frame is not sent[0]:  # a new live preview frame (12 KB at most)
                sent[0] = frame
                send(("preview", frame.step, frame.total, frame.rgb))

        error: BaseException | None = None
        reply: tuple
        try:
            result = replica.run(request, job, progress)
            reply = ("result", _payload(result, metrics, device))
            reply[1]["speed"] = speed_of(replica.compiler, True)  # the compile beside, as of now
        except Cancelled as exc:
            reply = ("error", "Cancelled", str(exc) or "Cancelled.", None)
        except ZImageError as exc:
            error = exc
            reply = ("error", type(exc).__name__, str(exc), None)
        except Exception as exc:  # noqa: BLE001 - told to the parent as one clear sentence
            error = exc
            log.error("generation failed", exc_info=exc)
            reply = ("error", "GenerationFailed", f"Generation failed: {type(exc).__name__}: {str(exc)[:300]}", None)
        # Must this process go? An unrecoverable CUDA error, or reserved memory over the watchdog's line.
        exit_after = None
        text = error_chain_text(error)
        if text and is_unrecoverable_cuda(RuntimeError(text)):
            exit_after = "an unrecoverable CUDA error"
            reply = (
                "error",
                "ReplicaFailed",
                f"The GPU worker {name} hit an unrecoverable CUDA error while making your picture; it is being "
                "restarted and the other GPUs keep serving. Please try again.",
                exit_after,
            )
        elif threshold > 0:
            history.append(cuda_reserved_bytes(threshold))
            verdict = decide(history, threshold, settings.watchdog_strikes)
            if verdict.exit:
                exit_after = f"watchdog: {verdict.reason}"
        if exit_after:
            if reply[0] == "result":
                reply[1]["exit_after"] = exit_after
            else:
                reply = (*reply[:3], exit_after)
        try:
            send(reply)
        except (OSError, ValueError):
            return
        if exit_after:
            log.error("exiting for a fresh process: %s", exit_after)
            logging.shutdown()
            os._exit(75)  # the parent restarts this replica; a broken CUDA context may hang a clean exit


def _payload(result: Any, metrics: Any, device: str) -> dict[str, Any]:
    from zimage.service.payload import to_payload

    return {
        **to_payload(result),
        "vram": _vram(device),
        "oom_total": metrics.registry.get_sample_value("zimage_oom_total") or 0.0,
        "exit_after": None,
    }
