"""The page's runs: each browser's job from Generate to its result, apart from the tab that started it.

A run works on its own thread, so it outlives the Gradio event that started it: a reload of the
page finds it (the browser keeps an id in localStorage) and follows it to the end, while closing
the tab cancels it after a short grace (`CLOSE_GRACE_S`, long enough for a reload to re-attach).
The run also keeps what the page needs to come back after a reload: the form and the result.

`StepClock` turns measured step times into the queue's ETA."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from zimage.errors import Cancelled, ZImageError
from zimage.web.guard import INTERNAL_ERROR

log = logging.getLogger(__name__)

CLOSE_GRACE_S = 4.0  # a closed tab's run is cancelled after this long, unless a reload took it over
KEEP_FINISHED = 200  # finished runs remembered (for reloads), oldest dropped first


@dataclass
class Run:
    """One Generate press of one browser, followed from the queue to the saved PNGs."""

    client: str  # the browser's id (localStorage), "" when unknown
    session: str  # Gradio session of the tab following it now (a reload takes it over)
    user: str
    job: Any  # service.jobs.Job
    form: dict[str, Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: str = "running"  # running, done, cancelled, failed
    phase: str = "waiting"  # waiting (model or GPU), text, denoise, decode, save
    step: int = 0
    total: int = 0
    denoise_started: float | None = None  # perf_counter at the first step's start
    step_s: float | None = None  # this run's own measured seconds per step
    started: float = field(default_factory=time.time)
    paths: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    cancel_reason: str = ""  # "button", "closed"
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def active(self) -> bool:
        return not self.done.is_set()

    def progress(self, phase: str, done: int, total: int) -> None:
        """The engine's progress callback (GPU thread)."""
        now = time.perf_counter()
        self.phase, self.total = phase, total
        if phase == "denoise":
            if self.denoise_started is None:
                self.denoise_started = now  # the first call comes after step 1: estimate its start
                self.step_s = None
            elif done > 1:
                self.step_s = (now - self.denoise_started) / (done - 1)
            self.step = done


class StepClock:
    """Measured seconds per step and the rest of a job (text encoder, decode), per image size.

    A size seen before is estimated from its own measurements (a moving average over its
    recent runs, or the running job's own step time); another size is scaled by pixel count
    from the nearest size measured. Nothing measured yet: no estimate (None)."""

    def __init__(self) -> None:
        self._sizes: dict[tuple[int, int, int], tuple[float, float]] = {}  # (w, h, n) -> (step s, rest s)
        self._lock = threading.Lock()

    def observe(self, details: dict[str, Any]) -> None:
        """A finished run's timings (a details dict)."""
        tm = details.get("timings") or {}
        steps = tm.get("steps_s") or []
        key = _key(details.get("width"), details.get("height"), details.get("count"))
        if not steps or key is None:
            return
        per_step = sum(steps) / len(steps)
        rest = max(0.0, (tm.get("total_s") or 0.0) - (tm.get("denoise_s") or 0.0))
        with self._lock:
            old = self._sizes.get(key)
            if old is not None:  # moving average: follows a change of memory mode or load
                per_step, rest = 0.6 * old[0] + 0.4 * per_step, 0.6 * old[1] + 0.4 * rest
            self._sizes[key] = (per_step, rest)

    def _lookup(self, key: tuple[int, int, int]) -> tuple[float, float] | None:
        with self._lock:
            if key in self._sizes:
                return self._sizes[key]
            if not self._sizes:
                return None
            mp = key[0] * key[1] * key[2]
            near = min(self._sizes, key=lambda k: abs(k[0] * k[1] * k[2] - mp))
            scale = mp / (near[0] * near[1] * near[2])
            step, rest = self._sizes[near]
            return step * scale, rest * scale

    def estimate(self, width: Any, height: Any, steps: Any, count: Any, like: Run | None = None) -> float | None:
        """Seconds a job of this size takes on the GPU; `like` is a running run whose own step time
        counts when it has the same size."""
        key = _key(width, height, count)
        try:
            n = int(steps)
        except (TypeError, ValueError):
            return None
        if key is None:
            return None
        known = self._lookup(key)
        if like is not None and like.step_s is not None and _key(*_size(like.form)) == key:
            rest = known[1] if known else 0.0
            return n * like.step_s + rest
        if known is None:
            return None
        return n * known[0] + known[1]

    def remaining(self, run: Run | None) -> float | None:
        """Seconds left of a running run, from its own step time once it has one."""
        if run is None:
            return 0.0
        key = _key(*_size(run.form))
        known = self._lookup(key) if key else None
        rest = known[1] if known else 0.0
        if run.phase in ("decode", "save"):
            return rest
        per_step = run.step_s if run.step_s is not None else (known[0] if known else None)
        total = run.total or run.form.get("steps")
        if per_step is None or not total:
            return None
        try:
            left = max(0, int(total) - run.step)
        except (TypeError, ValueError):
            return None
        return per_step * left + rest


