"""Long-running duties beside the server: the purge thread and the memory watchdog.

The server creates one Operations object after the engine, calls start() once the app
serves and stop() on shutdown, and shows status() in the profiler panel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Operations:
    def __init__(self, engine: Any, settings: Any, request_exit: Callable[[int], None]):
        self.engine = engine
        self.settings = settings
        self.request_exit = request_exit

    def start(self) -> None:
        """Start background duties (nothing yet: the purge thread and watchdog arrive with issue 4)."""

    def stop(self) -> None:
        """Stop background duties; returns promptly."""

    def status(self) -> dict[str, Any]:
        return {}
