"""Memory watchdog: after a job, decide whether this process should make way for a fresh one.

Weeks of varied sizes fragment the CUDA caching allocator: reserved memory creeps up until
the next large request runs out of memory, and only a fresh process gets it back. Some CUDA
errors (an illegal memory access, a device-side assert) leave the context unusable for good.
In both cases the app logs why and exits with WATCHDOG_EXIT_CODE; Supervisor
(autorestart=true) starts a fresh process.

decide() is a pure function of plain data; MemoryWatchdog is the engine job listener around
it that reads the memory, logs and asks the server to exit.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from zimage.errors import EXIT_WATCHDOG

log = logging.getLogger(__name__)

GiB = 1 << 30
# EX_TEMPFAIL in sysexits.h: "a temporary failure; try again". Distinct from 0 (stopped), 1
# (crash), 2/3 (the CLI's bad input / no model) and from death by a signal. supervisor/zimage.conf
# restarts on it (autorestart=true) and does not list it in exitcodes, so the log says
# "exit status 75; not expected": a restart worth noticing.
WATCHDOG_EXIT_CODE = EXIT_WATCHDOG


class Verdict(NamedTuple):
    exit: bool
    reason: str


def decide(
    reserved_history: Sequence[int | None],
    threshold_bytes: int,
    strikes: int,
    error_text: str | None = None,
) -> Verdict:
    """Should the process exit after this job? Pure.

    reserved_history: reserved VRAM in bytes (the most used GPU) after each recent job, oldest
    first; None where it could not be read (no GPU). threshold_bytes <= 0 turns the memory
    check off; an unrecoverable CUDA error always exits, because nothing else can fix it.
    """
    from zimage.model.memory import is_unrecoverable_cuda

    if error_text and is_unrecoverable_cuda(RuntimeError(error_text)):
        return Verdict(True, f"unrecoverable CUDA error: {error_text.strip().splitlines()[0][:300]}")
    if threshold_bytes <= 0:
        return Verdict(False, "memory check off")
    strikes = max(1, int(strikes))
    recent = list(reserved_history)[-strikes:]
    over = 0
    for value in reversed(recent):  # consecutive jobs over the threshold, newest backwards
        if value is None or value <= threshold_bytes:
            break
        over += 1
    last = recent[-1] if recent else None
    if last is None:
        return Verdict(False, "no GPU memory reading")
    shown = f"reserved VRAM {last / GiB:.2f} GiB, threshold {threshold_bytes / GiB:.2f} GiB"
    if over >= strikes:
        return Verdict(True, f"{shown}: over it after {strikes} consecutive job(s)")
    if over:
        return Verdict(False, f"{shown}: over it after {over} of {strikes} job(s)")
    return Verdict(False, f"{shown}: fine")


def error_chain_text(error: BaseException | None) -> str | None:
    """The messages of an exception and its causes: the CUDA error is often the cause of ours."""
    if error is None:
        return None
    parts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        parts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return " <- ".join(parts)


def cuda_reserved_bytes(release_over: int = 0) -> int | None:
    """Reserved bytes of the most used GPU; None without CUDA.

    When the reading is over ``release_over``, the allocator's free cached blocks are
    released first and it is read again: cache that can be given back is no reason to
    restart, only what stays reserved is (fragmented, or leaked)."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None

    def read() -> int:
        return max(torch.cuda.memory_reserved(i) for i in range(torch.cuda.device_count()))

    value = read()
    if release_over > 0 and value > release_over:
        torch.cuda.empty_cache()
        value = read()
    return value


class ReplicaWatch:
    """The memory check of one replica process (a child or a Ray replica), after each of its jobs:
    the reason it should make way for a fresh process, or None."""

    def __init__(self, settings: Any):
        self.threshold = int(max(0.0, settings.watchdog_reserved_gib) * GiB)
        self.strikes = settings.watchdog_strikes
        self.history: deque[int | None] = deque(maxlen=max(self.strikes, 8))

    def after_job(self) -> str | None:
        if self.threshold <= 0:
            return None
        self.history.append(cuda_reserved_bytes(self.threshold))
        verdict = decide(self.history, self.threshold, self.strikes)
        return f"watchdog: {verdict.reason}" if verdict.exit else None