def _size(form: dict[str, Any]) -> tuple[Any, Any, Any]:
    return form.get("width"), form.get("height"), form.get("count")


def _key(width: Any, height: Any, count: Any) -> tuple[int, int, int] | None:
    try:
        key = (int(width), int(height), int(count or 1))
    except (TypeError, ValueError):
        return None
    return key if all(v > 0 for v in key) else None


class Runs:
    """Every browser's runs: start, find, cancel, take over after a reload."""

    def __init__(self, engine: Any, close_grace_s: float = CLOSE_GRACE_S):
        self.engine = engine
        self.close_grace_s = close_grace_s
        self.clock = StepClock()
        self._runs: list[Run] = []
        self._lock = threading.Lock()

    def start(self, request: Any, client: str, session: str, user: str, form: dict[str, Any], preview: bool) -> Run:
        """Start a run on its own thread; `request` is a service GenerationRequest (not yet validated)."""
        job = self.engine.new_job()
        job.want_preview = bool(preview)
        run = Run(client=client, session=session, user=user, job=job, form=form)
        with self._lock:
            self._runs.append(run)
            finished = [r for r in self._runs if not r.active]
            for old in finished[: max(0, len(finished) - KEEP_FINISHED)]:
                self._runs.remove(old)
        threading.Thread(target=self._work, args=(run, request), name=f"run-{run.id}", daemon=True).start()
        return run

    def _work(self, run: Run, request: Any) -> None:
        engine = self.engine
        try:
            while not engine.ready and not engine.load_error and not run.job.cancelled:
                time.sleep(0.1)  # a request made while loading holds its place; the page says why
            if run.job.cancelled:
                raise Cancelled("Cancelled while waiting for the model.")
            result = engine.generate(request, job=run.job, progress=run.progress, save=True, wait_ready=30.0)
            run.phase = "save"
            run.paths = list(result.wait_saved(timeout=120))
            run.details = result.details()
            self.clock.observe(run.details)
            run.state = "done"
        except Cancelled:
            run.state = "cancelled"
            run.cancel_reason = run.cancel_reason or "button"
        except ZImageError as exc:
            run.state, run.error = "failed", str(exc)
        except Exception:  # noqa: BLE001 - never a traceback to a client; the log has it
            log.exception("run %s failed", run.id)
            run.state, run.error = "failed", INTERNAL_ERROR
        finally:
            run.done.set()
            run.job.preview = None  # finished runs are kept for reloads: without their last frame

    # --- finding runs ---------------------------------------------------------------------

    def active_of_session(self, session: str) -> list[Run]:
        with self._lock:
            return [r for r in self._runs if r.session == session and r.active]

    def last_of_client(self, client: str, user: str) -> Run | None:
        """The newest run of this browser (and user, with logins on)."""
        if not client:
            return None
        with self._lock:
            mine = [r for r in self._runs if r.client == client and r.user == user]
        return mine[-1] if mine else None

    def last_done_of_client(self, client: str, user: str) -> Run | None:
        if not client:
            return None
        with self._lock:
            mine = [r for r in self._runs if r.client == client and r.user == user and r.state == "done"]
        return mine[-1] if mine else None

    def by_id(self, run_id: str, session: str) -> Run | None:
        """The run with this id, if this session follows it."""
        with self._lock:
            return next((r for r in self._runs if r.id == run_id and r.session == session), None)

    def running(self) -> Run | None:
        """The run on the GPU now, if it is one of the page's (API jobs are not runs)."""
        job = self.engine.running_job
        with self._lock:
            return next((r for r in self._runs if r.job is job and r.active), None) if job else None

    # --- cancel -----------------------------------------------------------------------------

    def cancel_session(self, session: str, reason: str = "button") -> int:
        runs = self.active_of_session(session)
        for run in runs:
            run.cancel_reason = reason
            run.job.cancel()
        return len(runs)

    def tab_closed(self, session: str) -> None:
        """The tab that follows these runs is gone: cancel them unless a reload takes them over soon."""
        runs = self.active_of_session(session)
        if not runs:
            return

        def later() -> None:
            time.sleep(self.close_grace_s)
            for run in runs:
                if run.session == session and run.active:
                    log.info("run %s cancelled: its page was closed", run.id)
                    run.cancel_reason = "closed"
                    run.job.cancel()

        threading.Thread(target=later, name="tab-closed", daemon=True).start()

    def take_over(self, run: Run, session: str) -> None:
        run.session = session
