"""Jobs and admission: who may take the GPU, in what order, and how a waiting job is cancelled.

One `Admission` per process holds the GPU lock. A job waits for the lock in short slices so a
cancel or a shutdown reaches it while it waits; the running job is known for cancel, status and
shutdown.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from zimage.errors import Cancelled, ShuttingDown

log = logging.getLogger(__name__)


@dataclass
class Job:
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    cancel_event: threading.Event = field(default_factory=threading.Event)
    state: str = "created"  # created, queued, running, done, cancelled, failed
    step: int = 0
    total: int = 0
    created: float = field(default_factory=time.time)
    want_preview: bool = False  # the runner publishes live previews (service.preview.Frame) into .preview
    preview: Any = None

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()


class Admission:
    """The GPU lock, the count of jobs waiting for it, and whether new jobs are taken at all."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._state = threading.Lock()
        self.accepting = True
        self.waiting = 0
        self.running: Job | None = None

    @contextlib.contextmanager
    def turn(self, job: Job) -> Iterator[None]:
        """Wait for the GPU (cancel and shutdown reach a waiting job), then hold it for this job."""
        job.state = "queued"
        with self._state:
            self.waiting += 1
        try:
            while not self.lock.acquire(timeout=0.1):
                if job.cancelled:
                    job.state = "cancelled"
                    raise Cancelled("Cancelled before it started.")
                if not self.accepting:
                    raise ShuttingDown("The server is shutting down; this job did not start.")
        finally:
            with self._state:
                self.waiting -= 1
        try:
            self.running = job
            job.state = "running"
            yield
        finally:
            self.running = None
            self.lock.release()

    def drain(self, grace_s: float) -> bool:
        """Stop taking jobs; wait up to grace_s for the running one, then cancel it.

        Returns True when the running job (if any) finished on its own."""
        self.accepting = False
        if self.lock.acquire(timeout=max(0.0, grace_s)):
            self.lock.release()
            return True
        job = self.running
        if job is not None:
            log.warning("shutdown: cancelling job %s after %.0fs", job.id, grace_s)
            job.cancel()
        if self.lock.acquire(timeout=30.0):
            self.lock.release()
        return False
