"""A replica in a child process of its own: one per GPU when the model fits on each.

Why a process and not a thread: a CUDA error such as an illegal memory access is sticky for the
process that met it (every later CUDA call fails), so a replica that must be restarted alone,
while the others keep serving, needs a process of its own. Each child sees only its GPU
(CUDA_VISIBLE_DEVICES) and runs the same in-process replica (`LocalReplica`: load, warm up,
`Runner.run_with_fallback`) as the single-GPU default does. The web process never touches CUDA.

One multiprocessing pipe per child carries tuples:
  child -> parent  ("load", timeline snapshot)   while loading, every half second
                   ("ready", info)  or  ("failed", message)
                   ("progress", phase, done, total)
                   ("result", payload)  payload: service.payload (uint8 pixels, seeds, timings, notes...)
                   ("error", error class name, message, exit_after)
  parent -> child  ("run", request, job id)  or  ("close",)
Cancel is one multiprocessing Event per child: the parent sets it, the child's runner reads it
between denoising steps exactly as in-process. When the child must go (an unrecoverable CUDA
error, or the memory watchdog's verdict after a job), it answers the job first, with
exit_after set, and exits; the parent then restarts it alone. A child that dies without a word
(killed, crashed) is found through its process sentinel.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from multiprocessing.connection import wait as wait_for
from typing import TYPE_CHECKING, Any

from zimage import errors
from zimage.errors import Cancelled, ReplicaFailed, ZImageError
from zimage.service.child import child_main
from zimage.service.payload import from_payload, last_run, relay_progress
from zimage.service.replicas import BUSY, FAILED, LOADING, READY, RESTARTING, STOPPED, ProgressFn

if TYPE_CHECKING:  # pragma: no cover
    from zimage.service.jobs import Job
    from zimage.service.request import GenerationRequest
    from zimage.service.result import GenerationResult
    from zimage.settings import Settings

log = logging.getLogger(__name__)

START_TIMEOUT_S = 1800.0  # a cold start on a slow disk: download excluded, load + compile + warm-up
CLOSE_TIMEOUT_S = 10.0


class _Died(Exception):
    """The child process ended (or its pipe broke) without answering."""


class ProcessReplica:
    """Parent side of one child-process replica (see the module docstring)."""

    def __init__(
        self,
        name: str,
        settings: Settings,
        visible_devices: str | None,
        on_change: Any = None,
        max_restarts: int = 5,
        device: str | None = None,
    ):
        """settings: what the child loads with (device "cuda:0" of its own view, or "cpu");
        visible_devices: the CUDA_VISIBLE_DEVICES the child gets (None: unchanged);
        device: its device as this process numbers them ("cuda:1"), for status and logs."""
        self.name = name
        self.device = device or settings.device
        self.settings = settings
        self.visible_devices = visible_devices
        self.on_change = on_change
        self.max_restarts = max_restarts
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._conn: Any = None
        self._cancel: Any = None
        self._state = LOADING
        self._restart_lock = threading.Lock()
        self.info: dict[str, Any] = {}
        self.load: dict[str, Any] = {}
        self.vram: dict[str, Any] | None = None
        self.last_run: dict[str, Any] | None = None
        self.jobs_done = 0
        self.restarts = 0
        self.oom_total = 0.0
        self.error: str | None = None
        self.started_s: float | None = None  # seconds the last start took (spawn to ready)

    @property
    def state(self) -> str:
        return self._state

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _set_state(self, state: str) -> None:
        self._state = state
        if self.on_change is not None:
            try:
                self.on_change(self)
            except Exception:  # noqa: BLE001 - a listener must not break the replica
                log.exception("replica %s: state listener failed", self.name)

    # --- starting -------------------------------------------------------------------------

    def _spawn(self) -> None:
        parent_conn, child_conn = self._ctx.Pipe()
        cancel = self._ctx.Event()
        proc = self._ctx.Process(
            target=child_main,
            args=(self.name, self.settings, self.visible_devices, child_conn, cancel),
            name=f"zimage-{self.name}",
            # Not a daemon: a daemonic process may not start processes of its own, and the compiler's
            # worker pool does. close() ends it; without a parent it reads EOF and exits.
            daemon=False,
        )
        proc.start()
        child_conn.close()  # the child holds its end: EOF here once it is gone
        self._proc, self._conn, self._cancel = proc, parent_conn, cancel

    def _recv(self, timeout: float) -> tuple | None:
        """The next message, None after timeout; _Died once the child is gone."""
        ready = wait_for([self._conn, self._proc.sentinel], timeout)
        if self._conn in ready:
            try:
                return self._conn.recv()
            except (EOFError, OSError):
                raise _Died(self._exit_text()) from None
        if self._proc.sentinel in ready:
            raise _Died(self._exit_text())
        return None

    def _exit_text(self) -> str:
        self._proc.join(1.0)
        code = self._proc.exitcode
        if code is None:
            return "its pipe broke"
        if code < 0:
            return f"it was stopped by signal {-code}"
        return f"it exited with code {code}"

    def start(self) -> None:
        """Spawn the child and wait until it has loaded and warmed up."""
        self._set_state(LOADING)
        t0 = time.perf_counter()
        self._spawn()
        try:
            self._await_ready()
        except BaseException as exc:
            self.error = str(exc)
            self._kill()
            self._set_state(FAILED)
            raise
        self.started_s = time.perf_counter() - t0
        log.info("replica %s ready in %.1fs (pid %s, %s)", self.name, self.started_s, self.pid, self.device)
        self._set_state(READY)

    def _await_ready(self) -> None:
        end = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < end:
            try:
                msg = self._recv(0.5)
            except _Died as died:
                raise ZImageError(f"GPU worker {self.name} stopped while loading: {died}.") from None
            if msg is None:
                continue
            if msg[0] == "load":
                self.load = msg[1]
                if self.on_change is not None:
                    self.on_change(self)
            elif msg[0] == "ready":
                self.info = msg[1]
                self.vram = self.info.get("vram")
                self.load = self.info.get("load", self.load)
                self.error = None
                return
            elif msg[0] == "failed":
                raise ZImageError(f"GPU worker {self.name} could not load the model: {msg[1]}")
        raise ZImageError(f"GPU worker {self.name} did not become ready within {START_TIMEOUT_S:.0f}s.")

    # --- running -------------------------------------------------------------------------

    def run(self, request: GenerationRequest, job: Job, progress: ProgressFn | None) -> GenerationResult:
        t0 = time.perf_counter()
        self._set_state(BUSY)
        outcome = "error"
        exit_after: str | None = None
        try:
            self._cancel.clear()
            try:
                self._conn.send(("run", request, job.id, job.want_preview))
            except (OSError, ValueError) as exc:
                raise _Died(f"its pipe broke ({exc})") from None
            told_cancel = False
            while True:
                if job.cancelled and not told_cancel:
                    self._cancel.set()
                    told_cancel = True
                msg = self._recv(0.05)
                if msg is None:
                    continue
                kind = msg[0]
                if kind == "progress":
                    relay_progress(job, progress, *msg[1:])
                elif kind == "preview":  # a live preview frame (service.preview.Frame's fields)
                    from zimage.service.preview import Frame

                    job.preview = Frame(*msg[1:])
                elif kind == "result":
                    payload = msg[1]
                    exit_after = payload.get("exit_after")
                    result = self._result(payload, request, job)
                    outcome = "ok"
                    self.jobs_done += 1
                    return result
                elif kind == "error":
                    _, cls_name, message, exit_after = msg
                    outcome = "cancelled" if cls_name == "Cancelled" else "error"
                    raise _error(cls_name, message, self.name)
        except _Died as died:
            exit_after = f"the worker process ended while running a job: {died}"
            raise ReplicaFailed(
                f"The GPU worker {self.name} stopped while making your picture ({died}); it is being restarted "
                "and the other GPUs keep serving. Please try again."
            ) from None
        finally:
            self.last_run = last_run(t0, outcome, request)
            if exit_after:
                self.restart_later(exit_after)
            elif self._state == BUSY:
                self._set_state(READY)

    def _result(self, payload: dict[str, Any], request: GenerationRequest, job: Job) -> GenerationResult:
        self.vram = payload.get("vram") or self.vram
        self.oom_total = payload.get("oom_total", self.oom_total)
        self.info["speed"] = payload.get("speed") or self.info.get("speed")  # the child's compile beside
        return from_payload(payload, request, job)

    # --- failing and coming back ----------------------------------------------------------

    def restart_later(self, reason: str) -> None:
        """Replace the child with a fresh one, on a thread of its own (the others keep serving)."""
        with self._restart_lock:
            if self._state in (RESTARTING, STOPPED):
                return
            self.error = reason
            self.restarts += 1
            self._set_state(RESTARTING)
        log.error("replica %s: restarting it alone: %s", self.name, reason)
        threading.Thread(target=self._restart, name=f"restart-{self.name}", daemon=True).start()

    def _restart(self) -> None:
        self._kill()
        for attempt in range(1, 4):
            if self._state == STOPPED:
                return
            if self.restarts > self.max_restarts:
                break
            try:
                t0 = time.perf_counter()
                self._spawn()
                self._await_ready()
                self.started_s = time.perf_counter() - t0
                log.info("replica %s: back after a restart in %.1fs (pid %s)", self.name, self.started_s, self.pid)
                self._set_state(READY)
                return
            except Exception as exc:  # noqa: BLE001 - logged; tried again, then given up
                log.error("replica %s: restart attempt %d failed: %s", self.name, attempt, exc)
                self.error = str(exc)
                self._kill()
                time.sleep(2.0 * attempt)
        if self._state != STOPPED:
            log.error(
                "replica %s: giving up after %d restarts; the other replicas keep serving", self.name, self.restarts
            )
            self._set_state(FAILED)

    def _kill(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.is_alive():
            proc.terminate()
            proc.join(CLOSE_TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
                proc.join(CLOSE_TIMEOUT_S)
        try:
            self._conn.close()
        except OSError:
            pass

    def close(self) -> None:
        self._set_state(STOPPED)
        proc = self._proc
        if proc is None:
            return
        try:
            self._conn.send(("close",))
        except (OSError, ValueError):
            pass
        proc.join(CLOSE_TIMEOUT_S)
        self._kill()

    # --- reporting -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        info = self.info
        return {
            "name": self.name,
            "state": self._state,
            "kind": "process",
            "pid": self.pid,
            "device": self.device,
            "gpu": self.visible_devices,
            "device_name": info.get("device_name", ""),
            "memory_mode": info.get("memory_mode"),
            "memory_reason": info.get("memory_reason"),
            "notes": list(info.get("notes", [])),
            "vram": self.vram,
            "last_run": self.last_run,
            "jobs_done": self.jobs_done,
            "restarts": self.restarts,
            "start_s": None if self.started_s is None else round(self.started_s, 2),
            "error": self.error,
            "load": self.load,
            "speed": info.get("speed"),  # as of the child's last report (ready, or its last job)
        }


def _error(cls_name: str, message: str, name: str) -> BaseException:
    """The child's error as the same class in this process (its message is already user-facing)."""
    if cls_name == "Cancelled":
        return Cancelled(message)
    cls = getattr(errors, cls_name, None)
    if isinstance(cls, type) and issubclass(cls, ZImageError):
        try:
            return cls(message)
        except TypeError:  # an error class with its own constructor (InvalidRequest)
            pass
    return errors.GenerationFailed(message)
