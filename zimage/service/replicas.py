"""Replicas: one pipeline per device, all serving one shared queue.

A `Replica` is one pipeline on one device. It lives in this process (`LocalReplica`, the
single-GPU default: no extra process, no extra thread), in a child process of its own
(`zimage.service.worker.ProcessReplica`, one per GPU when the model fits on each), or behind a
Ray Serve deployment (past one box). The `ReplicaPool` is the engine's one entry: a job waits in
one shared first-come-first-served queue and goes to the first free replica; cancel and shutdown
reach a waiting job (the pool generalises the old one-GPU admission lock to N).

A replica that fails restarts itself (a process replica in a fresh process, since a CUDA error
is sticky for its process) while the others keep serving; `run` raises `ReplicaFailed` to the
one job it held, and the pool simply stops handing it jobs until it is `ready` again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from zimage.errors import Cancelled, NotReady, ShuttingDown
from zimage.model.compiler import speed_of
from zimage.service.jobs import Job
from zimage.service.payload import last_run

if TYPE_CHECKING:  # pragma: no cover
    from zimage.service.request import GenerationRequest
    from zimage.service.result import GenerationResult
    from zimage.settings import Settings

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]  # (phase, done, total), as service.runner

# Replica states, as status()["state"] and Replica.state give them.
LOADING = "loading"  # starting: loading the model and warming up
READY = "ready"  # idle, takes a job
BUSY = "busy"  # running a job
RESTARTING = "restarting"  # failed and coming back on its own
FAILED = "failed"  # failed and not coming back (load error, too many restarts)
STOPPED = "stopped"  # closed
STATES = (LOADING, READY, BUSY, RESTARTING, FAILED, STOPPED)


@runtime_checkable
class Replica(Protocol):
    """One pipeline on one device: in this process, in a child process, or a Ray Serve replica.

    The pool calls `start` once (on its own thread when there are several), then `run` for one
    job at a time, never two at once on the same replica; `state` is read often and must be
    cheap (no remote call); `status` is read by the profiler panel, /metrics and the logs.
    """

    name: str  # "gpu0", "gpu1", "ray-3"...

    @property
    def state(self) -> str:
        """One of STATES. The pool gives jobs only to a replica in READY."""
        ...

    def start(self) -> None:
        """Load the model and warm up; blocks until READY or FAILED (then raises ZImageError)."""
        ...

    def run(self, request: GenerationRequest, job: Job, progress: ProgressFn | None) -> GenerationResult:
        """Run one job. Cancelled when job.cancel() was called; ReplicaFailed when the replica died
        with it (it restarts itself); other ZImageErrors as the in-process runner raises them."""
        ...

    def status(self) -> dict[str, Any]:
        """Plain data: name, state, device, device_name, memory_mode, memory_reason, notes,
        vram {allocated_bytes, reserved_bytes, peak_allocated_bytes, total_bytes} (None when
        unknown), last_run {when, seconds, outcome, size, steps} or None, jobs_done, restarts,
        error (the last failure, one sentence) and load (the load timeline snapshot)."""
        ...

    def close(self) -> None:
        """Stop for good (a child process exits); a job running is not waited for."""
        ...


class ReplicaPool:
    """The shared queue in front of the replicas; the engine's one entry for running a job."""

    def __init__(self, replicas: list[Replica] | None = None):
        self.replicas: list[Replica] = list(replicas or [])
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._busy: dict[str, Job] = {}  # replica name -> the job it runs
        self.accepting = True

    # --- shape -------------------------------------------------------------------------

    def add(self, replica: Replica) -> None:
        with self._cond:
            self.replicas.append(replica)
            self._cond.notify_all()

    @property
    def size(self) -> int:
        """How many jobs may run at once: Gradio's concurrency limit."""
        return max(1, len(self.replicas))

    def start(self) -> None:
        """Start every replica (at once, each on its own thread when there are several); returns
        when each is READY or FAILED. Raises the first failure when none came up."""
        errors: list[BaseException] = []

        def one(r: Replica) -> None:
            try:
                r.start()
            except BaseException as exc:  # noqa: BLE001 - collected; the others keep loading
                log.error("replica %s failed to start: %s", r.name, exc)
                errors.append(exc)
            finally:
                with self._cond:
                    self._cond.notify_all()

        if len(self.replicas) == 1:
            self.replicas[0].start()  # the single-GPU default: in this thread, errors as they are
            return
        threads = [threading.Thread(target=one, args=(r,), name=f"start-{r.name}", daemon=True) for r in self.replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if not any(r.state in (READY, BUSY) for r in self.replicas):
            raise errors[0] if errors else NotReady("No replica came up.")

    # --- jobs --------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> list[Job]:
        return list(self._busy.values())

    def _free(self) -> Replica | None:
        for r in self.replicas:
            if r.name not in self._busy and r.state == READY:
                return r
        return None

    def _none_coming(self) -> bool:
        return bool(self.replicas) and all(r.state in (FAILED, STOPPED) for r in self.replicas)

    @contextlib.contextmanager
    def turn(self, job: Job) -> Iterator[Replica]:
        """Wait in the shared queue (first come, first served) for a free replica; cancel and
        shutdown reach a waiting job; then hold that replica for this job."""
        job.state = "queued"
        with self._cond:
            self._queue.append(job)
            try:
                while True:
                    if job.cancelled:
                        job.state = "cancelled"
                        raise Cancelled("Cancelled before it started.")
                    if not self.accepting:
                        raise ShuttingDown("The server is shutting down; this job did not start.")
                    if self._none_coming():
                        raise NotReady("No GPU worker is running (each failed and none is restarting); see the logs.")
                    replica = self._free() if self._queue[0] is job else None
                    if replica is not None:
                        self._busy[replica.name] = job
                        break
                    self._cond.wait(0.1)
            finally:
                self._queue.remove(job)
                self._cond.notify_all()
        job.state = "running"
        job.replica = replica.name
        job.started = time.time()
        try:
            yield replica
        finally:
            with self._cond:
                self._busy.pop(replica.name, None)
                self._cond.notify_all()

    def run(self, request: GenerationRequest, job: Job, progress: ProgressFn | None) -> GenerationResult:
        """Wait for a free replica, then run the job on it."""
        with self.turn(job) as replica:
            result = replica.run(request, job, progress)
        result.replica = replica.name
        return result

    def wake(self) -> None:
        """A replica changed state (came back after a restart): let waiting jobs look again."""
        with self._cond:
            self._cond.notify_all()

    def drain(self, grace_s: float) -> bool:
        """Stop taking jobs; wait up to grace_s for the running ones, then cancel them.

        Returns True when every running job finished on its own."""
        end = time.monotonic() + max(0.0, grace_s)
        with self._cond:
            self.accepting = False
            self._cond.notify_all()
            while self._busy and time.monotonic() < end:
                self._cond.wait(min(0.1, max(0.0, end - time.monotonic())))
            if not self._busy:
                return True
            for job in self._busy.values():
                log.warning("shutdown: cancelling job %s after %.0fs", job.id, grace_s)
                job.cancel()
            end = time.monotonic() + 30.0
            while self._busy and time.monotonic() < end:
                self._cond.wait(0.1)
        return False

    # --- reporting and the end -----------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        rows = []
        for r in self.replicas:
            try:
                row = dict(r.status())
            except Exception as exc:  # noqa: BLE001 - a broken replica still gets its row
                row = {"name": r.name, "state": r.state, "error": f"status unavailable: {exc}"}
            job = self._busy.get(r.name)
            row["job"] = job.id if job else None
            row["step"] = (job.step, job.total) if job else None
            rows.append(row)
        return rows

    def close(self) -> None:
        for r in self.replicas:
            try:
                r.close()
            except Exception:  # noqa: BLE001 - closing the others matters more
                log.exception("closing replica %s failed", r.name)


# ------------------------------------------------------------------------------------------
# the in-process replica: the single-GPU default


def warmup_requests(settings: Settings, steps: int = 2) -> list[GenerationRequest]:
    """One short generation per warm-up size (default: the preset's default size): pays for
    compiling, cuDNN/cuBLAS set-up and allocator growth before the first user does. Blocks are
    compiled with dynamic shapes, so other prompt lengths and sizes do not recompile."""
    from zimage.model.presets import model_preset, parse_size
    from zimage.model.speed import WARMUP_PROMPT
    from zimage.service.request import GenerationRequest, Limits, validate

    preset = model_preset(settings.model)
    w = settings.default_width or preset.default_size
    h = settings.default_height or preset.default_size
    sizes = [parse_size(x) for x in settings.warmup_sizes.split(",") if x.strip()] or [(w, h)]
    limits = Limits.from_settings(settings)
    return [
        validate(GenerationRequest(prompt=WARMUP_PROMPT, width=ww, height=hh, steps=steps, seed=0), limits)
        for ww, hh in sizes
    ]


class LocalReplica:
    """One pipeline in this process. With one GPU (the default) it is the only replica, and it
    costs nothing over calling the runner directly: no thread, no process, no copy."""

    # Loading patches torch globally for a moment (accelerate's init_empty_weights makes every
    # new parameter a meta tensor): two replicas of one process load one after the other.
    _loading = threading.Lock()

    def __init__(self, name: str, settings: Settings, metrics: Any, timeline: Any):
        self.name = name
        self.settings = settings
        self.metrics = metrics
        self.timeline = timeline
        self.model: Any = None  # zimage.model.pipeline.LoadedModel once started
        self.runner: Any = None
        self._state = LOADING
        self.jobs_done = 0
        self.last_run: dict[str, Any] | None = None
        self.error: str | None = None
        # The compile beside serving (zimage.model.compiler): its backend, the thread, who to tell.
        self.compile_backend: Any = "inductor"
        self.compiler: Any = None
        self.on_compile_done: Callable[[Any], None] | None = None
        self._gpu = threading.Lock()  # this replica's job, or the compile's run where memory is tight

    @property
    def state(self) -> str:
        return self._state

    def start(self) -> None:
        from zimage.model.lora import LoraLibrary, compiled
        from zimage.model.pipeline import load_model
        from zimage.service.runner import Runner

        self._state = LOADING
        try:
            with LocalReplica._loading:
                self.model = load_model(self.settings, self.timeline)
            # this replica's LoRAs live on its own pipeline (the slot before the first compiled run)
            self.loras = LoraLibrary.from_settings(self.settings)
            self.runner = Runner(self.model, self.metrics, self.settings.real_length_prompt, loras=self.loras)
            self.model.notes += self.loras.attach(self.model.pipe, compiled=compiled(self.settings, self.model))
            # Ready on the eager path; the compiled blocks build beside and go live between jobs.
            from zimage.model.compiler import start_beside

            warm = warmup_requests(self.settings)
            self.compiler = start_beside(self, warm, lambda: [self.runner.run(r, Job(), None) for r in warm])
            if self.settings.warmup:
                stage = self.timeline.begin("warm-up")
                for req in warmup_requests(self.settings, steps=1):
                    with self._gpu, self._path(eager=True):
                        self.runner.run(req, Job(), None)
                self.timeline.end(stage, "eager path, 1 step")
            if self.compiler is not None:
                self.compiler.start(self.timeline.origin)  # no-op when it started beside the warm-up
        except BaseException as exc:
            self._state = FAILED
            self.error = str(exc)
            raise
        self._state = READY
        if self.compiler is None:
            self._compile_done(None)

    def _path(self, eager: bool = False) -> contextlib.AbstractContextManager[str]:
        """The path a job starting now runs on, kept for the whole job (see zimage.model.compiler)."""
        from zimage.model.compiler import job_path

        return job_path(self, eager)

    def _compile_done(self, compiler: Any) -> None:
        from zimage.model.early import write_manifest

        write_manifest(self.settings.compile_cache_dir)  # the files the next start reads ahead
        if self.on_compile_done is not None:
            self.on_compile_done(compiler)

    def run(self, request: GenerationRequest, job: Job, progress: ProgressFn | None) -> GenerationResult:
        t0 = time.perf_counter()
        self._state = BUSY
        outcome = "error"
        try:
            with self._gpu, self._path() as path:
                result = self.runner.run_with_fallback(request, job, progress)
            result.compute_path = path
            outcome = "ok"
            self.jobs_done += 1
            return result
        except Cancelled:
            outcome = "cancelled"
            raise
        finally:
            self.last_run = last_run(t0, outcome, request)
            self._state = READY

    def status(self) -> dict[str, Any]:
        from zimage.ops.profiler import memory_snapshot

        m = self.model
        vram = None
        if m is not None and str(m.device).startswith("cuda"):
            import torch

            index = torch.device(m.device).index or 0
            gpus = {g["index"]: g for g in memory_snapshot([index]).get("gpus", [])}
            g = gpus.get(index)
            if g:
                vram = {k: g[k] for k in ("allocated_bytes", "reserved_bytes", "peak_allocated_bytes")}
                vram["total_bytes"] = torch.cuda.get_device_properties(index).total_memory
        return {
            "name": self.name,
            "state": self._state,
            "kind": "local",
            "pid": os.getpid(),
            "device": m.device if m else self.settings.device,
            "device_name": m.device_name if m else "",
            "memory_mode": str(m.plan.mode) if m else None,
            "memory_reason": m.plan.reason if m else None,
            "notes": list(m.notes) if m else [],
            "vram": vram,
            "last_run": self.last_run,
            "jobs_done": self.jobs_done,
            "restarts": 0,
            "error": self.error,
            "load": self.timeline.snapshot(),
            "speed": speed_of(self.compiler, m is not None),
        }

    def close(self) -> None:
        self._state = STOPPED
