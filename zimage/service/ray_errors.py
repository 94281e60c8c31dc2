"""Ray's exceptions as the package's own one-sentence errors (zimage.service.ray_serve uses them).

Imports Ray only inside `explain`, which is called only with --ray (and by its unit test)."""

from __future__ import annotations

from zimage.errors import Cancelled, GenerationFailed, NotReady, ReplicaFailed, ShuttingDown


class ReplicaLost(Exception):
    """The replica running (or about to run) a job died: the job may run again elsewhere."""


def explain(exc: BaseException, address: str = "") -> BaseException:
    """Ray's exception as the package's own: what run() raises (or ReplicaLost, to retry).

    A replica's own error (a ZImageError such as OutOfMemory or Cancelled, or the runner's
    exception) arrives wrapped in a RayTaskError and comes out as itself; Ray's own failures
    become one sentence that says what happened and what to do."""
    import asyncio
    import concurrent.futures

    from ray import exceptions as rx
    from ray.serve import exceptions as sx

    where = f" at {address}" if address else ""
    if isinstance(exc, rx.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, ReplicaFailed):  # the replica broke (an unrecoverable CUDA error): Serve replaces it
            return ReplicaLost(str(cause))
        if isinstance(cause, BaseException) and not isinstance(cause, rx.RayTaskError):
            return explain(cause, address) if isinstance(cause, rx.RayError) else cause
        return GenerationFailed(f"A Ray replica failed while running the job ({type(exc).__name__}); see the logs.")
    if isinstance(exc, (sx.RequestCancelledError, rx.TaskCancelledError)):
        return Cancelled("Cancelled.")
    if isinstance(exc, (asyncio.CancelledError, concurrent.futures.CancelledError)):
        return Cancelled("Cancelled before it started.")
    if isinstance(exc, (rx.RayActorError, sx.ReplicaUnavailableError, rx.WorkerCrashedError, rx.NodeDiedError)):
        return ReplicaLost(first_line(exc))
    if isinstance(exc, sx.DeploymentUnavailableError):
        return NotReady(
            "The zimage replicas on Ray Serve failed to deploy; run `serve status` on the head box to see why, "
            "then restart the studio."
        )
    if isinstance(exc, sx.BackPressureError):
        return ShuttingDown("Ray Serve's queue for zimage is full; try again in a minute.")
    if isinstance(exc, rx.RayError):
        return GenerationFailed(
            f"The Ray cluster{where} did not answer ({type(exc).__name__}); the studio keeps running: try again, "
            "and check `ray status` on the head box."
        )
    return exc


def chain_text(exc: BaseException) -> str:
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return " ".join(parts)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def cause_line(exc: BaseException) -> str:
    """The last line of Serve's deploy error that names an exception (its traceback's end)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "Exception" in ln:
            return ln[:300]
    return (lines[-1] if lines else type(exc).__name__)[:300]
