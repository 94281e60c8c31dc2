"""How a request ended, in words: its outcome label (the requests_total metric's), its one log
line, and the sentence that tells the user which images could not be saved. Pure functions: the
engine counts, logs and tells its listeners."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zimage.errors import BadLora, Cancelled, InvalidRequest, NoSpace, NotReady, OutOfMemory, ShuttingDown
from zimage.service.store import write_problem

if TYPE_CHECKING:  # pragma: no cover
    from zimage.service.request import GenerationRequest
    from zimage.service.result import GenerationResult
    from zimage.service.store import SaveReport

OUTCOMES: dict[type, str] = {
    InvalidRequest: "invalid",
    BadLora: "invalid",
    NotReady: "unready",
    ShuttingDown: "rejected",
    Cancelled: "cancelled",
    OutOfMemory: "oom",
    NoSpace: "nospace",
}
REFUSED = ("invalid", "unready", "nospace")  # refused before it ran: no job listener cares


def outcome_of(error: BaseException) -> str:
    return OUTCOMES.get(type(error), "error")


def request_line(req: GenerationRequest, result: GenerationResult | None, outcome: str, error: Any) -> tuple:
    """The log line of one request, as logging's (format, *args): every request gets one, the ones
    that never ran too (invalid, refused while shutting down or loading, cancelled in the queue);
    %s because an invalid request may hold any value."""
    times = result.timings.summary() if result else f"error: {str(error)[:200]}"
    if result is not None:
        times = f"path {result.compute_path}, {times}"
    if result is not None and error is not None:
        times += f", save error: {str(error)[:200]}"
    return (
        "request user=%s replica=%s size=%sx%s steps=%s count=%s seed=%s outcome=%s %s",
        req.user or "-",
        (result.replica if result else "") or "-",
        req.width,
        req.height,
        req.steps,
        req.count,
        req.seed,
        outcome,
        times,
    )


def unsaved_sentence(report: SaveReport, total: int) -> str:
    """What the user reads when some (or all) of a job's images could not be written."""
    n = len(report.unsaved)
    why = write_problem(report.error)
    it = "it" if n == 1 else "them"
    if total == 1:
        what = f"the image was made, but it could not be written to the outputs folder because {why}"
    elif n == total:
        what = f"the {total} images were made, but they could not be written to the outputs folder because {why}"
    else:
        what = f"{n} of the {total} images could not be written to the outputs folder because {why} (the others were)"
    return f"Not saved: {what}. Download {it} from the result now: the page keeps {it} only for a few hours."