class MemoryWatchdog:
    """An engine job listener: ``engine.job_listeners.append(watchdog)``."""

    def __init__(
        self,
        threshold_gib: float,
        strikes: int,
        request_exit: Callable[[int], None],
        read_reserved: Callable[[int], int | None] = cuda_reserved_bytes,
        hard_exit_after_s: float | None = None,
    ):
        self.threshold_bytes = int(max(0.0, float(threshold_gib)) * GiB)
        self.strikes = max(1, int(strikes))
        self.request_exit = request_exit
        self.read_reserved = read_reserved
        self.hard_exit_after_s = hard_exit_after_s
        self.history: deque[int | None] = deque(maxlen=max(self.strikes, 8))
        self.jobs_seen = 0
        self.last: Verdict | None = None
        self.exiting_since: float | None = None
        self._lock = threading.Lock()

    def __call__(self, engine: Any, result: Any, error: BaseException | None) -> None:
        error_text = error_chain_text(error)
        reading: int | None = None
        if self.threshold_bytes > 0:
            try:
                reading = self.read_reserved(self.threshold_bytes)
            except Exception as exc:  # noqa: BLE001 - a broken CUDA context shows up here too
                log.warning("watchdog: could not read GPU memory: %s", exc)
                error_text = " <- ".join(t for t in (error_text, error_chain_text(exc)) if t)
        with self._lock:
            self.jobs_seen += 1
            if self.threshold_bytes > 0:
                self.history.append(reading)
            verdict = decide(self.history, self.threshold_bytes, self.strikes, error_text)
            self.last = verdict
            if not verdict.exit or self.exiting_since is not None:
                if verdict.reason and self.threshold_bytes > 0:
                    log.debug("watchdog: %s", verdict.reason)
                return
            self.exiting_since = time.time()
        log.error(
            "watchdog: exiting with code %d so that Supervisor starts a fresh process: %s",
            WATCHDOG_EXIT_CODE,
            verdict.reason,
        )
        # On its own thread: the job that just finished still gets its answer, and a
        # request_exit that waits for the server to wind down cannot block the engine.
        threading.Thread(target=self._exit, name="watchdog-exit", daemon=True).start()

    def _exit(self) -> None:
        if self.hard_exit_after_s is not None:
            # A broken CUDA context can hang the graceful path (a synchronize that never
            # returns); after this long the process goes anyway so Supervisor can restart it.
            timer = threading.Timer(self.hard_exit_after_s, _hard_exit)
            timer.daemon = True
            timer.start()
        try:
            self.request_exit(WATCHDOG_EXIT_CODE)
        except Exception:  # noqa: BLE001 - the hard exit above still comes
            log.exception("watchdog: request_exit failed")

    def status(self) -> dict[str, Any]:
        return {
            "memory_check": self.threshold_bytes > 0,  # unrecoverable CUDA errors are acted on always
            "threshold_gib": self.threshold_bytes / GiB,
            "strikes": self.strikes,
            "exit_code": WATCHDOG_EXIT_CODE,
            "jobs_seen": self.jobs_seen,
            "recent_reserved_gib": [None if v is None else round(v / GiB, 3) for v in self.history],
            "last_verdict": self.last.reason if self.last else None,
            "exiting": self.exiting_since is not None,
            "exiting_since": self.exiting_since,
        }


def _hard_exit() -> None:
    log.critical("watchdog: graceful exit did not finish in time; exiting now with code %d", WATCHDOG_EXIT_CODE)
    logging.shutdown()
    os._exit(WATCHDOG_EXIT_CODE)
