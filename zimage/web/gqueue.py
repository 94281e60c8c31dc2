"""What Gradio's own queue holds for the GPU group: who waits (session, user, size of the job) and
removing one session's waiting events. People wait in Gradio's queue (one concurrency group of
limit 1 for every GPU listener) until their turn; the engine sees a job only once it runs.

This reads Gradio internals (`Blocks._queue`, its per-concurrency-id event lists, and the same
calls its own /cancel route makes), pinned by requirements (gradio>=6.20,<7) and covered by the
browser and server tests: a Gradio release that moves them fails those tests, not users.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Waiting:
    """One event waiting for the GPU: whose, and the size of its job (None where unknown)."""

    event_id: str
    session: str
    user: str
    fn_id: int
    width: Any = None
    height: Any = None
    steps: Any = None
    count: Any = None


def _event_queue(blocks: Any, concurrency_id: str) -> Any:
    queue = getattr(blocks, "_queue", None)
    per_id = getattr(queue, "event_queue_per_concurrency_id", None) or {}
    return per_id.get(concurrency_id)


def waiting(blocks: Any, concurrency_id: str) -> list[Waiting]:
    """The events waiting in this concurrency group, first in line first ([] if unreadable)."""
    try:
        eq = _event_queue(blocks, concurrency_id)
        events = list(eq.queue) if eq is not None else []
        out = []
        for e in events:
            data = list(getattr(getattr(e, "data", None), "data", None) or [])
            size = (data + [None] * 8)[:8]  # every GPU listener takes the form's first 8 fields in order
            out.append(
                Waiting(
                    event_id=e._id,
                    session=e.session_hash,
                    user=e.username or "",
                    fn_id=getattr(e.fn, "_id", -1),
                    width=size[2],
                    height=size[3],
                    steps=size[4],
                    count=size[7],
                )
            )
        return out
    except Exception:  # noqa: BLE001 - Gradio internals; a reading must never break a handler
        log.debug("cannot read Gradio's queue", exc_info=True)
        return []


def running_count(blocks: Any, concurrency_id: str) -> int:
    try:
        eq = _event_queue(blocks, concurrency_id)
        return int(eq.current_concurrency) if eq is not None else 0
    except Exception:  # noqa: BLE001
        return 0


async def drop(blocks: Any, concurrency_id: str, session: str, completion) -> int:
    """Remove this session's waiting events from the queue, and end each one's stream with
    `completion(fn_id)` -> (output dict, success): what its browser or client then shows.

    Returns how many were removed."""
    from gradio.server_messages import ProcessCompletedMessage

    queue = blocks._queue
    mine = [w for w in waiting(blocks, concurrency_id) if w.session == session]
    removed = 0
    for w in mine:
        event = queue.event_ids_to_events.get(w.event_id)
        if event is None or event not in _event_queue(blocks, concurrency_id).queue:
            continue  # it started meanwhile
        await queue.remove_from_queue(w.event_id)
        if any(event in (job or ()) for job in queue.active_jobs):
            continue  # it started while we waited for the queue's lock: the run itself is cancelled
        output, success = completion(w.fn_id)
        queue.send_message(event, ProcessCompletedMessage(output=output, success=success, title=None))
        removed += 1
    return removed
