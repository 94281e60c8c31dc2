"""A job: its id, its cancel event and where it stands. Who may take a GPU, in what order, is
the replica pool's (service.replicas): one shared queue in front of one replica per GPU."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

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
    started: float = 0.0  # wall clock when a replica took it
    replica: str = ""  # the replica that ran it

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()
