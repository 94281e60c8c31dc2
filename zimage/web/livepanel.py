"""The live panel and the queue note: answered off the queue, every second, while the GPU is busy.
Studio (handlers.py) mixes `PanelHandlers` in."""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr

from zimage.web import gqueue
from zimage.web.i18n import lang_of
from zimage.web.panels import render_banner, render_profiler, render_queue_note

log = logging.getLogger(__name__)

GPU_QUEUE = "gpu"  # the one concurrency group of every listener that runs the pipeline


def _session(request: Any) -> str:
    return getattr(request, "session_hash", None) or ""


class PanelHandlers:
    """tick (profiler, banner, queue note) and this tab's place in the queue (uses self.engine,
    self.ops, self.blocks, self.runs and Studio's defaults)."""

    engine: Any
    ops: Any
    blocks: Any
    runs: Any

    def tick(self, request: gr.Request = None):
        """(profiler, banner, queue note): the live panel, and this tab's place in the queue."""
        lang = lang_of(request)
        status = self.engine.status()
        try:
            ops_status = self.ops.status() if self.ops is not None else {}
        except Exception:  # noqa: BLE001 - the panel must keep answering
            log.exception("ops.status failed")
            ops_status = {"status": "unavailable (see log)"}
        waiting = gqueue.waiting(self.blocks, GPU_QUEUE)
        users: dict[str, int] = {}
        for w in waiting:
            users[w.user or "-"] = users.get(w.user or "-", 0) + 1
        queue = {"waiting": len(waiting), "users": users}
        return (
            render_profiler(status, ops_status, queue, lang),
            render_banner(status, lang),
            render_queue_note(self.place(_session(request), waiting), lang),
        )

    def place(self, session: str, waiting: list[gqueue.Waiting] | None = None) -> dict[str, Any] | None:
        """This tab's first waiting job: its place in line and an ETA from measured step times."""
        waiting = gqueue.waiting(self.blocks, GPU_QUEUE) if waiting is None else waiting
        mine = next((i for i, w in enumerate(waiting) if w.session == session), None)
        if mine is None:
            return None
        clock = self.runs.clock
        running = self.runs.running()
        busy = self.engine.running_job is not None or gqueue.running_count(self.blocks, GPU_QUEUE) > 0
        eta: float | None = 0.0
        if running is not None:
            eta = clock.remaining(running)
        elif busy:
            eta = None  # an API job: its size is not known here
        w0, h0, s0 = self.defaults
        for w in waiting[: mine + 1]:
            if eta is None:
                break
            est = clock.estimate(w.width or w0, w.height or h0, w.steps or s0, w.count or 1, like=running)
            eta = None if est is None else eta + est
        return {
            "place": mine + 1 + (1 if busy else 0),
            "eta_s": eta,
            "running_mine": bool(self.runs.active_of_session(session)),
        }

    def gradio_waiting(self) -> int:
        """Requests waiting in Gradio's queue (not yet handed to the engine)."""
        return len(gqueue.waiting(self.blocks, GPU_QUEUE))
